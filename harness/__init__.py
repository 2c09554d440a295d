"""Private infrastructure for the demo and the tests: brokers they can start, kill and restart."""
