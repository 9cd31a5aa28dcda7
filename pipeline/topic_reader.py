"""Reading the worker's output topics with kafka-python (the demo and the tests use it)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer


class TopicReader:
    """Reads JSON records from topics on a background thread, from the beginning.

    Each record is kept as (topic, record) in `records`; `on_record` is called for each.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: list[str],
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.on_record = on_record
        self.records: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-reader", daemon=True)

    def start(self) -> TopicReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        consumer = KafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=200,
        )
        try:
            while not self._stop.is_set():
                for message in consumer:
                    record = json.loads(message.value)
                    with self._lock:
                        self.records.append((message.topic, record))
                    if self.on_record:
                        self.on_record(message.topic, record)
                    if self._stop.is_set():
                        break
        finally:
            consumer.close()

    def of(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [record for name, record in self.records if name == topic]

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.2)
        return condition()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
