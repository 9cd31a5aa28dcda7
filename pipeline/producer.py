"""Producer side: what a service that emits doc-edit/v1 events uses (kafka-python).

Key = doc_id, so every event of a document lands in one partition, in order. acks=all and one
request in flight per connection, so a retry can never reorder two events of a document.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.serializer import Serializer


class DocIdKey(Serializer):
    """Kafka key = doc_id, UTF-8."""

    def serialize(self, topic: str, headers: Any, data: str | bytes) -> bytes:
        return data.encode("utf-8") if isinstance(data, str) else data


class JsonEvent(Serializer):
    """An event dict as compact UTF-8 JSON; bytes pass through untouched (for raw payloads)."""

    def serialize(self, topic: str, headers: Any, data: dict[str, Any] | bytes) -> bytes:
        if isinstance(data, bytes):
            return data
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def edit_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """A KafkaProducer configured for doc-edit/v1 events."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "retries": 10,
        "max_in_flight_requests_per_connection": 1,  # no reordering on retry
        "linger_ms": 5,
        "key_serializer": DocIdKey(),
        "value_serializer": JsonEvent(),
        "client_id": "incstream-producer",
    }
    config.update(overrides)
    return KafkaProducer(**config)


def send_edit(producer: KafkaProducer, topic: str, event: dict[str, Any] | bytes,
              doc_id: str | None = None):
    """Send one event keyed by its doc_id; returns kafka-python's future."""
    if doc_id is None:
        if not isinstance(event, dict):
            raise ValueError("pass doc_id for a raw (bytes) event")
        doc_id = event["doc_id"]
    return producer.send(topic, key=doc_id, value=event)


def read_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Events from a .jsonl or .jsonl.gz file, one JSON object per line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


class RateLimiter:
    """Spaces calls to at most `rate` per second (0: unlimited)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(self.next_at, now) + self.interval


def replay(
    events: Iterable[dict[str, Any]],
    bootstrap: str,
    topic: str,
    rate: float = 0.0,
    progress: bool = True,
    total: int | None = None,
    on_send: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Send `events` in order, at most `rate` per second; returns how many were sent.
    `on_send(event)` is called just before each is handed to the producer."""
    from tqdm import tqdm

    producer = edit_producer(bootstrap)
    limiter = RateLimiter(rate)
    sent = 0
    try:
        for event in tqdm(events, total=total, unit="ev", disable=not progress, desc="produce"):
            limiter.wait()
            if on_send is not None:
                on_send(event)
            send_edit(producer, topic, event)
            sent += 1
        producer.flush()
    finally:
        producer.close()
    return sent
