"""Training, checkpoint/resume, model bundles, and the eval/classify commands, on a tiny CSV.

Everything here is a few-step run on ~30 short documents with K=8 codes, so the module takes
well under a minute on one CPU core. The data is made here (CI has no dataset cache).
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

from incstream.engine.training.evaluate import edit_history  # noqa: E402
from incstream.engine.training.train import TrainConfig, train  # noqa: E402

POS = ["a wonderful, moving film with superb acting", "great fun and a delight to watch",
       "brilliant script, I loved every minute", "charming and beautifully made",
       "an excellent and touching story", "the best movie of the year, truly great",
       "funny, warm and wonderful", "a joy from start to finish, superb"]
NEG = ["a dull, boring mess with awful acting", "terrible plot and a waste of time",
       "I hated it, the worst film this year", "painfully slow and badly written",
       "an ugly, stupid and tedious movie", "awful dialogue, boring characters",
       "a complete disaster, avoid it", "bad, bland and far too long"]


def tiny_csv(path: Path) -> Path:
    rows = []
    for i in range(2):
        for j, (p, n) in enumerate(zip(POS, NEG, strict=True)):
            tail = f" Seen in week {i * 8 + j}."
            rows += [(p + tail, "positive"), (n + tail, "negative")]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def tiny_config(tmp: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(tmp / "tiny.csv"), out=str(tmp / "bundle"), k=8,
                max_doc_tokens=48, calib_tokens=400, calib_iters=3, steps=6, batch_docs=4,
                checkpoint_every=3, checkpoint_dir=str(tmp / "ckpt"),
                cache_dir=str(tmp / "cache"), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("training")
    tiny_csv(tmp / "tiny.csv")
    return tmp


@pytest.fixture(scope="module")
def trained(workdir: Path):
    return train(tiny_config(workdir), progress=False)


def test_loss_decreases(workdir: Path) -> None:
    # Full batch (every step sees the same documents), so the loss is comparable across steps.
    cfg = tiny_config(workdir, out=str(workdir / "fb"), checkpoint_dir=str(workdir / "fb-ck"),
                      batch_docs=64, steps=8, lr_codebooks=1e-2, lr_head=1e-2)
    result = train(cfg, progress=False)
    assert result.losses[-1] < result.losses[0]


def test_resume_gives_identical_result(workdir: Path, trained) -> None:
    ck = workdir / "resume-ck"
    first = train(tiny_config(workdir, out=str(workdir / "r"), checkpoint_dir=str(ck), steps=3),
                  progress=False)
    assert len(first.losses) == 3
    resumed = train(tiny_config(workdir, out=str(workdir / "r"), checkpoint_dir=str(ck)),
                    progress=False)
    assert resumed.losses == trained.losses
    a = load_file(str(trained.bundle / "codebooks.safetensors"))["codebooks"]
    b = load_file(str(resumed.bundle / "codebooks.safetensors"))["codebooks"]
    assert torch.equal(a, b)
    ha = load_file(str(trained.bundle / "head.safetensors"))
    hb = load_file(str(resumed.bundle / "head.safetensors"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_checkpoint_of_other_settings_is_refused(workdir: Path, trained) -> None:
    with pytest.raises(ValueError, match="other settings"):
        train(tiny_config(workdir, seed=1), progress=False)


def test_bundle_round_trip_same_logits(workdir: Path, trained) -> None:
    from incstream.engine.incremental.chunks import ChunkPolicy
    from incstream.engine.model.base_model import base_model_path, load_tokenizer
    from incstream.engine.model.minilm import load_minilm
    from incstream.engine.model.model_bundle import load_heads, load_model_bundle
    from incstream.engine.training.evaluate import vq_logits
    from incstream.engine.training.train import vq_doc_logits
    from incstream.engine.training.train_data import chunk_documents
    from incstream.engine.training.vq_training import TrainableVQ

    model, manifest = load_model_bundle(trained.bundle, device="cpu", with_original=False)
    assert manifest["labels"] == ["negative", "positive"]
    assert model.k == 8 and model.head.labels == ("negative", "positive")
    head, _ = load_heads(trained.bundle)
    # the float32 training twin with the bundle's tensors vs the engine's float64 VQModel
    codes = load_file(str(trained.bundle / "codebooks.safetensors"))["codebooks"]
    twin = TrainableVQ(load_minilm(base_model_path(), torch.float32), codes, 2)
    with torch.no_grad():
        twin.head.weight.copy_(head.weight)
        twin.head.bias.copy_(head.bias)
    docs = chunk_documents(load_tokenizer(), POS[:2] + NEG[:2], ChunkPolicy(), 48)
    ours = torch.stack([vq_logits(model, d) for d in docs]).float()
    theirs = vq_doc_logits(twin, docs)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


def test_bundle_holds_only_diffs(trained) -> None:
    files = {p.name: p.stat().st_size for p in trained.bundle.iterdir()}
    assert set(files) == {"manifest.json", "codebooks.safetensors", "head.safetensors"}
    layers, heads, k, d = 6, 12, 8, 32
    assert files["codebooks.safetensors"] < layers * heads * k * d * 4 + 4096
    assert sum(files.values()) < 100_000  # the base encoder alone is ~90 MB
    manifest = json.loads((trained.bundle / "manifest.json").read_text())
    assert len(manifest["base_weights_sha256"]) == 64
    assert manifest["vq"]["k"] == 8 and "validation" in manifest["metrics"]


def test_eval_and_classify_commands(workdir: Path, trained) -> None:
    from incstream.pipeline.cli_model import classify_command, eval_command

    runner = CliRunner()
    out = workdir / "eval.json"
    res = runner.invoke(eval_command, ["--model", str(trained.bundle), "--split", "test",
                                       "--incremental-docs", "2", "--dense-finetuned", "none",
                                       "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["datasets"][0]
    for key in ("n_test", "acc_dense_probe", "acc_vq", "acc_incremental", "f1_dense_probe",
                "f1_vq"):
        assert key in row
    assert row["acc_dense_finetuned"] is None  # no fine-tuned dense model for this task
    assert row["n_incremental"] == 2 and row["incremental_agreement"] == 1.0
    assert row["max_abs_logit_diff_vs_reference"] < 1e-4
    a, b = workdir / "a.txt", workdir / "b.txt"
    a.write_text(POS[0])
    b.write_text(NEG[0])
    res = runner.invoke(classify_command, [str(a), str(b), "--model", str(trained.bundle),
                                           "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.strip().splitlines()]
    assert [x["file"] for x in lines] == [str(a), str(b)]
    assert all(x["label"] in ("negative", "positive") for x in lines)
    assert all(abs(sum(x["scores"].values()) - 1) < 1e-5 for x in lines)


def test_edit_history_rebuilds_text() -> None:
    from incstream.engine.incremental.text_ops import apply_ops

    text = "one two three four five six seven eight nine ten"
    first, history = edit_history(text)
    cur = first
    for ops in history:
        cur, _ = apply_ops(cur, ops)
    assert cur == text and len(history) >= 3


def test_refit_head_from_bundle(workdir: Path, trained) -> None:
    """--init BUNDLE --steps 0 --refit-head: same codebooks, a logistic VQ head picked on
    validation, and the bundle's history kept in the manifest."""
    from incstream.engine.training.dense_baseline import REFIT_L2_GRID

    cfg = tiny_config(workdir, out=str(workdir / "refit"), init=str(trained.bundle), steps=0,
                      refit_head=True, checkpoint_dir=str(workdir / "refit-ck"))
    result = train(cfg, progress=False)
    a = load_file(str(trained.bundle / "codebooks.safetensors"))["codebooks"]
    b = load_file(str(result.bundle / "codebooks.safetensors"))["codebooks"]
    assert torch.equal(a, b)
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    tr = manifest["trained"]
    assert "refitted" in tr["vq_head"] and "validation" in tr["selection"]
    assert [g["l2"] for g in tr["vq_head_selection"]] == list(REFIT_L2_GRID)
    assert [g["l2"] for g in tr["dense_head_selection"]] == list(REFIT_L2_GRID)
    assert tr["init_from"]["trained"]["steps"] == 6 and tr["torch_threads"] >= 1
    val = manifest["metrics"]["validation"]
    assert "acc_vq_before_refit" in val and 0.0 <= val["acc_vq"] <= 1.0
    head = load_file(str(result.bundle / "head.safetensors"))
    old = load_file(str(trained.bundle / "head.safetensors"))
    assert not torch.equal(head["weight"], old["weight"])
    assert head["weight"].shape == old["weight"].shape  # the bundle format is unchanged


def test_fit_head_picks_on_validation() -> None:
    from incstream.engine.training.dense_baseline import fit_dense_head

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    vx = torch.randn(20, 5, generator=gen)
    vy = (vx[:, 0] > 0).long()
    w, b, info = fit_dense_head(x, y, vx, vy, 2, grid=(1e-3, 1e-1))
    assert info["l2"] in (1e-3, 1e-1) and len(info["grid"]) == 2
    best = max(info["grid"], key=lambda g: (g["val_acc"], -g["val_ce"]))
    assert best["l2"] == info["l2"] and w.shape == (2, 5) and b.shape == (2,)


def test_vq_vector_cache(workdir: Path, trained) -> None:
    from incstream.engine.incremental.chunks import ChunkPolicy
    from incstream.engine.model.base_model import base_model_path, load_tokenizer
    from incstream.engine.model.minilm import load_minilm
    from incstream.engine.training.train import cached_vq_doc_vectors, vq_doc_vectors
    from incstream.engine.training.train_data import chunk_documents
    from incstream.engine.training.vq_training import TrainableVQ

    codes = load_file(str(trained.bundle / "codebooks.safetensors"))["codebooks"]
    twin = TrainableVQ(load_minilm(base_model_path(), torch.float32), codes, 2)
    docs = chunk_documents(load_tokenizer(), POS[:3], ChunkPolicy(), 48)
    first = cached_vq_doc_vectors(twin, docs, "t", workdir / "vqcache")
    again = cached_vq_doc_vectors(twin, docs, "t", workdir / "vqcache")
    assert torch.equal(first, again) and len(list((workdir / "vqcache" / "vq").iterdir())) == 1
    torch.testing.assert_close(first, vq_doc_vectors(twin, docs))


def test_eval_chunk_tokens_option(workdir: Path, trained) -> None:
    from incstream.pipeline.cli_model import eval_command

    out = workdir / "eval-chunk.json"
    res = CliRunner().invoke(eval_command, ["--model", str(trained.bundle), "--limit", "4",
                                            "--chunk-tokens", "16", "--incremental-docs", "1",
                                            "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["datasets"][0]
    assert row["chunk_tokens"] == 16 and row["n_test"] == 4
    assert row["incremental_agreement"] == 1.0
