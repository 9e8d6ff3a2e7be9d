"""Ingestion in plain Python: sources, shard plans, fingerprints, one pass per shard."""
