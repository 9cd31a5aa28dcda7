"""VQ training with an adapted encoder (engine.training.train_adapted, `incstream train-adapted`).

The edit pairs and the adapter merge are checked on their own; one short run on the real base
encoder (a few chunks of <= 34 tokens, a teacher that is the base encoder with a fresh head)
checks resume, the written bundle, and that the engine runs the adapted bundle exactly.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from incstream.engine.incremental.chunks import ChunkPolicy  # noqa: E402
from incstream.engine.incremental.fast_mode import FastModeConfig  # noqa: E402
from incstream.engine.incremental.session import DocumentSession  # noqa: E402
from incstream.engine.model.adapter import ADAPTER_FILE, merge_adapter  # noqa: E402
from incstream.engine.model.base_model import base_model_path, load_tokenizer  # noqa: E402
from incstream.engine.model.dense_finetuned import (  # noqa: E402
    flat_tensors,
    save_dense_finetuned,
)
from incstream.engine.model.minilm import MiniLMConfig, load_minilm, random_minilm  # noqa: E402
from incstream.engine.model.model_bundle import load_model_bundle  # noqa: E402
from incstream.engine.training.adapted_vq import AdaptedVQ  # noqa: E402
from incstream.engine.training.edit_pairs import edit_chunk  # noqa: E402
from incstream.engine.training.train_adapted import AdaptedConfig, train_adapted  # noqa: E402

GOOD = ["a wonderful, moving film with superb acting", "great fun and a delight to watch",
        "brilliant script, I loved every minute", "charming and beautifully made"]
BAD = ["a dull, boring mess with awful acting", "terrible plot and a waste of time",
       "I hated it, the worst film this year", "painfully slow and badly written"]


def test_edit_pairs_keep_rows_away_from_the_edit() -> None:
    ids = torch.arange(100, 160)
    ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP]
    inserted = deleted = 0
    for seed in range(40):
        e = edit_chunk(ids, torch.Generator().manual_seed(seed), max_edits=3)
        again = edit_chunk(ids, torch.Generator().manual_seed(seed), max_edits=3)
        assert torch.equal(e.ids, again.ids) and torch.equal(e.positions, again.positions)
        assert len(e.positions) == len(e.ids) and e.ids[0] == 101 and e.ids[-1] == 102
        # a kept row has its token and its (canonical) position id in the edited chunk
        assert torch.equal(e.ids[e.kept_dst], ids[e.kept_src])
        assert torch.equal(e.positions[e.kept_dst], e.kept_src)
        assert e.kept_src[0] == 0 and bool((e.kept_src.diff() > 0).all())
        # inserted rows count up from their left neighbour (sharing ids when there is no room)
        assert int(e.positions.min()) == 0 and int(e.positions.max()) < 512
        inserted += int(len(e.ids) > len(ids))
        deleted += int(len(e.ids) < len(ids))
    assert inserted > 5 and deleted > 5  # both kinds are drawn


def test_adapter_merge_is_the_trained_encoder() -> None:
    tiny = random_minilm(MiniLMConfig(hidden=32, layers=2, heads=4, ffn=64), seed=1,
                         dtype=torch.float32)
    model = AdaptedVQ(tiny, torch.randn(2, 4, 8, 8), n_labels=2, rank=4)
    unchanged = flat_tensors(model.weights())
    assert all(torch.equal(unchanged[k], t) for k, t in flat_tensors(tiny).items())
    with torch.no_grad():
        for p in model.lora_b.values():
            p.normal_()
        model.whole["1__ln2_b"].add_(0.5)
    trained = flat_tensors(model.weights())
    merged = flat_tensors(merge_adapter(tiny, model.adapter_tensors()))
    for name, t in trained.items():
        torch.testing.assert_close(merged[name], t.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged["layers.0.wq"], flat_tensors(tiny)["layers.0.wq"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("adapted")
    with open(tmp / "tiny.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for week in range(4):
            for good, bad in zip(GOOD, BAD, strict=True):
                writer.writerows([(f"{good}. Seen in week {week}.", "positive"),
                                  (f"{bad}. Seen in week {week}.", "negative")])
    # the teacher: the base encoder (empty delta) with a random head
    base = load_minilm(base_model_path(), torch.float32)
    gen = torch.Generator().manual_seed(0)
    save_dense_finetuned(tmp / "teacher", base, base, torch.randn(2, 384, generator=gen) * 0.1,
                         torch.zeros(2), {"name": "tiny-teacher", "base_model":
                                          "all-MiniLM-L6-v2", "labels": ["negative", "positive"],
                                          "chunking": {"chunk_tokens": 32}, "trained": {}})
    return tmp


def tiny_config(tmp: Path, name: str, **kw) -> AdaptedConfig:
    settings = dict(dataset=str(tmp / "tiny.csv"), out=str(tmp / name / "out"),
                    checkpoint_dir=str(tmp / name / "ckpt"), teacher=str(tmp / "teacher"),
                    init="polarity-minilm-vq64", chunk_tokens=32, eval_max_doc_tokens=None,
                    steps=4, batch=3, eval_every=2, checkpoint_every=100, device="cpu")
    settings.update(kw)
    return AdaptedConfig(**settings)


def test_resume_bundle_and_exact_engine(workdir: Path) -> None:
    whole = train_adapted(tiny_config(workdir, "whole"), progress=False)
    cut = train_adapted(tiny_config(workdir, "cut"), progress=False, stop_after=2)
    assert cut.path is None and len(cut.losses) == 2
    resumed = train_adapted(tiny_config(workdir, "cut"), progress=False)
    assert resumed.losses == whole.losses  # bit for bit, every step
    for name in ("codebooks.safetensors", "head.safetensors", ADAPTER_FILE):
        a, b = load_file(str(whole.path / name)), load_file(str(resumed.path / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    manifest = json.loads((whole.path / "manifest.json").read_text())
    assert manifest["adapter"]["rank"] == 8 and ADAPTER_FILE in manifest["files"]
    assert [p["step"] for p in manifest["trained"]["curve"]] == [0, 2, 4]
    refit = manifest["trained"]["head_refit"]  # the head refitted on the student's vectors
    assert refit["after"]["val_acc"] == manifest["metrics"]["validation"]["acc_vq"]

    # The engine runs base + adapter: its float64 weights are the trained float32 ones cast up,
    # and incremental inference on the adapted bundle stays exact.
    model, _ = load_model_bundle(whole.path, device="cpu")
    adapter = load_file(str(whole.path / ADAPTER_FILE))
    assert not torch.equal(model.w.layers[0].wq, model.original.layers[0].wq.double())
    assert torch.equal(model.w.layers[0].bq, adapter["layers.0.bq"].double())
    tok = load_tokenizer()
    text = " ".join(GOOD + BAD)
    session = DocumentSession(model, tok, text, ChunkPolicy(max_tokens=32))
    session.apply_ops([{"retain": 10}, {"insert": "truly "}])
    session.apply_ops([{"retain": 40}, {"delete": 7}])
    check = session.reference_check()
    assert check["code_mismatches"] == 0 and check["max_abs_logit_diff"] < 1e-9
    fast = DocumentSession(model, tok, text, ChunkPolicy(max_tokens=32), mode=FastModeConfig())
    fast.apply_ops([{"retain": 10}, {"insert": "truly "}])
    assert fast.logits().shape == (2,)


def test_train_adapted_then_eval_fast_commands(workdir: Path) -> None:
    from incstream.pipeline.cli_model import eval_command, train_adapted_command

    out = workdir / "cli" / "out"
    res = CliRunner().invoke(train_adapted_command, [
        "--dataset", str(workdir / "tiny.csv"), "--teacher", str(workdir / "teacher"),
        "--init", "polarity-minilm-vq64", "--steps", "1", "--batch", "2", "--eval-every", "1",
        "--out", str(out), "--checkpoint-dir", str(workdir / "cli" / "ckpt"),
        "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    json_out = workdir / "cli" / "eval.json"
    res = CliRunner().invoke(eval_command, [
        "--model", str(out), "--dataset", str(workdir / "tiny.csv"), "--split", "test",
        "--limit", "2", "--incremental-docs", "2", "--dense-finetuned", "none",
        "--device", "cpu", "--json", str(json_out), "--quiet"])
    assert res.exit_code == 0, res.output
    row = json.loads(json_out.read_text())["datasets"][0]
    assert row["acc_vq_fast"] in (0.0, 0.5, 1.0)
    assert row["label_agreement_fast_vs_fresh"] in (0.0, 0.5, 1.0)
    assert row["max_abs_prob_diff_fast_vs_fresh"]["max"] >= 0.0
    assert row["fast_mode"]["tau"] == FastModeConfig().tau
