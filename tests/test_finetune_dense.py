"""The fine-tuned dense baseline (engine.training.finetune_dense, `incstream train-dense`).

Training runs use a tiny random encoder (2 layers, hidden 32) on ~30 short texts, so each run
is a second or two; the equality checks and the command run use the real base encoder on a few
short chunks. The data is made here (CI has no dataset cache for these).
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
from incstream.engine.model.base_model import base_model_path, load_tokenizer  # noqa: E402
from incstream.engine.model.dense_finetuned import (  # noqa: E402
    apply_delta,
    encoder_delta,
    flat_tensors,
    load_dense_finetuned,
)
from incstream.engine.model.minilm import (  # noqa: E402
    MiniLMConfig,
    forward_dense,
    load_minilm,
    random_minilm,
)
from incstream.engine.training.finetune_dense import FinetuneConfig, finetune  # noqa: E402
from incstream.engine.training.train_data import chunk_documents, pad_chunks  # noqa: E402
from incstream.engine.training.trainable_minilm import TrainableMiniLM  # noqa: E402

GOOD = ["a wonderful, moving film with superb acting", "great fun and a delight to watch",
        "brilliant script, I loved every minute", "charming and beautifully made"]
BAD = ["a dull, boring mess with awful acting", "terrible plot and a waste of time",
       "I hated it, the worst film this year", "painfully slow and badly written"]
TINY = MiniLMConfig(hidden=32, layers=2, heads=4, ffn=64)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dense-ft")
    with open(tmp / "tiny.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for week in range(4):
            for good, bad in zip(GOOD, BAD, strict=True):
                writer.writerows([(f"{good}. Seen in week {week}.", "positive"),
                                  (f"{bad}. Seen in week {week}.", "negative")])
    return tmp


@pytest.fixture(scope="module")
def base():
    return load_minilm(base_model_path(), torch.float32)


def tiny_config(tmp: Path, name: str, **kw) -> FinetuneConfig:
    settings = dict(dataset=str(tmp / "tiny.csv"), out=str(tmp / name / "out"),
                    checkpoint_dir=str(tmp / name / "ckpt"), chunk_tokens=32,
                    eval_max_doc_tokens=None, steps=6, batch=8, lr=3e-3, lr_head=1e-2,
                    warmup=0.2, eval_every=2, checkpoint_every=100, device="cpu")
    settings.update(kw)
    return FinetuneConfig(**settings)


def tiny_encoder():
    return random_minilm(TINY, seed=3, dtype=torch.float32, qk_scale=0.2)


def test_untrained_module_is_forward_dense(base) -> None:
    """Zero updates: the trainable copy's weights run by forward_dense give the base's exact
    answers, the batched padded forward matches per chunk, and the stored delta is empty."""
    model = TrainableMiniLM(base, 2)
    chunks = [c for d in chunk_documents(load_tokenizer(), GOOD + BAD[:1] + [" ".join(BAD)],
                                         ChunkPolicy(max_tokens=24)) for c in d.chunks]
    assert len({len(c) for c in chunks}) > 2  # padding really happens
    ids, mask = pad_chunks(chunks)
    with torch.no_grad():
        batched = model.encode(ids, mask)
        for i, c in enumerate(chunks):
            pos = torch.arange(len(c))
            want = forward_dense(base, c, pos)
            assert torch.equal(forward_dense(model.weights(), c, pos), want)
            torch.testing.assert_close(batched[i], want.mean(0), atol=1e-5, rtol=0)
    assert encoder_delta(model.weights(), base) == {}


def test_delta_round_trip(base) -> None:
    tuned = {k: v.clone() for k, v in flat_tensors(base).items()}
    tuned["word"][[5, 900]] += 0.5
    tuned["layers.1.w_up"][0, 0] += 1.0
    model = TrainableMiniLM(base, 2)
    with torch.no_grad():
        for name, p in model.named_encoder().items():
            p.copy_(tuned[name])
    delta = encoder_delta(model.weights(), base)
    assert sorted(delta) == ["layers.1.w_up", "word.index", "word.rows"]
    assert delta["word.index"].tolist() == [5, 900]
    rebuilt = flat_tensors(apply_delta(base, delta))
    assert all(torch.equal(rebuilt[k], tuned[k]) for k in tuned)
    assert not torch.equal(flat_tensors(base)["word"], tuned["word"])  # base left alone


def test_loss_decreases(workdir: Path) -> None:
    # one batch holds every training text (one chunk each), so steps are comparable
    result = finetune(tiny_config(workdir, "fb", batch=64, steps=8, chunk_tokens=128),
                      base=tiny_encoder(),
                      progress=False)
    assert result.losses[-1] < result.losses[0] - 0.05
    assert [p["step"] for p in result.curve] == [2, 4, 6, 8]


def test_resume_continues_the_same_run(workdir: Path) -> None:
    whole = finetune(tiny_config(workdir, "whole"), base=tiny_encoder(), progress=False)
    cut = finetune(tiny_config(workdir, "cut"), base=tiny_encoder(), progress=False,
                   stop_after=3)
    assert cut.path is None and len(cut.losses) == 3
    resumed = finetune(tiny_config(workdir, "cut"), base=tiny_encoder(), progress=False)
    assert resumed.losses == whole.losses  # bit for bit, every step
    assert [p["val_ce"] for p in resumed.curve] == [p["val_ce"] for p in whole.curve]
    for name in ("encoder-delta.safetensors", "head.safetensors"):
        a, b = load_file(str(whole.path / name)), load_file(str(resumed.path / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_other_settings_is_refused(workdir: Path) -> None:
    finetune(tiny_config(workdir, "other", steps=2), base=tiny_encoder(), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        finetune(tiny_config(workdir, "other", steps=2, lr=1e-3), base=tiny_encoder(),
                 progress=False)


def test_train_dense_then_eval_commands(workdir: Path, base) -> None:
    """The real encoder, two steps: the written model is base + delta exactly as trained,
    and `incstream eval` reports it next to the probe."""
    from incstream.pipeline.cli_model import eval_command, train_dense_command

    out, ckpt = workdir / "cli" / "out", workdir / "cli" / "ckpt"
    record = workdir / "cli" / "record.json"
    res = CliRunner().invoke(train_dense_command, [
        "--dataset", str(workdir / "tiny.csv"), "--steps", "2", "--batch", "4",
        "--max-chunk-tokens", "32", "--eval-max-doc-tokens", "0", "--eval-every", "2",
        "--out", str(out), "--checkpoint-dir", str(ckpt), "--device", "cpu",
        "--json", str(record), "--quiet"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chunking"]["chunk_tokens"] == 32 and manifest["labels"] == ["negative",
                                                                                 "positive"]
    assert manifest["trained"]["curve"][0]["step"] == 2
    assert json.loads(record.read_text())["curve"] == manifest["trained"]["curve"]
    changed = manifest["delta"]["changed_rows"]["word"]
    assert 0 < changed < 1000  # only the rows of tokens the two steps read
    model = load_dense_finetuned(out, device="cpu")
    best = load_file(str(ckpt / "best.safetensors"))
    loaded = flat_tensors(model.weights)
    for key, t in best.items():
        if key.startswith("enc."):
            assert torch.equal(loaded[key.removeprefix("enc.").replace("__", ".")], t), key
    assert torch.equal(model.head.weight.float(), best["head.weight"])

    json_out = workdir / "cli" / "eval.json"
    res = CliRunner().invoke(eval_command, [
        "--dataset", str(workdir / "tiny.csv"), "--split", "test", "--limit", "3",
        "--incremental-docs", "0", "--dense-finetuned", str(out), "--device", "cpu",
        "--json", str(json_out), "--quiet"])
    assert res.exit_code == 0, res.output
    row = json.loads(json_out.read_text())["datasets"][0]
    assert row["dense_finetuned"]["chunk_tokens"] == 32
    assert row["acc_dense_finetuned"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert 0.0 <= row["f1_dense_finetuned"] <= 1.0 and "acc_dense_probe" in row
