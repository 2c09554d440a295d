"""Sources: the I/O edge that turns buses and ports into raw frames for the decoders."""
