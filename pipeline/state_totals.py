"""What the worker's table holds, kept as running totals: documents, bytes, held events.

The totals are counted once from the table after each recovery (a restart, a rebalance: the
partitions this worker holds have changed), then moved by every write. The table is never
re-read on a timer. Held events are kept per document, from the document's state as it is
written (never as +/- deltas: a delta applied to a total that started at 0 after a restart is
how the gauge once read -1); only documents with held events take an entry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from incstream.pipeline.metrics import WorkerMetrics
from incstream.state.document import StateCodecError, decode_state

log = logging.getLogger("incstream.worker")


class StateTotals:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.documents = 0
        self.bytes = 0
        self.held_by_doc: dict[bytes, int] = {}
        self.held = 0  # = sum(held_by_doc.values()), kept with it

    def recount(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Count the table from scratch (`items`: its keys and stored values). Synchronous on
        purpose: no write can land between the count and the first write after it. Decoding
        every state (for its held events) costs about as much as reading the table once."""
        started = time.perf_counter()
        documents = total = 0
        held: dict[bytes, int] = {}
        for key, value in items:
            if value is None:
                continue
            documents += 1
            total += len(value)
            try:
                count = len(decode_state(value).held)
            except StateCodecError:
                count = 0  # unreadable: its next event resets it (and dead-letters that)
            if count:
                held[key] = count
        self.documents, self.bytes = documents, total
        self.held_by_doc, self.held = held, sum(held.values())
        self._publish()
        log.info("table holds %d documents, %d bytes, %d held events (counted in %.2f s)",
                 documents, total, self.held, time.perf_counter() - started)

    def written(self, key: bytes, previous: bytes | None, encoded: bytes, held: int) -> None:
        """`key` now stores `encoded` (a state with `held` held events) instead of
        `previous` (None: a new document)."""
        if previous is None:
            self.documents += 1
        self.bytes += len(encoded) - (len(previous) if previous is not None else 0)
        # The document's entry is replaced by what its state holds now.
        self.held += held - self.held_by_doc.pop(key, 0)
        if held:
            self.held_by_doc[key] = held
        self._publish()

    def _publish(self) -> None:
        self.metrics.documents.set(self.documents)
        self.metrics.state_bytes.set(self.bytes)
        self.metrics.held_events.set(self.held)
