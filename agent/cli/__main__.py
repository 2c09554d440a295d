import sys

from battery_trace.agent.cli import main

sys.exit(main())
