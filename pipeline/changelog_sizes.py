"""What a worker's tables wrote to Kafka: the sizes of the records in its changelog topics.

Read after the worker has stopped (SIGTERM flushes its producer), from the beginning of every
topic named `<app_id>-*-changelog` (the documents table, and any table added later), so the
figures are what a restore would read back. A document's durable state is the last record of
its key in each changelog; a tombstone (no value) ends it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition


@dataclass
class ChangelogSizes:
    """Value bytes per changelog record, and the last one per (topic, key)."""

    record_bytes: list[int] = field(default_factory=list)
    latest: dict[tuple[str, bytes], int] = field(default_factory=dict)  # -> bytes, 0 deleted
    topics: list[str] = field(default_factory=list)

    def summary(self, edits: int, docs: int) -> dict[str, Any]:
        """Per edit (total bytes / edits) and per document (the last records of each key)."""
        total = sum(self.record_bytes)
        durable = sum(self.latest.values())
        return {
            "topics": self.topics,
            "records": len(self.record_bytes),
            "bytes": total,
            "bytes_per_edit": total / edits if edits else None,
            "record_bytes_median": (statistics.median(self.record_bytes)
                                    if self.record_bytes else None),
            "record_bytes_max": max(self.record_bytes, default=None),
            "durable_bytes": durable,
            "durable_bytes_per_doc": durable / docs if docs else None,
        }


def read_changelogs(bootstrap: str, app_id: str, skip_keys: frozenset[bytes] = frozenset(),
                    timeout_s: float = 60.0) -> ChangelogSizes:
    """Every record of the app's changelog topics up to their end offsets now (records keyed
    by one of `skip_keys`, e.g. a benchmark's probe document, are left out)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=500)
    sizes = ChangelogSizes()
    try:
        sizes.topics = sorted(t for t in consumer.topics()
                              if t.startswith(f"{app_id}-") and t.endswith("-changelog"))
        parts = [TopicPartition(t, p) for t in sizes.topics
                 for p in sorted(consumer.partitions_for_topic(t) or ())]
        if not parts:
            return sizes
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"changelogs not read to their end within {timeout_s:g} s")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    if record.key in skip_keys or record.offset >= end[TopicPartition(
                            record.topic, record.partition)]:
                        continue
                    size = len(record.value) if record.value is not None else 0
                    if record.value is not None:
                        sizes.record_bytes.append(size)
                    sizes.latest[(record.topic, record.key)] = size
    finally:
        consumer.close()
    return sizes
