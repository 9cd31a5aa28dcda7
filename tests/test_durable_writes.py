"""An event's acknowledgement waits for the changelog records of its own table writes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from incstream.pipeline.durable_writes import ChangelogWrites
from incstream.pipeline.event_batches import act_for


class Event:
    """What the writes are grouped by (a Faust event; only its identity matters here)."""


class Table:
    """A table's changelog sends: each returns a future Kafka resolves later."""

    def __init__(self) -> None:
        self.sent: list[asyncio.Future] = []

    def send_changelog(self, partition: int, key: Any, value: Any) -> asyncio.Future:
        sent = asyncio.get_running_loop().create_future()
        self.sent.append(sent)
        return sent


def test_an_event_is_delivered_only_once_kafka_has_all_its_writes() -> None:
    async def scenario() -> None:
        writes, documents, records = ChangelogWrites(), Table(), Table()
        writes.track(documents)
        writes.track(records)
        mine, other = Event(), Event()

        async def write(event: Event, table: Table, key: bytes) -> None:
            act_for(event)  # type: ignore[arg-type]  # each event's story runs in its own task
            table.send_changelog(0, key, b"state")

        await asyncio.gather(write(mine, documents, b"a"), write(mine, records, b"a:0"),
                             write(other, documents, b"b"))
        assert writes.pending(mine) == 2 and writes.pending(other) == 1  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(writes.delivered(mine))  # type: ignore[arg-type]
        documents.sent[0].set_result("offset 7")
        await asyncio.sleep(0.01)
        assert not waiting.done(), "delivered before the chunk record was in Kafka"
        documents.sent[1].set_result("offset 8")  # the other event's write: not ours
        await asyncio.sleep(0.01)
        assert not waiting.done()
        records.sent[0].set_result("offset 3")
        await asyncio.wait_for(waiting, 1)
        assert writes.pending(mine) == 0 and writes.pending(other) == 1  # type: ignore[arg-type]

    asyncio.run(scenario())


def test_a_refused_write_raises_and_a_forgotten_event_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        writes, documents = ChangelogWrites(), Table()
        writes.track(documents)
        failed, abandoned = Event(), Event()
        act_for(failed)  # type: ignore[arg-type]
        documents.send_changelog(0, b"a", b"state")
        documents.sent[0].set_exception(RuntimeError("broker said no"))
        with pytest.raises(RuntimeError, match="broker said no"):
            await writes.delivered(failed)  # type: ignore[arg-type]
        act_for(abandoned)  # type: ignore[arg-type]
        documents.send_changelog(0, b"b", b"state")
        writes.forget(abandoned)  # type: ignore[arg-type]
        assert writes.pending(abandoned) == 0  # type: ignore[arg-type]
        await asyncio.wait_for(writes.delivered(abandoned), 1)  # nothing left to wait for

    asyncio.run(scenario())
