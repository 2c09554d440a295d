import sys

from battery_trace.server.cli import main

sys.exit(main())
