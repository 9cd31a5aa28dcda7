"""The shipped model bundles: small, diffs only, load offline, and answer what their manifests say.

The manifests claim test accuracies (README's Results table). Those claims are tied to the
bundles in two steps, neither of which trusts the manifest:

1. ``tests/data/bundle-test-answers.json`` records, for every document of each bundle's test
   split, its gold label and the dense and VQ logits the shipped bundle gave (documents are
   named by the sha256 of their text: the texts themselves may not be redistributed, see
   engine/training/labelled_datasets.py). Accuracy and macro-F1 recomputed from that record must
   equal
   the manifest's numbers exactly, and its documents and gold labels must be the current test
   split's.
2. A slice of the test split (the first documents of each class) is classified again here,
   from the text, with the shipped bundle: every document's dense and VQ logits must match the
   record (VQ is float64: 1e-6; dense is float32: 1e-3) and so every label must.

So a bundle, chunking, tokenization or head change that moves any answer fails step 2; a
record edited to match a wrong manifest fails step 1. Regenerate the record only after
re-evaluating a retrained bundle (``incstream eval --update-manifest``):
``.venv/bin/python tests/test_model_default_bundle.py [BUNDLE ...]`` (about 5 min on one CPU
thread for all of them).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from incstream.engine.model.model_bundle import DEFAULT_MODEL, load_model_bundle, read_manifest  # noqa: E402
from incstream.engine.training.dataset_sources import DatasetFilesMissing  # noqa: E402
from incstream.engine.training.evaluate import accuracy, macro_f1, probe_metrics  # noqa: E402
from incstream.engine.training.labelled_datasets import LabelledDataset, load_dataset  # noqa: E402

BUNDLES = ("polarity-minilm-vq64", "news-outlets-minilm-vq64", "polarity-minilm-vq64-stable",
           "news-outlets-minilm-vq64-stable")
RECORD = Path(__file__).parent / "data" / "bundle-test-answers.json"
SLICE_PER_CLASS = {"polarity-minilm-vq64": 10, "news-outlets-minilm-vq64": 3,
                   "polarity-minilm-vq64-stable": 3,
                   "news-outlets-minilm-vq64-stable": 1}  # 20, 27, 6 and 9 documents
VQ_ATOL = 1e-6  # float64 path; measured differences between runs are ~1e-15
DENSE_ATOL = 1e-3  # float32 encoder; summation order may differ between BLAS builds


def test_default_bundle_is_small_and_diffs_only() -> None:
    path, manifest = read_manifest(DEFAULT_MODEL)
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    # the adapter holds only what differs from the base MiniLM weights (low-rank deltas)
    assert set(sizes) == {"manifest.json", "codebooks.safetensors", "head.safetensors",
                          "adapter.safetensors"}
    assert sum(sizes.values()) < 5_000_000
    assert manifest["labels"] == ["negative", "positive"]
    assert "test" in manifest["metrics"]
    assert manifest["engine"]["mode"] == "fast"  # a worker on the default runs the fast mode


def test_default_bundle_classifies() -> None:
    from incstream.engine.model.base_model import load_tokenizer
    from incstream.engine.training.evaluate import classify_text

    torch.set_num_threads(1)
    model, manifest = load_model_bundle(device="cpu", with_original=False)
    assert model.k == manifest["vq"]["k"]
    tok = load_tokenizer()
    good = classify_text(model, tok, "An absolute triumph. The acting is superb and the story "
                                     "moved me to tears; I loved every minute.")
    bad = classify_text(model, tok, "A dull, tedious mess. The plot is stupid, the acting is "
                                    "awful and it is far too long. Avoid.")
    assert good["label"] == "positive" and bad["label"] == "negative"


def test_shipped_bundles_meet_the_accuracy_target() -> None:
    """VQ test accuracy within 1 point of the dense baseline (frozen encoder + logistic head),
    every setting chosen on validation; incremental answers equal one-shot VQ answers. (The
    numbers themselves are checked against real answers by the two tests below.)"""
    for name in BUNDLES:
        _, manifest = read_manifest(name)
        test = manifest["metrics"]["test"]
        assert test["acc_vq"] >= probe_metrics(test)[0] - 0.01, name
        assert test["incremental_agreement"] == 1.0, name
        assert test["n_incremental"] == test["n_test"], name
        assert "validation" in manifest["trained"]["selection"]
        assert manifest["trained"]["device"] == "cpu" and manifest["trained"]["torch_threads"] >= 1


# ------------------------------------------------------------- manifest claims vs real answers


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _record() -> dict:
    return json.loads(RECORD.read_text(encoding="utf-8"))


def _test_split(name: str) -> LabelledDataset:
    _, manifest = read_manifest(name)
    try:
        return load_dataset(manifest["dataset"]["load"]).split("test")
    except DatasetFilesMissing:
        pytest.skip(f"{manifest['dataset']['load']} not fetched; run "
                    "`./dev datasets fetch all` (CI does)")


def _argmax(logits: list[float]) -> int:
    return max(range(len(logits)), key=logits.__getitem__)


@pytest.mark.parametrize("name", BUNDLES)
def test_recorded_answers_give_the_manifest_metrics(name: str) -> None:
    path, manifest = read_manifest(name)
    rec = _record()["bundles"][name]
    # The record belongs to exactly these bundle files and this evaluation setting.
    assert rec["files"] == manifest["files"], "bundle changed: re-evaluate and re-record"
    chunking = manifest["chunking"]
    assert (rec["chunk_tokens"], rec["max_doc_tokens"], rec["keep"]) == (
        chunking["chunk_tokens"], chunking["max_doc_tokens"], chunking.get("keep", "head"))
    docs = rec["docs"]
    gold = [d["gold"] for d in docs]
    vq = [_argmax(d["vq_logits"]) for d in docs]
    dense = [_argmax(d["dense_logits"]) for d in docs]
    test = manifest["metrics"]["test"]
    n_labels = len(manifest["labels"])
    assert len(docs) == test["n_test"]
    assert accuracy(vq, gold) == pytest.approx(test["acc_vq"], abs=1e-12)
    assert accuracy(dense, gold) == pytest.approx(probe_metrics(test)[0], abs=1e-12)
    assert macro_f1(vq, gold, n_labels) == pytest.approx(test["f1_vq"], abs=1e-12)
    assert macro_f1(dense, gold, n_labels) == pytest.approx(probe_metrics(test)[1], abs=1e-12)
    assert accuracy(vq, dense) == pytest.approx(test["vq_dense_agreement"], abs=1e-12)
    # ... and it is the current test split: same documents, same order, same gold labels.
    split = _test_split(name)
    assert [text_id(t) for t in split.texts] == [d["text"] for d in docs]
    assert list(split.labels) == gold


def slice_indices(labels: tuple[int, ...], per_class: int) -> list[int]:
    """The first `per_class` documents of each class, in split order."""
    taken: dict[int, int] = {}
    out = []
    for i, y in enumerate(labels):
        if taken.get(y, 0) < per_class:
            taken[y] = taken.get(y, 0) + 1
            out.append(i)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_shipped_bundle_answers_a_test_slice_as_recorded(name: str) -> None:
    rec = _record()["bundles"][name]
    split = _test_split(name)
    idx = slice_indices(split.labels, SLICE_PER_CLASS[name])
    assert len(idx) == SLICE_PER_CLASS[name] * len(split.label_names)
    torch.set_num_threads(1)
    answers = answer_documents(name, [split.texts[i] for i in idx])
    for i, (dense, vq) in zip(idx, answers, strict=True):
        want = rec["docs"][i]
        assert want["text"] == text_id(split.texts[i])
        assert vq == pytest.approx(want["vq_logits"], abs=VQ_ATOL), (name, i)
        assert dense == pytest.approx(want["dense_logits"], abs=DENSE_ATOL), (name, i)
        assert _argmax(vq) == _argmax(want["vq_logits"])


def answer_documents(name: str, texts: list[str]) -> list[tuple[list[float], list[float]]]:
    """(dense logits, VQ logits) of each text, exactly as `incstream eval` computes them."""
    from incstream.engine.incremental.chunks import ChunkPolicy
    from incstream.engine.model.base_model import load_tokenizer
    from incstream.engine.model.model_bundle import load_heads
    from incstream.engine.training.evaluate import dense_logits, vq_logits
    from incstream.engine.training.train_data import chunk_documents

    model, manifest = load_model_bundle(name, device="cpu")
    _, dense_head = load_heads(name)
    chunking = manifest["chunking"]
    docs = chunk_documents(load_tokenizer(manifest["base_model"]), texts,
                           ChunkPolicy(max_tokens=chunking["chunk_tokens"]),
                           chunking["max_doc_tokens"], chunking.get("keep", "head"))
    return [([float(v) for v in dense_logits(model, dense_head, d)],
             [float(v) for v in vq_logits(model, d)]) for d in docs]


def record_answers(names: list[str]) -> None:
    """Classify every test document of the named shipped bundles (default: all) and write
    RECORD, keeping the record of the others."""
    torch.set_num_threads(1)
    out: dict = {"note": "written by tests/test_model_default_bundle.py; see its docstring",
                 "bundles": {}}
    if RECORD.exists() and names:
        kept = _record()["bundles"]
        out["bundles"] = {name: kept[name] for name in BUNDLES if name in kept}
    for name in names or BUNDLES:
        _, manifest = read_manifest(name)
        split = load_dataset(manifest["dataset"]["load"]).split("test")
        chunking = manifest["chunking"]
        answers = answer_documents(name, list(split.texts))
        out["bundles"][name] = {
            "dataset": f"{manifest['dataset']['load']}:test",
            "files": manifest["files"],
            "chunk_tokens": chunking["chunk_tokens"],
            "max_doc_tokens": chunking["max_doc_tokens"],
            "keep": chunking.get("keep", "head"),
            "docs": [{"text": text_id(t), "gold": y,
                      "dense_logits": [round(v, 9) for v in dense],
                      "vq_logits": [round(v, 12) for v in vq]}
                     for t, y, (dense, vq) in zip(split.texts, split.labels, answers,
                                                  strict=True)],
        }
        print(f"{name}: {len(split)} documents", file=sys.stderr)
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    # one document per line: readable diffs when a bundle is re-recorded
    docs = {name: out["bundles"][name].pop("docs") for name in BUNDLES}
    for name in BUNDLES:
        out["bundles"][name]["docs"] = f"@{name}@"
    text = json.dumps(out, indent=1)
    for name in BUNDLES:
        text = text.replace(f'"@{name}@"',
                            "[\n" + ",\n".join(json.dumps(d) for d in docs[name]) + "\n]")
    RECORD.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    record_answers(sys.argv[1:])
