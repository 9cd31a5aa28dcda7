"""Crash a worker with SIGKILL mid-stream; its restart must lose nothing.

Twice: once restarting on the same RocksDB directory, once on an empty one (state comes back
from the Kafka changelog alone).
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from pipeline.producer import read_events, replay
from pipeline.stream_files import select_events
from pipeline.topic_reader import TopicReader

pytestmark = pytest.mark.integration


def test_sigkill_mid_stream_then_restart_loses_nothing(make_deployment, tmp_path, hunks_stream):
    deployment = make_deployment(tmp_path)
    s = deployment.settings
    events = select_events(read_events(hunks_stream), docs=12)
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
        assert reader.wait_for(lambda: answered() >= set(expected), timeout_s=240), (
            f"missing after restarts: {sorted(set(expected) - answered())[:5]}"
        )
        code, _ = worker.stop()
        assert code == 0
    finally:
        reader.stop()
        worker.kill()

    # Every revision answered with the right text; duplicates (at-least-once replays) carry
    # exactly the same content as the original answer.
    contents = defaultdict(set)
    for record in reader.of(s.classes_topic):
        key = (record["doc_id"], record["rev"])
        contents[key].add((record["sha1"], record["length_chars"], record["length_tokens"]))
    for key, sha1 in expected.items():
        assert len(contents[key]) == 1, f"{key} answered with different contents"
        if sha1:
            assert next(iter(contents[key]))[0] == sha1
    assert reader.of(s.dlq_topic) == [], "a crash must not turn good events into dead letters"
    assert answered_at_crash_1 <= answered_at_crash_2
