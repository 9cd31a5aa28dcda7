"""A seeded stream of valid edits with hostile events interleaved, and what each must become.

Every hostile event comes with the dead-letter reason the worker must give it. Events that need
a document's state to be judged (ops past the end, a wrong checksum, ...) carry the revision
the document expects next, so they are really evaluated against its text and rejected; the
valid event of that revision follows later. Nothing hostile changes a document, so the valid
events alone say what every revision's text is.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field

from incstream.engine.incremental.text_ops import apply_ops, sha1_hex

SCHEMA = "doc-edit/v1"
WORDS = ["the", "quick", "brown", "fox", "café", "naïve", "😀", "über", "jumps", "over",
         "lazy", "dog", "日本語", "data", "stream", "edit", "\t", "\n", "Ω"]


def identity(value: bytes | None) -> str:
    """How a dead letter names the event it carries: the SHA-1 of its bytes."""
    return "tombstone" if value is None else hashlib.sha1(value).hexdigest()


def dead_letter_identity(record: dict) -> str:
    """The identity of the event a doc-edit-dlq/v1 record carries (whole or excerpted)."""
    if record.get("event_truncated"):
        return record["event_sha1"]
    if "event_base64" in record:
        import base64

        return identity(base64.b64decode(record["event_base64"]))
    if record["event"] is None:
        return "tombstone"
    return identity(record["event"].encode("utf-8"))


def dumps(body: object) -> bytes:
    """As a producer would send it; \\u escapes keep lone surrogates as JSON can carry them."""
    return json.dumps(body, ensure_ascii=True).encode("ascii")


@dataclass
class FuzzStream:
    items: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)
    dead: Counter = field(default_factory=Counter)  # (reason, identity) -> how many
    kinds: Counter = field(default_factory=Counter)  # hostile kind -> how many
    texts: dict[tuple[str, int], str] = field(default_factory=dict)  # valid (doc, rev) -> text

    def hostile(self, kind: str, key: bytes | None, value: bytes | None, reason: str) -> None:
        self.items.append((key, value))
        self.dead[(reason, identity(value))] += 1
        self.kinds[kind] += 1


@dataclass
class Doc:
    doc_id: str
    rev: int = -1
    text: str = ""

    @property
    def key(self) -> bytes:
        return self.doc_id.encode("utf-8")


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _valid_edit(rng: random.Random, doc: Doc) -> tuple[bytes, str]:
    rev = doc.rev + 1
    if rev == 0:
        text = _words(rng, 5, 40)
        return dumps({"schema": SCHEMA, "doc_id": doc.doc_id, "rev": 0, "snapshot": text}), text
    at = rng.randint(0, len(doc.text))
    cut = rng.randint(0, min(8, len(doc.text) - at))
    ops = [{"retain": at}, {"delete": cut}, {"insert": _words(rng, 0, 3)}]
    text, _ = apply_ops(doc.text, ops)
    body = {"schema": SCHEMA, "doc_id": doc.doc_id, "rev": rev, "ops": ops,
            "sha1_after": sha1_hex(text)}
    if rng.random() < 0.3:
        body.update(base_rev=doc.rev, len_after=len(text))
    return dumps(body), text


def _parse_level(rng: random.Random, doc: Doc, stream: FuzzStream) -> None:
    """Hostile events the worker rejects before it looks the document up."""
    d, rev = doc.doc_id, doc.rev + 1
    good = {"schema": SCHEMA, "doc_id": d, "rev": rev, "ops": [{"insert": "x"}]}
    kind = rng.choice(["random_bytes", "truncated", "not_utf8", "tombstone", "non_object",
                       "unknown_schema", "wrong_types", "huge_numbers", "lone_surrogate",
                       "deep_nesting", "long_doc_id", "bad_key"])
    key = doc.key
    if kind == "random_bytes":
        stream.hostile(kind, key, b"#" + rng.randbytes(rng.randint(0, 300)), "invalid_json")
    elif kind == "truncated":
        whole = dumps({**good, "note": _words(rng, 1, 20)})
        stream.hostile(kind, key, whole[:rng.randint(1, len(whole) - 1)], "invalid_json")
    elif kind == "not_utf8":
        stream.hostile(kind, key, dumps(good)[:-1] + b', "x": "\xff\xfe"}', "invalid_json")
    elif kind == "tombstone":
        stream.hostile(kind, key, None, "invalid_json")
    elif kind == "non_object":
        value = rng.choice([b"[1, 2]", b"3", b'"a string"', b"null", b"true", b"-1e5"])
        stream.hostile(kind, key, value, "invalid_event")
    elif kind == "unknown_schema":
        schema = rng.choice(["doc-edit/v2", None, 7, "x" * 100_000, ["doc-edit/v1"]])
        body = {**good, "schema": schema} if schema is not None else {
            k: v for k, v in good.items() if k != "schema"}
        stream.hostile(kind, key, dumps(body), "unknown_schema")
    elif kind == "wrong_types":
        name, value = rng.choice([
            ("doc_id", 7), ("doc_id", ""), ("doc_id", ["d"]), ("doc_id", None),
            ("rev", "1"), ("rev", 1.5), ("rev", None), ("rev", True), ("rev", [1]), ("rev", -3),
            ("ops", {"insert": "x"}), ("ops", "insert x"), ("ops", 5), ("snapshot", 5),
            ("base_rev", "x"), ("base_rev", -1), ("len_after", 1.5), ("sha1_after", "abc"),
            ("sha1_after", 5), ("ts", "now"), ("ts", True)])
        body = {**good, name: value}
        if name == "snapshot":
            body.pop("ops")
        stream.hostile(kind, key, dumps(body), "invalid_event")
    elif kind == "huge_numbers":
        choice = rng.randrange(6)
        if choice == 0:
            value = dumps({**good, "rev": rng.choice([2**63, 10**100, -(2**70)])})
        elif choice == 1:
            value = dumps({**good, "base_rev": 2**64})
        elif choice == 2:
            value = dumps({**good, "len_after": 10**30})
        elif choice == 3:
            value = dumps(good)[:-1] + rng.choice(
                [b', "ts": 1e999}', b', "ts": NaN}', b', "ts": -Infinity}', b', "ts": 1e30}'])
        elif choice == 4:
            value = dumps({**good, "ts": 10**30})
        else:  # past Python's 4300-digit limit for int(): not JSON this worker accepts
            stream.hostile(kind, key, dumps(good).replace(
                f'"rev": {rev}'.encode(), b'"rev": 1' + b"0" * 5000), "invalid_json")
            return
        stream.hostile(kind, key, value, "invalid_event")
    elif kind == "lone_surrogate":
        choice = rng.randrange(3)
        if choice == 0:
            body = {**good, "ops": None, "snapshot": "text \ud800 more"}
            body.pop("ops")
        elif choice == 1:
            body = {**good, "ops": [{"retain": 0}, {"insert": "\udc00"}]}
        else:
            body = {**good, "doc_id": d + "\ud83d"}
        stream.hostile(kind, key, dumps(body), "invalid_text")
    elif kind == "deep_nesting":
        depth = rng.choice([5_000, 50_000])
        nested = b"[" * depth + b"]" * depth
        value = nested if rng.random() < 0.5 else dumps(good)[:-1] + b', "note": ' + nested + b"}"
        stream.hostile(kind, key, value, "invalid_json")
    elif kind == "long_doc_id":
        stream.hostile(kind, key, dumps({**good, "doc_id": d * (2000 // len(d) + 1)}),
                       "invalid_event")
    else:  # bad_key: a well-formed event under another key (or none)
        other = rng.choice([None, b"someone-else", rng.randbytes(3000), b"\xff\xfe",
                            key + b" "])
        stream.items.append((other, dumps(good)))
        stream.dead[("key_mismatch", identity(dumps(good)))] += 1
        stream.kinds[kind] += 1


def _state_level(rng: random.Random, doc: Doc, stream: FuzzStream) -> None:
    """Hostile events that parse and carry the revision the document expects next: the worker
    rejects them only after applying them to its text."""
    d, rev, n = doc.doc_id, doc.rev + 1, len(doc.text)
    base = {"schema": SCHEMA, "doc_id": d, "rev": rev}
    insert = [{"retain": n}, {"insert": " tail"}]
    kind, ops, extra, reason = rng.choice([
        ("unknown_op", [{"move": 3}], {}, "invalid_ops"),
        ("unknown_op", [{"retain": -1}], {}, "invalid_ops"),
        ("unknown_op", [{"retain": 1, "insert": "x"}], {}, "invalid_ops"),
        ("unknown_op", ["retain"], {}, "invalid_ops"),
        ("unknown_op", [{"insert": 5}], {}, "invalid_ops"),
        ("unknown_op", [{"delete": 1.5}], {}, "invalid_ops"),
        ("unknown_op", [{"retain": True}], {}, "invalid_ops"),
        ("past_end", [{"retain": n + 1}], {}, "ops_past_end"),
        ("past_end", [{"delete": 2**70}], {}, "ops_past_end"),
        ("checksum", insert, {"sha1_after": "0" * 40}, "checksum_mismatch"),
        ("length", insert, {"len_after": n}, "length_mismatch"),
        ("base_rev", insert, {"base_rev": rev + 5}, "base_rev_mismatch"),
    ])
    stream.hostile(kind, doc.key, dumps({**base, "ops": ops, **extra}), reason)


def fuzz_stream(seed: int, docs: int, edits_per_doc: int, hostile: int, oversize: int,
                max_event_bytes: int) -> FuzzStream:
    """`docs` documents of a snapshot and `edits_per_doc` edits each, `hostile` hostile events
    between them (`oversize` of them just over `max_event_bytes`), in a seeded order."""
    rng = random.Random(seed)
    stream = FuzzStream()
    documents = [Doc(f"fuzz-{seed}-{i}") for i in range(docs)]
    valid_total = docs * (edits_per_doc + 1)
    big_at = set(rng.sample(range(hostile), oversize))
    sent_hostile = 0
    for step in range(valid_total):
        # Spread the hostile events evenly over the valid ones.
        while sent_hostile < hostile * (step + 1) // valid_total:
            doc = rng.choice(documents)
            if sent_hostile in big_at:
                pad = "x" * (max_event_bytes + 1000)
                stream.hostile("oversize", doc.key, dumps(
                    {"schema": SCHEMA, "doc_id": doc.doc_id, "rev": doc.rev + 1,
                     "snapshot": pad}), "event_too_large")
            elif doc.rev >= 0 and rng.random() < 0.35:
                _state_level(rng, doc, stream)
            else:
                _parse_level(rng, doc, stream)
            sent_hostile += 1
        doc = rng.choice([doc for doc in documents if doc.rev < edits_per_doc])
        value, text = _valid_edit(rng, doc)
        doc.rev, doc.text = doc.rev + 1, text
        stream.items.append((doc.key, value))
        stream.texts[(doc.doc_id, doc.rev)] = text
    return stream
