"""Crash workers; their restarts must resume where the group committed and lose nothing.

1. SIGKILL mid-stream, twice: once restarting on the same RocksDB directory, once on an empty
   one (state comes back from the Kafka changelog alone). The stream is sent in three stages,
   so each kill leaves events to process, and every document still has revisions to apply
   after the second kill. What each restart consumed is checked against the offsets the
   group had committed, so a restart that replayed from offset 0 fails.
2. A deterministic crash between the publish and the table write
   (INCSTREAM_TEST_CRASH_AFTER_PUBLISH): the restart redoes that revision and publishes the
   identical update, once more; nothing is lost. (Publish after the write, and the update is
   lost or never redone: the test fails.)

The workers run the default model: a restarted worker's hot session cache is empty, so its
answers come from sessions rebuilt from the durable text, and they must be the answers the
uninterrupted worker would have given.
"""

from __future__ import annotations

import math
import signal
import time
from collections import Counter, defaultdict

import pytest
from answers import assert_same_answer
from kafka_tools import committed_offsets
from prom import metric, samples

from incstream.engine.incremental.text_ops import apply_ops, sha1_hex
from incstream.pipeline.producer import read_events, replay
from incstream.pipeline.stream_files import select_events
from incstream.pipeline.topic_reader import TopicReader

pytestmark = pytest.mark.integration


def staged(events: list[dict], cuts: tuple[float, ...]) -> list[list[dict]]:
    """The stream in len(cuts)+1 stages, in order: stage k holds each document's events from
    fraction cuts[k-1] to cuts[k] of them."""
    per_doc = Counter(e["doc_id"] for e in events)
    seen: Counter = Counter()
    stages: list[list[dict]] = [[] for _ in range(len(cuts) + 1)]
    for event in events:
        doc = event["doc_id"]
        stage = sum(seen[doc] >= round(per_doc[doc] * cut) for cut in cuts)
        seen[doc] += 1
        stages[stage].append(event)
    return stages


def texts_of(events: list[dict]) -> dict[tuple[str, int], str]:
    texts, current = {}, {}
    for event in events:
        doc = event["doc_id"]
        current[doc] = (event["snapshot"] if "snapshot" in event
                        else apply_ops(current[doc], event["ops"])[0])
        texts[(doc, event["rev"])] = current[doc]
    return texts


def consumed(worker) -> dict[str, float]:
    """incstream_events_total by outcome, from the worker's /metrics."""
    return {dict(labels)["outcome"]: value
            for labels, value in samples(worker.scrape(), "incstream_events_total").items()}


def settle(reader: TopicReader, topic: str, quiet_s: float = 2.0) -> int:
    """After a kill: wait until the reader has had nothing new for `quiet_s` (the dead worker
    publishes nothing more); returns how many records it has."""
    count, since = len(reader.of(topic)), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.2)
        if len(reader.of(topic)) != count:
            count, since = len(reader.of(topic)), time.monotonic()
    return count


def redelivered(worker) -> float:
    """Events the worker was handed again at an offset it had already handled: a restarted
    Faust worker may deliver events fetched while its table recovered, then again after its
    seek to the committed offsets. Each is also counted as a duplicate."""
    return metric(worker.scrape(), "incstream_redelivered_events_total")


def test_sigkill_mid_stream_then_restarts_resume_from_the_committed_offsets(
    make_deployment, tmp_path, demo_stream, fresh_classify
):
    deployment = make_deployment(tmp_path)
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    events = select_events(read_events(demo_stream))
    total = len(events)
    stage1, stage2, stage3 = staged(events, (0.5, 0.8))
    texts = texts_of(events)
    docs = {e["doc_id"] for e in events}
    assert all(any(e["doc_id"] == doc for e in stage3) for doc in docs)
    reader = TopicReader(bootstrap, [s.classes_topic, s.dlq_topic]).start()

    def answered() -> set:
        return {(r["doc_id"], r["rev"]) for r in reader.of(s.classes_topic)}

    def committed() -> int:
        return sum(committed_offsets(bootstrap, s.app_id, s.edits_topic).values())

    def redone(since: int, before: set) -> int:
        """Updates published after record `since` for revisions answered before."""
        return sum((r["doc_id"], r["rev"]) in before for r in reader.of(s.classes_topic)[since:])

    def stuck(worker, what: str) -> AssertionError:
        worker.process.send_signal(signal.SIGUSR1)  # its thread stacks, into its log
        time.sleep(1)
        return AssertionError(f"{what}; see {tmp_path}")

    worker = None
    try:
        # Crash 1: stage 1 sent; SIGKILL once a quarter of the stream is answered.
        worker = deployment.worker(data_dir=tmp_path / "data-a", name="w1").start()
        worker.wait_ready()
        replay(stage1, bootstrap, s.edits_topic, progress=False)
        if not reader.wait_for(lambda: len(answered()) >= total // 4, timeout_s=180):
            raise stuck(worker, "w1 answered too little")
        worker.kill()
        mark1 = settle(reader, s.classes_topic)
        answered1, committed1 = answered(), committed()
        assert 0 < committed1 <= len(answered1) < len(stage1), (
            f"kill 1 must come mid-stream, after a commit: {committed1} events committed, "
            f"{len(answered1)} answered of {len(stage1)} sent")

        # Restart on the same data dir; stage 2 sent; SIGKILL mid-way through it.
        worker = deployment.worker(data_dir=tmp_path / "data-a", name="w2").start()
        worker.wait_ready()
        replay(stage2, bootstrap, s.edits_topic, progress=False)
        sent2 = len(stage1) + len(stage2)
        # It resumed from the committed offsets: it sees again exactly the events w1 had
        # handled after its last commit, each either a duplicate (w1 had written its state)
        # or redone (w1 had published but not written it). From offset 0, it would see all
        # of w1's events again.
        uncommitted1 = len(answered1) - committed1

        def resumed_and_half_way() -> bool:
            return (len(answered()) >= len(stage1) + len(stage2) // 2
                    and consumed(worker)["duplicate"] + redone(mark1, answered1)
                    >= uncommitted1)

        if not reader.wait_for(resumed_and_half_way, timeout_s=180):
            raise stuck(worker, f"w2: {consumed(worker)}, {len(answered())} answered")
        outcomes2, again2 = consumed(worker), redelivered(worker)
        worker.kill()
        mark2 = settle(reader, s.classes_topic)
        answered2, committed2 = answered(), committed()
        redone2 = redone(mark1, answered1)
        seen_again = outcomes2["duplicate"] - again2 + redone2
        assert seen_again == uncommitted1, (
            f"w2 saw {seen_again} of w1's events again; {uncommitted1} were not committed "
            f"({outcomes2}, {again2} redelivered, {redone2} redone)")
        assert redone2 <= len(docs), (
            "the same data dir has every written state: one step in flight at most (an event "
            "per document)")
        assert committed1 < committed2 <= len(answered2) < sent2, (
            f"kill 2 must come mid-stream: {committed2} committed, {len(answered2)} answered "
            f"of {sent2} sent")

        # Restart on an EMPTY data dir: the changelog must carry the state.
        worker = deployment.worker(data_dir=tmp_path / "data-b", name="w3").start()
        worker.wait_ready()
        replay(stage3, bootstrap, s.edits_topic, progress=False)
        if not reader.wait_for(lambda: answered() >= set(texts), timeout_s=240):
            raise stuck(worker, f"missing after restarts: {sorted(set(texts) - answered())[:5]}")
        # It consumed what was not committed when w2 died, nothing from before (and answered
        # anew exactly what w2 had not answered, plus what it redid).
        uncommitted2 = total - committed2
        for _ in range(50):
            outcomes3, again3 = consumed(worker), redelivered(worker)
            if sum(outcomes3.values()) - again3 >= uncommitted2 and (
                    outcomes3["ok"] + outcomes3["duplicate"] == sum(outcomes3.values())):
                break
            time.sleep(0.2)
        redone3 = redone(mark2, answered2)
        assert sum(outcomes3.values()) - again3 == uncommitted2, (
            f"w3 consumed {outcomes3} ({again3} of them redelivered); {uncommitted2} events "
            f"were not committed")
        assert outcomes3["ok"] == total - len(answered2) + redone3, (outcomes3, redone3)
        assert outcomes3["gap"] == outcomes3["dlq"] == 0
        code, _ = worker.stop()
        assert code == 0
    finally:
        reader.stop()
        if worker is not None:
            worker.kill()

    records = reader.of(s.classes_topic)
    assert reader.of(s.dlq_topic) == [], "a crash must not turn good events into dead letters"
    # Every revision answered with the right text; duplicates (at-least-once replays, answered
    # from a rebuilt session) carry the same content and answer as the original.
    contents = defaultdict(set)
    scores = defaultdict(list)
    for record in records:
        key = (record["doc_id"], record["rev"])
        contents[key].add((record["sha1"], record["length_chars"], record["length_tokens"],
                           record["label"], record["label_changed"]))
        scores[key].append(record["scores"])
    assert set(contents) == set(texts)
    for key, text in texts.items():
        assert len(contents[key]) == 1, f"{key} answered with different contents: " \
            f"{contents[key]}"
        assert next(iter(contents[key]))[0] == sha1_hex(text)
        first = scores[key][0]
        for other in scores[key][1:]:
            assert all(math.isclose(first[k], other[k], abs_tol=1.5e-9) for k in first), key
    # State came back from the changelog: w3's first update of every document is an edit
    # (never a snapshot) applied to the restored text, built fresh (its cache was empty), with
    # the right answer; its label_changed compares with the label restored with the state.
    previous_label = {(r["doc_id"], r["rev"]): r["label"] for r in records[:mark2]}
    for doc in docs:
        first = next(r for r in records[mark2:] if r["doc_id"] == doc)
        assert not first["snapshot"] and first["rev"] > 0, first
        assert first["cost"]["cache"] == "miss", first
        assert_same_answer(first, fresh_classify(texts[(doc, first["rev"])]),
                           f"{doc} r{first['rev']} after the restore")
        assert first["label_changed"] == (
            first["label"] != previous_label[(doc, first["rev"] - 1)]), first
    # And each document's last answer equals classifying its final text from scratch.
    for doc in docs:
        last = max((r for r in records if r["doc_id"] == doc), key=lambda r: r["rev"])
        assert_same_answer(last, fresh_classify(texts[(doc, last["rev"])]),
                           f"{doc} r{last['rev']}")


def replace_ops(old: str, new: str) -> list[dict]:
    """doc-edit/v1 ops that turn `old` into `new` (one replaced span)."""
    shortest = min(len(old), len(new))
    head = next((i for i in range(shortest) if old[i] != new[i]), shortest)
    tail = next((i for i in range(shortest - head) if old[-1 - i] != new[-1 - i]),
                shortest - head)
    return [{"retain": head}, {"delete": len(old) - head - tail},
            {"insert": new[head:len(new) - tail]}]


CRASH_DOC = "crash-doc"
CRASH_REV = 2


def test_a_crash_between_publish_and_table_write_redoes_the_identical_update(
    make_deployment, tmp_path, fresh_classify
):
    deployment = make_deployment(tmp_path)
    s = deployment.settings
    bootstrap = deployment.broker.bootstrap
    texts = ["It was a bright cold day in April",
             "It was a bright cold day in April, and the clocks were striking thirteen.",
             "It was a bright cold day in April, and the clocks were striking thirteen. "
             "Winston slipped quickly through the glass doors.",
             "It was a wonderful bright day in April, and the clocks were striking thirteen. "
             "Winston slipped quickly through the glass doors.",
             "It was a wonderful bright day in April, and the clocks were striking thirteen. "
             "Winston slipped quickly through the glass doors, happy at last."]
    events = [{"schema": "doc-edit/v1", "doc_id": CRASH_DOC, "rev": 0, "snapshot": texts[0]}]
    for rev in range(1, len(texts)):
        ops = replace_ops(texts[rev - 1], texts[rev])
        assert apply_ops(texts[rev - 1], ops)[0] == texts[rev]
        events.append({"schema": "doc-edit/v1", "doc_id": CRASH_DOC, "rev": rev,
                       "base_rev": rev - 1, "ops": ops, "sha1_after": sha1_hex(texts[rev])})
    reader = TopicReader(bootstrap, [s.classes_topic, s.dlq_topic]).start()

    def updates() -> list[dict]:
        return [r for r in reader.of(s.classes_topic) if r["doc_id"] == CRASH_DOC]

    worker = deployment.worker(
        data_dir=tmp_path / "data", name="w1",
        env={"INCSTREAM_TEST_CRASH_AFTER_PUBLISH": f"{CRASH_DOC}:{CRASH_REV}"}).start()
    try:
        worker.wait_ready()
        replay(events, bootstrap, s.edits_topic, progress=False)
        code = worker.wait_exit(timeout_s=180)
        assert code == -signal.SIGKILL, f"the hook did not kill the worker (exit {code})"
        settle(reader, s.classes_topic)
        # Rev 2's update was acknowledged before the worker died; nothing after it.
        assert [r["rev"] for r in updates()] == [0, 1, 2]
        committed = sum(committed_offsets(bootstrap, s.app_id, s.edits_topic).values())

        worker = deployment.worker(data_dir=tmp_path / "data", name="w2").start()
        worker.wait_ready()
        if not reader.wait_for(lambda: {r["rev"] for r in updates()} >= set(range(len(texts))),
                               timeout_s=180):
            raise AssertionError(f"lost after the crash: {[r['rev'] for r in updates()]}")
        page = worker.scrape()
        code, _ = worker.stop()
        assert code == 0
    finally:
        reader.stop()
        worker.kill()

    records = updates()
    # Revs 0 and 1 were written before the crash (redelivered: duplicates, not republished);
    # rev 2 was published, not written: redone, and published a second time.
    assert Counter(r["rev"] for r in records) == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
    first, again = [r for r in records if r["rev"] == CRASH_REV]
    fields = ("schema", "doc_id", "rev", "snapshot", "length_chars", "length_tokens", "sha1",
              "change", "label", "scores", "label_changed", "model", "ts_event")
    assert {f: again[f] for f in fields} == {f: first[f] for f in fields}
    assert (first["cost"]["cache"], again["cost"]["cache"]) == ("hit", "miss")
    # w2 resumed from the committed offset: revs 0 and 1 again, unless committed.
    assert (metric(page, "incstream_events_total", outcome="duplicate")
            - metric(page, "incstream_redelivered_events_total")) == max(0, 2 - committed)
    assert metric(page, "incstream_events_total", outcome="ok") == 3
    assert reader.of(s.dlq_topic) == []
    for record in records:
        assert record["sha1"] == sha1_hex(texts[record["rev"]])
        assert_same_answer(record, fresh_classify(texts[record["rev"]]), f"rev {record['rev']}")
