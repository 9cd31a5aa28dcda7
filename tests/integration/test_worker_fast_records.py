"""A fast-mode worker killed mid-history and restarted on an EMPTY data directory goes on with
the answers of an uninterrupted fast session: its chunk records (codes and position ids, in the
changelogged activations table) bring each document's session back, instead of a fresh build
that would answer differently (a fast session's state depends on its edit history)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prom import metric

from incstream.engine.benchmarks.bench import read_stream
from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession
from incstream.pipeline.producer import replay
from incstream.pipeline.topic_reader import TopicReader

pytestmark = pytest.mark.integration

TYPING = Path(__file__).resolve().parents[3] / "shared" / "data" / "edits" / "peps-typing.jsonl.gz"
EVENTS_PER_DOC = 70  # a typing history long enough that a fresh build answers differently
KILL_AFTER = 45  # answered revisions per document before the SIGKILL


def _history(path, docs: int) -> list[list[dict]]:
    out = []
    for doc_id, snapshot, events in read_stream(path, docs):
        first = {"schema": "doc-edit/v1", "doc_id": doc_id, "rev": 0, "snapshot": snapshot}
        edits = [e for e in events if "ops" in e][:EVENTS_PER_DOC]
        out.append([first] + [{**e, "rev": i + 1, "base_rev": i} for i, e in enumerate(edits)])
    return out


def test_fast_worker_restarted_on_an_empty_dir_answers_like_an_uninterrupted_one(
        make_deployment, tmp_path, fresh_session):
    deployment = make_deployment(tmp_path)
    s = deployment.settings
    histories = _history(TYPING, 2)
    # What an uninterrupted fast session answers at every revision (the worker's bundle and
    # chunking), and what a fresh fast build of the same text would answer instead.
    reference = fresh_session("x")
    model, tokenizer = reference.model, reference.tokenizer
    policy = ChunkPolicy(max_tokens=reference.policy.max_tokens)
    expected, fresh_apart = {}, 0.0
    for history in histories:
        session = DocumentSession(model, tokenizer, history[0]["snapshot"], policy,
                                  mode=FastModeConfig())
        for event in history:
            if "ops" in event:
                session.apply_ops(event["ops"])
            probs = torch.softmax(session.logits(), -1)
            expected[(event["doc_id"], event["rev"])] = probs
        fresh = DocumentSession(model, tokenizer, session.text, policy, mode=FastModeConfig())
        fresh_apart = max(fresh_apart,
                          float((torch.softmax(fresh.logits(), -1) - probs).abs().max()))
    # The test can fail: without the records the restarted worker would be this far off.
    assert fresh_apart > 1e-3, fresh_apart

    env = {"INCSTREAM_ENGINE_MODE": "fast"}
    bootstrap = deployment.broker.bootstrap
    reader = TopicReader(bootstrap, [s.classes_topic, s.dlq_topic]).start()
    worker = deployment.worker(data_dir=tmp_path / "a", name="w1", env=env).start()
    try:
        worker.wait_ready()
        replay([e for h in histories for e in h[: KILL_AFTER + 1]], bootstrap, s.edits_topic,
               progress=False)
        assert reader.wait_for(lambda: len(reader.of(s.classes_topic))
                               >= len(histories) * (KILL_AFTER + 1), timeout_s=240)
        assert metric(worker.scrape(), "incstream_chunk_record_bytes_total") > 0
        worker.kill()
        worker = deployment.worker(data_dir=tmp_path / "b", name="w2", env=env).start()
        worker.wait_ready()
        replay([e for h in histories for e in h[KILL_AFTER + 1 :]], bootstrap, s.edits_topic,
               progress=False)
        assert reader.wait_for(lambda: {(r["doc_id"], r["rev"]) for r in
                                        reader.of(s.classes_topic)} >= set(expected),
                               timeout_s=240)
        page = worker.scrape()
    finally:
        reader.stop()
        worker.kill()
    assert reader.of(s.dlq_topic) == []
    # w2 held no session: it brought each document back from its records.
    assert metric(page, "incstream_session_cache_misses_total") == 0
    worst = 0.0
    for record in reader.of(s.classes_topic):
        want = expected[(record["doc_id"], record["rev"])]
        got = torch.tensor([record["scores"][label] for label in model.head.labels],
                           dtype=want.dtype)
        worst = max(worst, float((got - want).abs().max()))
        assert record["label"] == model.head.labels[int(want.argmax())], record
    assert worst < 1e-4, worst
