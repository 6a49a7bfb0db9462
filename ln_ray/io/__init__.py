"""Where data lives: input shards read row by row with provenance, and the output root, its run
folders, score cache, manifest and lease, each a folder on any fsspec filesystem (``folder.py``)."""
