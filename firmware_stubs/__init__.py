"""Emulated devices speaking the real protocols over real transports, with fault injection.

Every frame here is built from ../shared/reference/protocols.md on its own, never with the agent's
decoders, so a decoder bug shows up as a test failure instead of being mirrored.
"""
