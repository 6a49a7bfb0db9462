"""Storage: list input shards, read them row by row with provenance, write outputs (fsspec)."""
