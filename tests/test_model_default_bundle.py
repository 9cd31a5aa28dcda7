"""The shipped default model bundle: small, diffs only, loads offline, answers sensibly."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.model_bundle import DEFAULT_MODEL, load_model_bundle, read_manifest  # noqa: E402


def test_default_bundle_is_small_and_diffs_only() -> None:
    path, manifest = read_manifest(DEFAULT_MODEL)
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    assert set(sizes) == {"manifest.json", "codebooks.safetensors", "head.safetensors"}
    assert sum(sizes.values()) < 5_000_000
    assert manifest["labels"] == ["negative", "positive"]
    assert "test" in manifest["metrics"]


def test_default_bundle_classifies() -> None:
    from engine.base_model import load_tokenizer
    from engine.evaluate import classify_text

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
    every setting chosen on validation; incremental answers equal one-shot VQ answers."""
    for name in (DEFAULT_MODEL, "news-outlets-minilm-vq64"):
        _, manifest = read_manifest(name)
        test = manifest["metrics"]["test"]
        assert test["acc_vq"] >= test["acc_dense"] - 0.01, name
        assert test["incremental_agreement"] == 1.0, name
        assert test["n_incremental"] == test["n_test"], name
        assert "validation" in manifest["trained"]["selection"]
        assert manifest["trained"]["device"] == "cpu" and manifest["trained"]["torch_threads"] >= 1
