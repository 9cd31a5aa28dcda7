"""Notice a broker that is gone, or that has lost this worker's topics, instead of hanging.

The embedded broker (tansu, `memory://` storage) keeps its topics in memory: restarted, it
comes back empty. Faust's consumer does not notice that: it retries its offset commits forever
(2,247 OffsetCommit failures per partition in 7 minutes, seen), /metrics answers and lag reads
0. A real Kafka cluster that is down or whose topics were deleted looks the same from here.

So the worker asks the broker itself, every few seconds, on a thread of its own: does it
answer metadata, and does it have the edits topic and the table's changelog topic with the
partitions this worker expects? (The changelog is created only by the worker at start, so a
broker that lost its topics lacks it even when producers re-created the edits topic by
writing to it.) While the answer is no, /ready says 503 and
`incstream_broker_unreachable_seconds` counts up; after `broker_lost_exit_s` the worker exits
with status 69 (EX_UNAVAILABLE) so that its supervisor restarts it: the restart creates the
topics again and re-reads what it has not committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

log = logging.getLogger("incstream.broker")

EXIT_BROKER_LOST = 69  # EX_UNAVAILABLE (sysexits.h)


def probe_broker(bootstrap: str, topics: dict[str, int], timeout_s: float) -> str | None:
    """None when the broker answers metadata and has every topic in `topics` (name ->
    partitions) with at least that many partitions; else what is wrong, in words."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="incstream-watch",
                                 request_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError, ValueError) as exc:
        return f"broker {bootstrap} does not answer ({type(exc).__name__}: {exc})"
    try:
        described = admin.describe_topics(list(topics))
    except (KafkaError, OSError) as exc:
        return f"broker {bootstrap} does not answer metadata ({type(exc).__name__}: {exc})"
    finally:
        admin.close()
    found = {t["name"]: len(t.get("partitions") or []) for t in described
             if t.get("error_code", 0) == 0}
    missing = [f"{name} ({found.get(name, 0)} of {n} partitions)"
               for name, n in topics.items() if found.get(name, 0) < n]
    if missing:
        return f"broker {bootstrap} lacks this worker's topics: {', '.join(missing)}"
    return None


class BrokerWatch:
    """How long the broker has been unusable, from the probes' answers."""

    def __init__(self, exit_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.exit_after_s = exit_after_s
        self.clock = clock
        self.unusable_since: float | None = None
        self.problem: str | None = None

    @property
    def healthy(self) -> bool:
        return self.unusable_since is None

    def seconds_unusable(self) -> float:
        return 0.0 if self.unusable_since is None else self.clock() - self.unusable_since

    def observe(self, problem: str | None) -> None:
        """Record one probe's answer (None: all well)."""
        if problem is None:
            if self.unusable_since is not None:
                log.warning("broker usable again after %.0f s", self.seconds_unusable())
            self.unusable_since, self.problem = None, None
            return
        if self.unusable_since is None:
            self.unusable_since = self.clock()
            log.error("%s; not ready, exiting after %.0f s of this", problem, self.exit_after_s)
        self.problem = problem

    def should_exit(self) -> bool:
        return bool(self.exit_after_s) and self.seconds_unusable() >= self.exit_after_s
