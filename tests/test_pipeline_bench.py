"""`incstream bench pipeline`: what it counts, its rate, and that a failed run fails.

The accounting (pipeline.pipeline_bench.Tally / summarize) is tested on made-up arrivals; two
real runs (broker + text-only worker, ~25 s each) check a complete run's figures and that a
run with a dead-lettered revision exits 1 naming what was lost, without waiting for its
timeout; a third (~45 s) runs the three modes (incremental, chunk-cache peer, dense peer) on
a tiny stream and checks their figures and answers.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from incstream.engine.incremental.text_ops import sha1_hex
from incstream.pipeline.pipeline_bench import PROBE_DOC, Tally, summarize

BUNDLED = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "demo-edits.jsonl.gz"


def update(doc: str, rev: int, latency_s: float = 0.001) -> dict:
    return {"doc_id": doc, "rev": rev, "cost": {"latency_s": latency_s}, "model": None}


def test_rate_is_over_first_sent_to_last_answer_and_duplicates_do_not_count() -> None:
    tally = Tally([("a", 0), ("a", 1), ("b", 0)])
    tally.on_update(update(PROBE_DOC, 0), 3.0)  # readiness probe: in no figure
    for key, at in ((("a", 0), 9.5), (("a", 1), 10.0), (("b", 0), 10.5)):
        tally.on_sent({"doc_id": key[0], "rev": key[1]}, at)
    tally.on_sent({"doc_id": "a", "rev": 0}, 10.2)  # sent again: the first send counts
    tally.on_update(update("a", 0), 11.0)
    tally.on_update(update("a", 1), 12.0)
    tally.on_update(update("a", 0), 12.5)  # redelivered: a duplicate
    tally.on_update(update("b", 0), 15.0)
    tally.on_update(update("a", 1), 16.0)  # a duplicate after the last answer
    tally.on_update(update("zz", 9), 16.5)  # not in the stream
    assert tally.probe_answered.is_set() and tally.settled()
    r = summarize(tally, first_sent=10.0, timeout_s=60)
    assert r["complete"] and r["failure"] is None
    assert (r["answered"], r["lost"], r["duplicate_updates"], r["unexpected_updates"]) == (
        3, 0, 2, 1)
    assert r["wall_s"] == 5.0 and r["events_per_s"] == pytest.approx(3 / 5.0)
    assert r["first_answer_s"] == 1.0
    assert r["processing_latency_ms"]["median"] == pytest.approx(1.0)
    # End to end: handed to the producer -> first answer (1.5, 2.0, 4.5 s).
    assert r["end_to_end_latency_s"]["median"] == pytest.approx(2.0)
    assert r["end_to_end_latency_s"]["p99"] == pytest.approx(4.5)


def test_a_dead_letter_loses_its_revision_and_those_held_behind_it_until_a_snapshot() -> None:
    expected = [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 0)]
    tally = Tally(expected, snapshots={("a", 0), ("a", 3), ("b", 0)})
    tally.on_update(update("a", 0), 1.0)
    tally.on_update(update("b", 0), 1.5)
    tally.on_dead_letter({"reason": "checksum_mismatch",
                          "event": {"doc_id": "a", "rev": 1, "ops": []}})
    # rev 2 can never apply; the snapshot at rev 3 (and rev 4 after it) still may.
    assert tally.lost() == {("a", 1): "dead-lettered (checksum_mismatch)",
                            ("a", 2): "held behind dead-lettered rev 1"}
    assert not tally.settled()
    tally.on_update(update("a", 3), 2.0)
    tally.on_update(update("a", 4), 2.5)
    assert tally.settled()
    r = summarize(tally, first_sent=0.5, timeout_s=60)
    assert not r["complete"] and r["events_per_s"] is None
    assert r["answered"] == 4 and r["lost"] == 2
    assert r["failure"] == ("2 of 6 revisions lost: 1 dead-lettered (checksum_mismatch); "
                            "1 held behind dead-lettered rev 1")
    assert r["lost_revisions"][0] == {"doc_id": "a", "rev": 1,
                                      "why": "dead-lettered (checksum_mismatch)"}
    assert r["dead_letters"] == {"checksum_mismatch": 1}


def test_unanswered_revisions_fail_the_run() -> None:
    tally = Tally([("a", 0), ("a", 1)])
    tally.on_update(update("a", 0), 1.0)
    r = summarize(tally, first_sent=0.0, timeout_s=5)
    assert not r["complete"] and r["events_per_s"] is None and r["wall_s"] == 1.0
    assert r["failure"] == "1 of 2 revisions lost: 1 not answered within 5 s"
    r = summarize(tally, first_sent=0.0, timeout_s=5, worker_exit=-9)
    assert r["failure"] == "1 of 2 revisions lost: 1 not answered: the worker exited with code -9"
    never_sent = summarize(Tally([("a", 0)]), first_sent=None, timeout_s=5)
    assert not never_sent["complete"] and "never sent" in never_sent["failure"]


def test_dead_letters_are_read_as_they_arrive() -> None:
    tally = Tally([("a", 1), ("a", 2)])
    tally.on_dead_letter({"reason": "invalid_ops", "event": '{"doc_id": "a", "rev": 2}'})
    tally.on_dead_letter({"reason": "invalid_json", "event": "{not json"})
    tally.on_dead_letter({"reason": "invalid_event", "event": {"doc_id": "a", "rev": True}})
    tally.on_dead_letter({"reason": "x", "event": {"doc_id": PROBE_DOC, "rev": 0}})
    assert tally.dead_letters == {("a", 2): "invalid_ops"}
    assert tally.unreadable_dead_letters == ["invalid_json", "invalid_event"]


# ------------------------------------------------------------------------------- real runs


def first_docs(n: int) -> list[dict]:
    with gzip.open(BUNDLED, "rt", encoding="utf-8") as fh:
        events = [json.loads(line) for line in fh]
    docs = list(dict.fromkeys(e["doc_id"] for e in events))[:n]
    return [e for e in events if e["doc_id"] in docs]


def run_bench(tmp_path: Path, events: list[dict], timeout_s: float,
              modes: tuple[str, ...] = ("--model", "none")) -> tuple[int, dict, str, float]:
    """`incstream bench pipeline` in a process: (exit code, result JSON, stderr, seconds)."""
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(json.dumps(e) + "\n" for e in events))
    out = tmp_path / "result.json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "incstream.pipeline.cli", "bench", "pipeline",
         "--stream", str(stream), *modes, "--partitions", "2", "--timeout", str(timeout_s),
         "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    return proc.returncode, json.loads(out.read_text()), proc.stderr, elapsed


@pytest.mark.integration
@pytest.mark.slow
def test_a_complete_run_reports_its_rate(tmp_path: Path) -> None:
    events = first_docs(1)
    code, result, err, _ = run_bench(tmp_path, events, timeout_s=120)
    assert code == 0, err
    assert result["complete"] and list(result["modes"]) == ["text"]
    r = result["modes"]["text"]["run"]
    assert r["complete"] and r["failure"] is None
    assert r["answered"] == r["revisions"] == r["events"] == len(events)
    assert r["lost"] == 0 and r["duplicate_updates"] == 0 and r["unexpected_updates"] == 0
    assert r["worker_ready_s"] > 0 and 0 < r["first_answer_s"] <= r["wall_s"]
    assert r["events_per_s"] == pytest.approx(len(events) / r["wall_s"])
    assert r["worker_stop"]["exit_code"] == 0
    # One table write per event (the probe's left out), read back from the changelog topic.
    assert r["changelog"]["records"] == len(events) and r["changelog"]["bytes_per_edit"] > 0
    assert 0 < r["changelog"]["durable_bytes_per_doc"] <= r["changelog"]["record_bytes_max"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_that_loses_revisions_exits_1_and_says_which(tmp_path: Path) -> None:
    events = first_docs(2)
    bad_doc = events[-1]["doc_id"]
    doc_events = [e for e in events if e["doc_id"] == bad_doc]
    bad = doc_events[len(doc_events) // 2]
    bad["sha1_after"] = sha1_hex("not the text")  # the worker dead-letters it
    after = [e["rev"] for e in doc_events if e["rev"] > bad["rev"]]
    assert after and all("snapshot" not in e for e in doc_events[1:])
    timeout_s = 120.0
    code, result, err, elapsed = run_bench(tmp_path, events, timeout_s=timeout_s)
    assert code == 1
    assert "bench pipeline FAILED" in err and f"{bad_doc} rev {bad['rev']}" in err
    r = result["modes"]["text"]["run"]
    assert result["lost"] == r["lost"] and not result["complete"]
    assert not r["complete"] and r["events_per_s"] is None
    assert r["lost"] == 1 + len(after) and r["answered"] == len(events) - r["lost"]
    assert r["dead_letters"] == {"checksum_mismatch": 1}
    assert r["lost_revisions"][0] == {"doc_id": bad_doc, "rev": bad["rev"],
                                      "why": "dead-lettered (checksum_mismatch)"}
    assert {x["why"] for x in r["lost_revisions"][1:]} == {
        f"held behind dead-lettered rev {bad['rev']}"}
    # Settled as soon as the dead letter came back: no wait for the timeout.
    assert elapsed < timeout_s


@pytest.mark.integration
@pytest.mark.slow
def test_the_three_modes_answer_the_same_stream(tmp_path: Path) -> None:
    """incremental, chunk and dense workers, one after the other on fresh brokers: every
    revision answered once, their figures reported, and the answers agree: chunk and dense run
    the same dense model on the same chunks (equal answers); the incremental engine is the VQ
    model, so against them only a valid answer is asked for."""
    events = first_docs(1)[:8]
    code, r, err, _ = run_bench(tmp_path, events, timeout_s=180, modes=())
    assert code == 0, err
    assert r["complete"] and r["lost"] == 0 and list(r["modes"]) == ["incremental", "chunk",
                                                                     "dense"]
    for mode, m in r["modes"].items():
        assert m["lost"] == 0 and m["duplicates"] == 0, mode
        assert m["edits_per_s"] > 0 and 0 < m["latency_p50_s"] <= m["latency_p99_s"], mode
        assert m["macs"] > 0 and m["macs_per_edit"] == pytest.approx(m["macs"] / len(events))
        assert m["state_bytes_per_doc"]["durable"] > 0 and m["changelog_bytes_per_edit"] > 0
        assert m["run"]["answered"] == len(events)
        # how the agent batched, from the worker's histograms: every event was taken (the
        # probe's too; more than once only if handed over again), and each inference step
        # classified at least one document
        counters = m["run"]["worker_counters"]
        taken = counters["events_per_batch_count"] * counters["events_per_batch_mean"]
        assert taken >= len(events) + 1 - 1e-9, mode
        assert counters["documents_per_inference_step_mean"] >= 1, mode
    incremental, chunk, dense = (r["modes"][m] for m in ("incremental", "chunk", "dense"))
    # Every revision re-runs the whole document in dense mode; the chunk cache only at the
    # start (8 events of one short document: a miss, then hits) and never holds more than
    # its vectors, while the engine's sessions hold activations.
    assert dense["answers_by_cache"] == {"hit": 0, "miss": len(events), "rebuild": 0}
    assert chunk["answers_by_cache"]["hit"] == len(events) - 1
    assert chunk["macs"] < dense["macs"] == dense["macs_dense_equivalent"]
    assert dense["state_bytes_per_doc"]["hot"] == 0
    assert 0 < chunk["state_bytes_per_doc"]["hot"] < incremental["state_bytes_per_doc"]["hot"]
    # What the engine says the chunk cache would spend is what the chunk worker spent.
    assert incremental["macs_chunk_cache_equivalent"] == chunk["macs"]
    assert r["labels"]["chunk_vs_dense"] == {"revisions": len(events),
                                             "labels_equal": len(events),
                                             "labels_equal_fraction": 1.0,
                                             "max_abs_prob_diff": 0.0}
    assert r["labels"]["incremental_vs_chunk"]["revisions"] == len(events)
    assert set(r["comparison"]) == {"chunk", "dense"}
    assert r["comparison"]["dense"]["macs_peer_over_incremental"] > 1
