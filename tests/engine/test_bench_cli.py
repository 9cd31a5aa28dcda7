"""`bench engine` end to end on a tiny synthetic stream (real model, small chunks)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from engine.text_ops import sha1_hex
from pipeline.cli_bench import bench


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
    out = tmp_path / "out.json"
    result = CliRunner().invoke(bench, ["engine", "--stream", str(stream), "--docs", "1",
                                        "--device", "cpu", "--chunk-tokens", "32",
                                        "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("device", "model", "stream", "docs", "events", "macs_ratio",
                "macs_ratio_vs_dense_vq", "time_ratio", "exact", "tokenization_mismatches",
                "chunk_tokens", "k"):
        assert key in data
    assert data["events"] == 4 and data["noop_edits"] == 1
    assert data["exact"]["max_abs_logit_diff"] <= 1e-4
    assert data["exact"]["code_mismatch_rate"] == 0
    assert data["tokenization_mismatches"] == 0 and data["sha1_mismatches"] == 0
    assert data["macs_ratio"]["median"] > 0
