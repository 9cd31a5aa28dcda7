"""Dead letters carry the event as it arrived, and always fit one Kafka record."""

import base64
import hashlib
import json
import re
from pathlib import Path

from incstream.pipeline.records import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_REASONS,
    EVENT_EXCERPT_CHARS,
    dead_letter_key,
    dead_letter_record,
    to_bytes,
)


def test_a_small_event_is_carried_byte_for_byte():
    raw = b'{"schema": "doc-edit/v1", "note": "caf\\u00e9 \xc3\xa9"}\n'
    record = dead_letter_record("invalid_event", "why", raw)
    assert record["event"].encode("utf-8") == raw and "event_truncated" not in record
    not_utf8 = b'{"a": "\xff\xfe"}'
    record = dead_letter_record("invalid_json", "why", not_utf8)
    assert base64.b64decode(record["event_base64"]) == not_utf8


def test_a_large_event_is_carried_as_an_excerpt_with_its_size_and_hash():
    raw = b'{"snapshot": "' + b"\x01" * (20 * 1024**2) + b'"}'  # escapes to 6 bytes each
    record = dead_letter_record("event_too_large", "x" * 100_000, raw)
    assert record["event_truncated"] is True
    assert record["event_bytes"] == len(raw)
    assert record["event_sha1"] == hashlib.sha1(raw).hexdigest()
    assert raw.decode("utf-8").startswith(record["event"])
    assert len(record["event"]) == EVENT_EXCERPT_CHARS
    assert len(record["error"]) < 3000
    assert len(to_bytes(record)) < DEAD_LETTER_MAX_BYTES


def test_escaping_cannot_push_a_mid_size_event_past_the_bound():
    raw = b"\x01" * (DEAD_LETTER_MAX_BYTES // 2)  # 6x larger once JSON-escaped
    record = dead_letter_record("invalid_json", "why", raw)
    assert record["event_truncated"] and len(to_bytes(record)) <= DEAD_LETTER_MAX_BYTES


def test_a_held_event_with_a_lone_surrogate_still_serializes():
    record = dead_letter_record("ops_past_end", "why", {"snapshot": "\ud800"})
    assert json.loads(to_bytes(record))["event"] == {"snapshot": "\ud800"}


def test_a_key_too_long_for_kafka_is_replaced_by_its_hash():
    assert dead_letter_key(b"doc-1") == b"doc-1" and dead_letter_key(None) is None
    long_key = b"k" * 5_000_000
    assert dead_letter_key(long_key) == b"sha1:" + hashlib.sha1(long_key).hexdigest().encode()


def test_the_readme_explains_every_dead_letter_reason_and_no_other():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    table = readme.split("`reason` is one of:", 1)[1].split("A dead-lettered event", 1)[0]
    first_column = re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \|", table, re.MULTILINE)
    named = {name for cell in first_column for name in re.findall(r"`([a-z_]+)`", cell)}
    assert named == set(DEAD_LETTER_REASONS)
