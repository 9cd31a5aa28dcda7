"""Chunk records kept through a real RocksDB store across a real typing history: each edit
writes only its touched chunks and forgets the replaced ones, and the store alone brings the
session back with the same codes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rocksdict import Options, Rdict

sys.path.insert(0, str(Path(__file__).parent / "engine"))
from engine_streams import stream_docs  # noqa: E402

from incstream.engine.incremental.chunks import ChunkPolicy  # noqa: E402
from incstream.engine.incremental.fast_mode import FastModeConfig  # noqa: E402
from incstream.engine.incremental.session import DocumentSession  # noqa: E402
from incstream.engine.model.base_model import load_tokenizer  # noqa: E402
from incstream.engine.model.vq_model import VQModel  # noqa: E402
from incstream.state.activation_record import encode_chunk_record, mode_tag  # noqa: E402
from incstream.state.chunk_record_store import ChunkRecordStore, record_key  # noqa: E402


def test_store_follows_a_typing_history_and_brings_the_session_back(tmp_path):
    model, tokenizer = VQModel.load(device="cpu"), load_tokenizer()
    policy, config, tag = ChunkPolicy(max_tokens=128), FastModeConfig(), mode_tag("fast")
    (_, snapshot, events), = stream_docs("peps-typing.jsonl.gz", 1)
    db = Rdict(str(tmp_path / "activations"), options=Options(raw_mode=True))
    try:
        store = ChunkRecordStore(db, "polarity", tag)
        live = DocumentSession(model, tokenizer, snapshot, policy, mode=config)
        store.apply(store.changes("doc", live.chunk_records(), []))
        per_edit = []
        for event in [e for e in events if "ops" in e][:40]:
            report = live.apply_ops(event["ops"])
            changes = store.changes("doc", live.chunk_records(report.touched), report.removed)
            per_edit.append(store.apply(changes))
        # Nothing stale: exactly one record per chunk content of the live session.
        contents = [tuple(c.token_ids[1:-1].tolist()) for c in live.chunks]
        assert sorted(k for k, _ in db.items()) == sorted({record_key("doc", c)
                                                           for c in contents})
        # An edit writes its touched chunks only: ~79 B a token of a 128-row chunk.
        assert 0 < sorted(per_edit)[len(per_edit) // 2] < 128 * 85
        back = DocumentSession(model, tokenizer, live.text, policy, mode=config,
                               records=store.load("doc", contents))
        assert back.restored_chunks == len(live.chunks)
        for a, b in zip(live.chunks, back.chunks, strict=True):
            for la, lb in zip(a.layers, b.layers, strict=True):
                assert torch.equal(la.codes, lb.codes)
        # Records of another model, and damaged bytes, are skipped: those chunks get rebuilt.
        first, second = record_key("doc", contents[0]), record_key("doc", contents[1])
        db[first] = encode_chunk_record(live.chunk_records([0])[0], "other-model", tag)
        db[second] = b"ISA\x01garbage"
        assert len(store.load("doc", contents)) == len(contents) - 2
        assert (store.foreign, store.unreadable) == (1, 1)
    finally:
        db.close()
