"""Looking at the broker directly: a topic's records, a group's committed offsets."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition


def partitions_of(bootstrap: str, topic: str) -> list[int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="incstream-test-admin")
    try:
        (described,) = admin.describe_topics([topic])
    finally:
        admin.close()
    partitions = sorted(p["partition_index"] for p in described["partitions"])
    assert partitions, f"topic {topic} has no partitions"
    return partitions


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset (next to read) of each partition of `topic` it committed."""
    tps = [TopicPartition(topic, p) for p in partitions_of(bootstrap, topic)]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="incstream-test-admin")
    try:
        offsets = admin.list_group_offsets({group: tps})[group]
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset >= 0}


def read_all(bootstrap: str, topic: str, idle_s: float = 2.0) -> list:
    """Every record now in `topic` (raw key and value bytes): read from the start until
    nothing new comes for `idle_s`. (Not up to the end offsets: tansu 0.6.0 reports a
    partition's high-water mark as the last batch's base offset + 1, too low when that batch
    holds several records.)"""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in partitions_of(bootstrap, topic)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            batch = [r for rs in consumer.poll(timeout_ms=200).values() for r in rs]
            if batch:
                records.extend(batch)
                quiet_since = time.monotonic()
    finally:
        consumer.close()
    return records


def latest_values(bootstrap: str, topic: str) -> dict[bytes, bytes | None]:
    """A changelog's table: the last value of each key (what compaction would keep)."""
    table: dict[bytes, bytes | None] = {}
    for record in sorted(read_all(bootstrap, topic), key=lambda r: (r.partition, r.offset)):
        table[record.key] = record.value
    return table


def produce_raw(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """Write (key, value) bytes as they are, partitioned by key as kafka-python producers (the
    tests' edit producer among them) do; returns the partition of each key."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        partitions = {key: producer.send(topic, key=key, value=value).get(timeout=30).partition
                      for key, value in items}
        producer.flush()
    finally:
        producer.close()
    return partitions


def produce_many(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None]],
                 ) -> None:
    """Write many (key, value) records quickly, in order within each partition (one request in
    flight), values up to 32 MB (a producer's default limit is 1 MB)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             max_in_flight_requests_per_connection=1,
                             max_request_size=32 * 1024**2)
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in items]
        producer.flush()
        for future in futures:
            future.get(timeout=60)
    finally:
        producer.close()
