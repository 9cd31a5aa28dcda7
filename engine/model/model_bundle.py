"""Trained model bundles: only what differs from the base encoder, as safetensors + a manifest.

A bundle is a directory engine/bundles/<name>/ (or any directory) holding:
- manifest.json: format, base model name and the sha256 of its weights file, label names,
  VQ settings (K, placement), chunking, how it was trained, and the metrics measured;
- codebooks.safetensors: {"codebooks": (layers, heads, K, d) float32}, the same file format as
  engine.model.codebooks bundles, so `--codebooks DIR` tools read a model bundle too;
- head.safetensors: {"weight": (labels, C), "bias": (labels,)} the VQ model's head, and
  {"dense_weight", "dense_bias"} the head of the dense baseline it was distilled from;
- adapter.safetensors (optional, engine.model.adapter): low-rank changes to the encoder, for a
  bundle trained with an adapted encoder; merged into the weights at load time. Its manifest
  says so ("adapter": {...}); without it the encoder is the base, frozen.
The base encoder weights are never copied (they come from the base model package); nothing is
pickled.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from incstream.engine.model.adapter import ADAPTER_FILE, load_adapter, merge_adapter, save_adapter
from incstream.engine.model.base_model import base_model_path
from incstream.engine.model.codebooks import Codebooks, bundle_dir, sha256_file
from incstream.engine.model.device import resolve_device
from incstream.engine.model.head import ClassificationHead
from incstream.engine.model.minilm import cast_weights, load_minilm
from incstream.engine.model.vq_model import VQModel

FORMAT = "incstream-model/v1"
# The default: the polarity bundle trained for edits (adapted encoder, stability objective),
# whose manifest asks for the fast mode; README "Model card" says why it is the default.
DEFAULT_MODEL = "polarity-minilm-vq64-stable"


@lru_cache(maxsize=4)
def base_weights_sha256(base_model: str) -> str:
    return sha256_file(base_model_path(base_model) / "model.safetensors")


def save_model_bundle(path: Path, codebooks: torch.Tensor, head_weight: torch.Tensor,
                      head_bias: torch.Tensor, dense_weight: torch.Tensor,
                      dense_bias: torch.Tensor, manifest: dict,
                      adapter: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a bundle; `manifest` gets the format, the base sha256 and the files' sha256."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float32).contiguous().cpu()

    save_file({"codebooks": f32(codebooks)}, str(path / "codebooks.safetensors"))
    save_file({"weight": f32(head_weight), "bias": f32(head_bias),
               "dense_weight": f32(dense_weight), "dense_bias": f32(dense_bias)},
              str(path / "head.safetensors"))
    files = ["codebooks.safetensors", "head.safetensors"]
    if adapter is not None:
        save_adapter(path / ADAPTER_FILE, adapter)
        files.append(ADAPTER_FILE)
    elif (path / ADAPTER_FILE).exists():
        (path / ADAPTER_FILE).unlink()  # a frozen-encoder bundle written over an adapted one
    full = {"format": FORMAT, **manifest,
            "base_weights_sha256": base_weights_sha256(manifest["base_model"]),
            "files": {f: sha256_file(path / f) for f in files}}
    (path / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
    return path


def read_manifest(name_or_dir: str | Path = DEFAULT_MODEL) -> tuple[Path, dict]:
    path = bundle_dir(str(name_or_dir))
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"no model bundle at {path} (manifest.json missing)")
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} bundle (format={manifest.get('format')!r})")
    return path, manifest


def load_heads(name_or_dir: str | Path = DEFAULT_MODEL) -> tuple[ClassificationHead,
                                                                 ClassificationHead]:
    """(VQ head, dense head) of a bundle, float64 on CPU, with the label names."""
    path, manifest = read_manifest(name_or_dir)
    t = load_file(str(path / "head.safetensors"))
    labels = tuple(manifest["labels"])

    def head(w: str, b: str) -> ClassificationHead:
        return ClassificationHead(t[w].to(torch.float64), t[b].to(torch.float64), labels)

    return head("weight", "bias"), head("dense_weight", "dense_bias")


def load_model_bundle(name_or_dir: str | Path = DEFAULT_MODEL,
                      device: str | torch.device | None = None,
                      with_original: bool = True,
                      check_base: bool = True) -> tuple[VQModel, dict]:
    """A trained VQ model (engine.model.vq_model.VQModel with the bundle's codebooks and head)
    and its
    manifest. `model.original` is the float32 base encoder (the dense baseline's encoder) when
    `with_original`; the dense baseline's head is `load_heads(...)[1]`.
    """
    path, manifest = read_manifest(name_or_dir)
    base = manifest["base_model"]
    if check_base and base_weights_sha256(base) != manifest["base_weights_sha256"]:
        raise ValueError(f"{path}: base model {base!r} weights differ from the ones it was "
                         "trained on (sha256 mismatch)")
    dev = resolve_device(device)
    codes = load_file(str(path / "codebooks.safetensors"))["codebooks"]
    head, _ = load_heads(path)
    head = ClassificationHead(head.weight.to(dev), head.bias.to(dev), head.labels)
    original = load_minilm(base_model_path(base), torch.float32, dev)
    adapter = load_adapter(path)
    if adapter is not None:
        if not manifest.get("adapter"):
            raise ValueError(f"{path}: {ADAPTER_FILE} present but the manifest has no 'adapter'")
        w64 = cast_weights(merge_adapter(original, adapter), torch.float64)
    else:
        w64 = cast_weights(original, torch.float64)
    original = original if with_original else None
    model = VQModel(w64, Codebooks.from_tensor(codes), head, original, name=base,
                    bundle=manifest)
    return model, manifest
