"""Partitions: one per landed batch, and one per shard of a batch."""

import dagster as dg

#: The partition sets' names: what the instance's dynamic partition calls take.
BATCHES, SHARDS = "batches", "shards"

#: One partition per batch, e.g. ``photos_20261123T204311``.
batches_partitions = dg.DynamicPartitionsDefinition(name=BATCHES)

#: One partition per shard, named after its batch: ``photos_20261123T204311-s00003``.
shards_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)

#: Every asset a shard's run materializes: a shard is in only when all of them are.
SHARD_OUTPUTS = ("shard_keys", "shard_uploads", "occurrences", "rejects", "attributes")
