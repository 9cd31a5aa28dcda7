"""Consumer lag as Kafka's own tools report it: high-water mark minus the group's committed offset.

Both numbers come from the broker (ListOffsets and OffsetFetch through kafka-python's admin
client), the way kafka-consumer-groups, Burrow and kafka-exporter read them, not from the
consumer's memory. So an event the worker has read but not finished (committed) still counts,
a stuck agent shows a growing lag, and so does a worker whose commits fail.

The admin client blocks: `ConsumerLagProbe.measure` is meant for a worker thread (the worker's
timer runs it with asyncio.to_thread), never the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec

log = logging.getLogger("incstream.lag")


class ConsumerLagProbe:
    """Measures one consumer group's lag on the partitions it is asked about."""

    def __init__(self, bootstrap: str, group_id: str, request_timeout_ms: int = 5000) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.request_timeout_ms = request_timeout_ms
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()  # one measurement at a time; close() waits for it

    def measure(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """(topic, partition) -> high-water mark minus the committed offset (0 if negative).
        A partition the group never committed counts from its log start offset (where a
        consumer with auto_offset_reset=earliest starts). Raises on broker errors; the
        client is dropped then and made again on the next call."""
        wanted = [TopicPartition(topic, partition) for topic, partition in partitions]
        if not wanted:
            return {}
        with self._lock:
            try:
                return self._measure(wanted)
            except Exception:
                self._close_admin()
                raise

    def _measure(self, wanted: list[TopicPartition]) -> dict[tuple[str, int], int]:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap, client_id=f"{self.group_id}-lag",
                request_timeout_ms=self.request_timeout_ms)
        admin = self._admin
        ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in wanted})
        committed = admin.list_group_offsets({self.group_id: wanted}).get(self.group_id, {})
        positions = {tp: meta.offset for tp, meta in committed.items()
                     if meta is not None and meta.offset is not None and meta.offset >= 0}
        never_committed = [tp for tp in wanted if tp not in positions]
        if never_committed:
            starts = admin.list_partition_offsets(
                {tp: OffsetSpec.EARLIEST for tp in never_committed})
            positions.update({tp: starts[tp].offset for tp in never_committed})
        return {(tp.topic, tp.partition): max(0, ends[tp].offset - positions[tp])
                for tp in wanted}

    def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception:  # closing a client whose broker is gone can raise; nothing to do
                log.debug("closing the lag probe's admin client failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._close_admin()
