"""The edge agent: sources -> decoders -> battery view -> workflow -> sealer -> outbox -> uplink."""
