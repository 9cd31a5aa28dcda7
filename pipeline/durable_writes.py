"""An event is acknowledged only once the changelog records of its table writes are in Kafka.

Faust commits a partition's offset up to the first event not yet acknowledged, after flushing
its producer. That flush gives up after 0.1 s without a message leaving the producer's buffer
(faust.transport.producer.ProducerBuffer.flush_atmost), so a table write still in the buffer
can be lost while the offset past its event is committed. A worker that then takes the
partition over (a crash, a rebalance) restores the document one revision short and holds every
later revision for the gap that never fills. Awaiting each event's own changelog sends before
its acknowledgement closes that window: a committed offset always has its state in Kafka.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from faust.types.tuples import FutureMessage


class ChangelogWrites:
    """The changelog sends of the tracked tables, grouped by the event that made them."""

    def __init__(self) -> None:
        self._pending: dict[int, list[FutureMessage]] = {}

    def track(self, table: Any) -> None:
        """Remember every changelog record `table` sends (a Faust table's writes and deletes
        go through its send_changelog) under the event current in the writing task."""
        send = table.send_changelog

        def send_and_remember(*args: Any, **kwargs: Any) -> FutureMessage:
            sent: FutureMessage = send(*args, **kwargs)
            event = faust.streams.current_event()
            if event is not None:
                self._pending.setdefault(id(event), []).append(sent)
            return sent

        table.send_changelog = send_and_remember

    def pending(self, event: faust.EventT) -> int:
        """How many changelog records of `event` were sent and not yet forgotten."""
        return len(self._pending.get(id(event), []))

    async def delivered(self, event: faust.EventT) -> None:
        """Wait until Kafka has acknowledged every changelog record `event` wrote (raises the
        producer's error if one failed). The event's records are forgotten either way."""
        sent = self._pending.pop(id(event), [])
        if sent:
            await asyncio.gather(*sent)

    def forget(self, event: faust.EventT) -> None:
        """Drop `event`'s records unawaited (an event abandoned part way, not acknowledged)."""
        self._pending.pop(id(event), None)
