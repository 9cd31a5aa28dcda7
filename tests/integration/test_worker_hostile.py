"""Damage and hostility, through a real broker and real text-only workers (model `none`).

A first worker creates documents and stops. Then the deployment is damaged the ways the
probe of issue 12 damaged it: two of the worker's four RocksDB partition stores are broken
(CURRENT naming a missing MANIFEST; a garbage MANIFEST), and four documents' records in the
table's changelog are replaced by states no worker can read (bad magic, another codec
version, a zlib bomb, a record with fields missing). A second worker starts on the same data
dir: it must move the damaged stores aside, rebuild them from the changelog, answer every
revision that follows with the right hash, dead-letter each poisoned document once and resync
it from its next snapshot. The same worker then takes oversized events and a seeded fuzz
stream of thousands of hostile events between valid edits. Last, bytes are flipped in its
stores' .sst files and a worker that does not check them at start meets the corruption while
running: it must exit (status 75) leaving a marker, and its restart must rebuild the store.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_events import dead_letter_identity, dumps, fuzz_stream, identity
from kafka_tools import produce_many, produce_raw
from prom import metric, metric_by
from rocksdict import Options, Rdict

from incstream.engine.incremental.text_ops import apply_ops, sha1_hex
from incstream.pipeline.app import EXIT_STORE_DAMAGED
from incstream.pipeline.records import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_REASONS,
    EVENT_EXCERPT_CHARS,
)
from incstream.pipeline.topic_reader import TopicReader
from incstream.pipeline.topics import changelog_topic
from incstream.state.document import CODEC_VERSION, MAGIC

pytestmark = pytest.mark.integration

SCHEMA = "doc-edit/v1"
HEALTHY = [f"healthy-{i}" for i in range(8)]
POISON = {
    "bad-magic-doc": b"XYZ\x01" + zlib.compress(b"{}"),
    "other-version-doc": MAGIC + bytes([CODEC_VERSION + 1]) + zlib.compress(b"{}"),
    # 80 MiB of spaces in 80 KB: past the 64 MiB a state may inflate to
    "zlib-bomb-doc": MAGIC + bytes([CODEC_VERSION]) + zlib.compress(b" " * (80 * 1024**2), 9),
    "missing-fields-doc": MAGIC + bytes([CODEC_VERSION]) + zlib.compress(
        json.dumps({"doc_id": "missing-fields-doc", "rev": 1}).encode()),
}
MAX_EVENT_BYTES = 1_048_576  # the setting's default
FUZZ_SEED = 20261125


def snapshot(doc: str, rev: int, text: str) -> bytes:
    return dumps({"schema": SCHEMA, "doc_id": doc, "rev": rev, "snapshot": text})


def append(doc: str, rev: int, old: str, piece: str) -> tuple[bytes, str]:
    new, _ = apply_ops(old, [{"retain": len(old)}, {"insert": piece}])
    return dumps({"schema": SCHEMA, "doc_id": doc, "rev": rev, "sha1_after": sha1_hex(new),
                  "ops": [{"retain": len(old)}, {"insert": piece}]}), new


def answered(reader: TopicReader, topic: str) -> Counter:
    return Counter((r["doc_id"], r["rev"]) for r in reader.of(topic))


@dataclass
class Healed:
    worker: object  # the second worker, on the damaged data dir
    log: Path
    aside: list[Path]  # damaged stores as the worker moved them
    texts: dict[str, str]  # healthy doc -> its text at rev 1 (before the damage)


@pytest.fixture(scope="module")
def healed(deployment, reader) -> Healed:
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    data_dir = deployment.root / "data"
    first = deployment.worker(data_dir=data_dir, name="first", model="none").start()
    texts: dict[str, str] = {}
    try:
        first.wait_ready()
        items = []
        for doc in HEALTHY:
            text0 = f"{doc} starts here"
            event, texts[doc] = append(doc, 1, text0, " and goes on")
            items += [(doc.encode(), snapshot(doc, 0, text0)), (doc.encode(), event)]
        items += [(doc.encode(), snapshot(doc, 0, f"{doc} before the poison")) for doc in POISON]
        produce_many(bootstrap, s.edits_topic, items)
        expected = {(d, r) for d in HEALTHY for r in (0, 1)} | {(d, 0) for d in POISON}
        assert reader.wait_for(lambda: set(answered(reader, s.classes_topic)) >= expected,
                               timeout_s=120)
        code, _ = first.stop()
        assert code == 0
    finally:
        first.kill()

    produce_raw(bootstrap, changelog_topic(s), [(d.encode(), v) for d, v in POISON.items()])
    stores = sorted((data_dir / "v1" / "tables").glob(f"{s.table_name}-*.db"))
    assert len(stores) == s.partitions, stores
    (stores[0] / "CURRENT").write_text("MANIFEST-999999\n")
    (manifest,) = stores[1].glob("MANIFEST-*")
    manifest.write_bytes(b"\x00garbage, not a manifest\xff" * 100)

    log = deployment.root / "healed.log"
    worker = deployment.worker(data_dir=data_dir, name="healed", model="none").start()
    worker.wait_ready()
    aside = sorted(p for p in stores[0].parent.iterdir() if ".damaged-" in p.name)
    yield Healed(worker, log, aside, texts)
    if worker.alive():
        worker.stop()


def test_a_damaged_store_is_moved_aside_and_rebuilt_from_the_changelog(deployment, healed,
                                                                       reader):
    s = deployment.settings
    assert [p.name.split(".damaged-")[0] for p in healed.aside] == [
        f"{s.table_name}-0.db", f"{s.table_name}-1.db"]
    log = healed.log.read_text("utf-8", errors="replace")
    assert log.count("is damaged") == 2 and "rebuilt from the changelog" in log
    assert metric(healed.worker.scrape(), "incstream_store_rebuilds_total") == 2

    # Every document's state came back: rev 2 applies on rev 1's text (a lost state would
    # hold rev 2 as a gap; a wrong text would fail its sha1_after), and rev 1 again is a
    # duplicate, not answered twice.
    items, expected = [], {}
    for doc in HEALTHY:
        event, expected[doc] = append(doc, 2, healed.texts[doc], " after the damage")
        items += [(doc.encode(), event), (doc.encode(), append(doc, 1, "", "x")[0])]
    produce_many(deployment.broker.bootstrap, s.edits_topic, items)
    assert reader.wait_for(lambda: all(answered(reader, s.classes_topic)[(d, 2)] for d in
                                       HEALTHY), timeout_s=120), "not every revision answered"
    for doc in HEALTHY:
        records = [r for r in reader.of(s.classes_topic) if r["doc_id"] == doc]
        assert [(r["rev"], r["sha1"]) for r in records][-1] == (2, sha1_hex(expected[doc]))
        assert [r["rev"] for r in records] == [0, 1, 2]
    assert healed.worker.alive()


def test_a_poisoned_document_is_dead_lettered_once_and_resynced_by_its_next_snapshot(
    deployment, healed, reader
):
    s = deployment.settings
    items = []
    for doc in POISON:
        key = doc.encode()
        items += [
            (key, append(doc, 1, "", "lost edit")[0]),  # meets the record: state_unreadable
            (key, append(doc, 2, "", "another")[0]),  # awaiting_snapshot
            (key, snapshot(doc, 7, f"{doc} resynced")),  # restores it
            (key, append(doc, 8, f"{doc} resynced", " and edited")[0]),
        ]
    produce_many(deployment.broker.bootstrap, s.edits_topic, items)

    def done() -> bool:
        return all(answered(reader, s.classes_topic)[(d, 8)] for d in POISON)

    assert reader.wait_for(done, timeout_s=120), "a poisoned document was not resynced"
    for doc in POISON:
        records = [r for r in reader.of(s.classes_topic) if r["doc_id"] == doc]
        assert [(r["rev"], r["sha1"]) for r in records] == [
            (0, sha1_hex(f"{doc} before the poison")), (7, sha1_hex(f"{doc} resynced")),
            (8, sha1_hex(f"{doc} resynced and edited"))]
        letters = [r for r in reader.of(s.dlq_topic)
                   if r["event"] and f'"doc_id": "{doc}"' in r["event"]]
        assert [r["reason"] for r in letters] == ["state_unreadable", "awaiting_snapshot"], doc
    page = healed.worker.scrape()
    assert metric(page, "incstream_unreadable_states_total") == len(POISON)
    reasons = metric_by(page, "incstream_dead_letters_total", "reason")
    assert reasons["state_unreadable"] == reasons["awaiting_snapshot"] == len(POISON)
    assert reasons["internal_error"] == 0  # every reason is exported, from 0


def test_oversized_events_are_dead_lettered_with_an_excerpt_size_and_hash(
    deployment, healed, reader
):
    """A 5.1 MB snapshot and a 20 MB value that is not JSON: over max_event_bytes, each one
    dead letter that fits the topic (before: MessageSizeTooLargeError, no trace at all)."""
    s = deployment.settings
    big_snapshot = snapshot("big-doc", 0, "word " * 1_020_000)
    not_json = b"{" + b"\x01 not json " * 1_820_000
    assert len(big_snapshot) > 5_000_000 and len(not_json) > 20_000_000
    before = len(reader.of(s.dlq_topic))
    produce_many(deployment.broker.bootstrap, s.edits_topic,
                 [(b"big-doc", big_snapshot), (b"not-json-doc", not_json)])
    assert reader.wait_for(lambda: len(reader.of(s.dlq_topic)) >= before + 2, timeout_s=120)
    letters = {r.get("event_sha1"): r for r in reader.of(s.dlq_topic)[before:]}
    for sent in (big_snapshot, not_json):
        letter = letters[hashlib.sha1(sent).hexdigest()]
        assert letter["reason"] == "event_too_large" and letter["event_truncated"] is True
        assert letter["event_bytes"] == len(sent)
        assert sent.decode("utf-8").startswith(letter["event"])
        assert len(letter["event"]) == EVENT_EXCERPT_CHARS
        assert len(json.dumps(letter).encode()) < DEAD_LETTER_MAX_BYTES
        assert str(len(sent)) in letter["error"]
    assert healed.worker.alive()
    assert "big-doc" not in {r["doc_id"] for r in reader.of(s.classes_topic)}


def test_fuzz_thousands_of_hostile_events_between_valid_edits(deployment, healed, reader):
    """Seeded: every hostile event is dead-lettered once with the reason it deserves (never
    internal_error), every valid revision is answered once with the right hash, the worker
    never crashes, and the DLQ counter counts every rejection."""
    s = deployment.settings
    stream = fuzz_stream(FUZZ_SEED, docs=12, edits_per_doc=40, hostile=2000, oversize=3,
                         max_event_bytes=MAX_EVENT_BYTES)
    assert sum(stream.dead.values()) == 2000 and len(stream.texts) == 12 * 41
    assert len(stream.kinds) >= 15, stream.kinds  # every kind of hostile input is in there
    page = healed.worker.scrape()
    dlq_before = len(reader.of(s.dlq_topic))
    counted_before = sum(metric_by(page, "incstream_dead_letters_total", "reason").values())
    started = time.monotonic()
    produce_many(deployment.broker.bootstrap, s.edits_topic, stream.items)

    def done() -> bool:
        return (len(reader.of(s.dlq_topic)) - dlq_before >= 2000
                and set(answered(reader, s.classes_topic)) >= set(stream.texts))

    assert reader.wait_for(done, timeout_s=240), "the fuzz stream was not fully handled"
    seconds = time.monotonic() - started
    letters = reader.of(s.dlq_topic)[dlq_before:]
    got = Counter((r["reason"], dead_letter_identity(r)) for r in letters)
    assert got == stream.dead, (got - stream.dead, stream.dead - got)
    assert {reason for reason, _ in got} <= set(DEAD_LETTER_REASONS)
    assert all(r["schema"] == "doc-edit-dlq/v1" and r["error"] for r in letters)
    counts = answered(reader, s.classes_topic)
    assert [key for key in stream.texts if counts[key] != 1] == [], "answered twice or never"
    sha1s = {(r["doc_id"], r["rev"]): r["sha1"] for r in reader.of(s.classes_topic)}
    assert {key: sha1s[key] for key in stream.texts} == {
        key: sha1_hex(text) for key, text in stream.texts.items()}
    assert healed.worker.alive()
    page = healed.worker.scrape()
    reasons = metric_by(page, "incstream_dead_letters_total", "reason")
    assert sum(reasons.values()) - counted_before == 2000
    assert reasons["internal_error"] == 0  # every reason is exported, from 0
    assert metric(page, "incstream_dead_letter_failures_total") == 0
    print(f"fuzz: {len(stream.items)} events ({dict(stream.kinds)}) handled in {seconds:.1f} s")
    assert identity(None) == "tombstone"


def flush_and_flip_bytes(store: Path) -> None:
    """Write the store's memtable into an .sst (as a long-running worker's data is), then flip
    64 bytes in the middle of its largest .sst: a data block of documents, away from the first
    block (Faust's offset key sorts first) and the index at the end."""
    db = Rdict(str(store), options=Options(raw_mode=True))
    db.flush()
    db.close()
    sst = max(store.glob("*.sst"), key=lambda path: path.stat().st_size)
    data = bytearray(sst.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    sst.write_bytes(bytes(data))


def test_a_corruption_met_while_running_exits_and_the_restart_rebuilds_the_store(
    deployment, healed, reader
):
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    data_dir = healed.worker.data_dir
    bulky = {f"bulky-{i:03d}": f"bulky document {i}: " + "lorem ipsum dolor sit amet " * 80
             for i in range(200)}  # ~2 KB each: many RocksDB blocks per store
    produce_many(bootstrap, s.edits_topic, [(d.encode(), snapshot(d, 0, t))
                                            for d, t in bulky.items()])
    assert reader.wait_for(lambda: set(answered(reader, s.classes_topic)) >= {
        (d, 0) for d in bulky}, timeout_s=120)
    assert healed.worker.stop()[0] == 0
    stores = sorted((data_dir / "v1" / "tables").glob(f"{s.table_name}-*.db"))
    for store in stores:
        flush_and_flip_bytes(store)

    unchecked = deployment.worker(data_dir=data_dir, name="unchecked", model="none",
                                  env={"INCSTREAM_VERIFY_STORE_AT_START": "false"}).start()
    try:
        unchecked.wait_ready()
        edits = {d: append(d, 1, t, " (edited)") for d, t in bulky.items()}
        produce_many(bootstrap, s.edits_topic, [(d.encode(), e) for d, (e, _) in edits.items()])
        assert unchecked.wait_exit(timeout_s=120) == EXIT_STORE_DAMAGED
    finally:
        unchecked.kill()
    markers = list(stores[0].parent.glob("*.db.damaged"))
    assert markers and "Corruption" in markers[0].read_text()

    restarted = deployment.worker(data_dir=data_dir, name="restarted", model="none").start()
    try:
        restarted.wait_ready()
        assert reader.wait_for(lambda: set(answered(reader, s.classes_topic)) >= {
            (d, 1) for d in bulky}, timeout_s=120), "not every revision answered after healing"
        sha1s = {(r["doc_id"], r["rev"]): r["sha1"] for r in reader.of(s.classes_topic)}
        assert {d: sha1s[(d, 1)] for d in bulky} == {d: sha1_hex(t) for d, (_, t) in
                                                     edits.items()}
        assert metric(restarted.scrape(), "incstream_store_rebuilds_total") == len(stores)
        log = (deployment.root / "restarted.log").read_text("utf-8", errors="replace")
        assert "a running worker met a corruption" in log
        assert not list(stores[0].parent.glob("*.db.damaged")), "markers are consumed"
    finally:
        restarted.stop()
