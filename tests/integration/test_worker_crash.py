"""Crash a worker with SIGKILL mid-stream; its restart must lose nothing.

Twice: once restarting on the same RocksDB directory, once on an empty one (state comes back
from the Kafka changelog alone). The worker runs the default model: a restarted worker's hot
session cache is empty, so its answers come from sessions rebuilt from the durable text, and
they must be the answers the uninterrupted worker would have given.
"""

from __future__ import annotations

import math
import signal
import time
from collections import defaultdict

import pytest
from answers import assert_same_answer

from engine.text_ops import apply_ops
from pipeline.producer import read_events, replay
from pipeline.stream_files import select_events
from pipeline.topic_reader import TopicReader

pytestmark = pytest.mark.integration


def test_sigkill_mid_stream_then_restart_loses_nothing(make_deployment, tmp_path, demo_stream,
                                                       fresh_classify):
    deployment = make_deployment(tmp_path)
    s = deployment.settings
    events = select_events(read_events(demo_stream))
    expected = {(e["doc_id"], e["rev"]): e.get("sha1_after") for e in events}
    reader = TopicReader(deployment.broker.bootstrap, [s.classes_topic, s.dlq_topic]).start()

    def answered() -> set:
        return {(r["doc_id"], r["rev"]) for r in reader.of(s.classes_topic)}

    try:
        # Crash 1: mid-stream, restart on the same data directory.
        worker = deployment.worker(data_dir=tmp_path / "data-a", name="w1").start()
        worker.wait_serving()
        replay(events, deployment.broker.bootstrap, s.edits_topic, progress=False)
        first_third = len(events) // 3
        assert reader.wait_for(lambda: len(answered()) >= first_third, timeout_s=180)
        worker.kill()
        answered_at_crash_1 = len(answered())
        assert answered_at_crash_1 < len(expected), "crash came too late to mean anything"

        worker = deployment.worker(data_dir=tmp_path / "data-a", name="w2").start()
        assert reader.wait_for(lambda: len(answered()) >= 2 * len(expected) // 3,
                               timeout_s=180)
        worker.kill()
        answered_at_crash_2 = len(answered())

        # Crash 2 done; restart on an EMPTY data directory: the changelog must carry the state.
        worker = deployment.worker(data_dir=tmp_path / "data-b", name="w3").start()
        if not reader.wait_for(lambda: answered() >= set(expected), timeout_s=240):
            worker.process.send_signal(signal.SIGUSR1)  # its thread stacks, into w3.log
            time.sleep(1)
            raise AssertionError(f"missing after restarts: "
                                 f"{sorted(set(expected) - answered())[:5]}; see {tmp_path}")
        code, _ = worker.stop()
        assert code == 0
    finally:
        reader.stop()
        worker.kill()

    # Every revision answered with the right text; duplicates (at-least-once replays, answered
    # from a rebuilt session) carry the same content and answer as the original.
    records = reader.of(s.classes_topic)
    contents = defaultdict(set)
    scores = defaultdict(list)
    for record in records:
        key = (record["doc_id"], record["rev"])
        contents[key].add((record["sha1"], record["length_chars"], record["length_tokens"],
                           record["label"], record["label_changed"]))
        scores[key].append(record["scores"])
    for key, sha1 in expected.items():
        assert len(contents[key]) == 1, f"{key} answered with different contents: " \
            f"{contents[key]}"
        if sha1:
            assert next(iter(contents[key]))[0] == sha1
        first = scores[key][0]
        for other in scores[key][1:]:
            assert all(math.isclose(first[k], other[k], abs_tol=1.5e-9) for k in first), key
    assert reader.of(s.dlq_topic) == [], "a crash must not turn good events into dead letters"
    assert answered_at_crash_1 <= answered_at_crash_2
    # Restarts started with an empty session cache: some answers came from rebuilt sessions
    # (beyond each document's first snapshot), and the final answers equal fresh ones.
    docs = {doc for doc, _ in expected}
    rebuilt = sum(r["cost"]["cache"] != "hit" for r in records)
    assert rebuilt > len(docs), f"only {rebuilt} answers were not cache hits"
    texts: dict[str, str] = {}
    for event in events:
        doc = event["doc_id"]
        texts[doc] = event["snapshot"] if "snapshot" in event else apply_ops(texts[doc],
                                                                             event["ops"])[0]
    for doc, text in texts.items():
        last = max((r for r in records if r["doc_id"] == doc), key=lambda r: r["rev"])
        assert_same_answer(last, fresh_classify(text), f"{doc} r{last['rev']}")
