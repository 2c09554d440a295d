"""Pure decoders: bytes in, typed readings or DecodeError out. No I/O, no clocks, no global state."""
