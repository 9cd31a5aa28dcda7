"""state: what incstream remembers about each document, and the rules for changing it.

- `edit_event`: the doc-edit/v1 event, parsed and validated (bad input -> EventRejected).
- `document`: the durable per-document state and its versioned byte codec (what goes into the
  RocksDB table and its Kafka changelog).
- `ordering`: the revision rules: duplicates dropped, gaps held (bounded) until they fill or a
  snapshot arrives, snapshots create or resync, checksums verified.

state uses engine (text ops) and never imports faust or pipeline.
"""
