"""The BlueMarble shard node: agent, storage, replication and 2PC participant."""
