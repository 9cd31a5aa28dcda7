"""`bench engine` end to end on a tiny synthetic stream (real model, small chunks)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from incstream.engine.incremental.text_ops import sha1_hex
from incstream.engine.model.model_bundle import read_manifest
from incstream.pipeline.cli_bench import bench
from incstream.pipeline.settings import DEFAULT_MODEL_NAME, Settings


def test_bench_engine_cli(tmp_path):
    text = "Title: A tiny PEP\n\nThis document is edited a few times by the test. " * 4
    events = [{"schema": "doc-edit/v1", "doc_id": "d1", "rev": 0, "snapshot": text}]
    for rev, (pos, dele, ins) in enumerate([(5, 0, " small"), (30, 4, ""), (0, 0, "New "),
                                            (10, 0, "   ")], start=1):
        ops = [{"retain": pos}, {"delete": dele}, {"insert": ins}]
        text = text[:pos] + ins + text[pos + dele :]
        events.append({"schema": "doc-edit/v1", "doc_id": "d1", "rev": rev, "ops": ops,
                       "sha1_after": sha1_hex(text)})
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps(e) + "\n" for e in events))
    data = {}
    for mode in ("exact", "fast"):
        out = tmp_path / f"{mode}.json"
        result = CliRunner().invoke(bench, ["engine", "--stream", str(stream), "--docs", "1",
                                            "--device", "cpu", "--chunk-tokens", "32",
                                            "--mode", mode, "--json", str(out)])
        assert result.exit_code == 0, result.output
        data[mode] = json.loads(out.read_text())
    for d in data.values():
        assert d["events"] == 4 and d["noop_edits"] == 1
        assert d["tokenization_mismatches"] == 0 and d["sha1_mismatches"] == 0
        for peer in ("chunk_cache", "full_dense"):
            for key in ("macs_ratio", "time_ratio"):
                assert d["peers"][peer][key]["n"] == 3, (peer, key)
                assert d["peers"][peer][key]["median"] > 0
        # the same edits once more with the engine and the chunk cache each alone
        for peer in ("chunk_cache", "chunk_cache_bf16", "chunk_cache_onednn",
                     "chunk_cache_bf16_onednn"):
            assert d["peers"][peer]["time_ratio_alone"]["n"] == 3, peer
            assert d["peers"][peer]["seconds_alone"]["median"] > 0
        assert d["engine"]["seconds_alone"]["n"] == 3
        assert d["bytes_per_token"]["engine"]["median"] > d["bytes_per_token"]["chunk_cache"][
            "median"] > 0
        assert d["divergence"]["revisions"] == 4
    exact = data["exact"]
    assert exact["mode"] == "exact" and exact["exact"]["checked"] >= 4
    assert exact["exact"]["code_mismatches"] == 0 and exact["exact"]["codes_checked"] > 0
    assert exact["exact"]["max_abs_logit_diff"] <= 1e-9
    fresh = exact["vs_fresh_session"]
    assert fresh["docs"] == 1 and fresh["max_abs_logit_diff"] <= 1e-9
    assert fresh["layout_mismatches"] == fresh["code_mismatches"] == fresh["label_mismatches"] == 0
    assert exact["divergence"]["label_agreement"] == 1.0
    assert exact["divergence"]["max_prob_diff"]["max"] <= 1e-9
    fast = data["fast"]
    assert fast["mode"] == "fast" and fast["fast_config"]["tau"] > 0
    # the dial a worker on this machine runs with the default bundle, matmul "auto" resolved
    # (the bench once measured float32 matmuls while every worker ran bfloat16)
    worker = Settings().engine(read_manifest(DEFAULT_MODEL_NAME)[1].get("engine"))
    assert fast["fast_config"] == worker.as_dict()
    assert 0 <= fast["divergence"]["max_prob_diff"]["median"] <= 1
    # the engine state of the fast mode is float16, far below exact mode's float64 state
    assert (fast["bytes_per_token"]["engine"]["median"]
            < exact["bytes_per_token"]["engine"]["median"] / 4)


def test_bench_engine_batch_cli(tmp_path):
    events = []
    for doc in ("a", "b", "c"):
        text = f"Document {doc}: a short text that the test edits word by word. " * 3
        events.append({"schema": "doc-edit/v1", "doc_id": doc, "rev": 0, "snapshot": text})
        for rev, word in enumerate(("alpha", "beta", "gamma"), start=1):
            events.append({"schema": "doc-edit/v1", "doc_id": doc, "rev": rev,
                           "ops": [{"retain": 12}, {"insert": f" {word}"}]})
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps(e) + "\n" for e in events))
    out = tmp_path / "batch.json"
    result = CliRunner().invoke(bench, ["engine-batch", "--stream", str(stream), "--batch",
                                        "1,3", "--rounds", "3", "--device", "cpu", "--json",
                                        str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3] and all(r["rounds"] == 3 for r in rows)
    for row in rows:
        assert row["codes_apart"] == 0 and row["max_prob_diff"] < 1e-5
        assert row["batched_seconds_per_edit"]["median"] > 0
