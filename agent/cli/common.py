"""What every agent command shares: exit codes."""

OK, INVALID, USAGE = 0, 1, 2
