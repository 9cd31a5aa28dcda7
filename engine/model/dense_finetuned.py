"""The fine-tuned dense baseline: the base MiniLM encoder plus a stored delta, and its head.

A fine-tuned dense model is a directory (default <data home>/bundles/<task>-minilm-dense-finetuned,
written by `incstream train-dense`) holding:
- manifest.json: format, base model + sha256 of its weights, labels, chunking, training record
  (config, device, threads, wall time, validation learning curve), files' sha256;
- encoder-delta.safetensors: only the encoder tensors that differ from the base weights, in
  float32. A whole tensor is stored under its flat name ("layers.3.w_up", ...); the lookup tables
  ("word", "position") store only their changed rows as "<name>.index" (long) + "<name>.rows";
- head.safetensors: {"weight": (labels, C), "bias": (labels,)}.
Fine-tuning moves every matrix of the encoder, so the delta is most of the ~90 MB base: it
lives in the data directory, never in the repository. Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from incstream.engine.model.base_model import base_model_path
from incstream.engine.model.codebooks import sha256_file
from incstream.engine.model.device import resolve_device
from incstream.engine.model.head import ClassificationHead
from incstream.engine.model.minilm import LayerWeights, MiniLMWeights, load_minilm
from incstream.paths import bundles_dir, task_slug

FORMAT = "incstream-dense-finetuned/v1"
FILES = ("encoder-delta.safetensors", "head.safetensors")
TOP_FIELDS = ("word", "position", "token_type0", "emb_ln_w", "emb_ln_b")
ROW_TABLES = ("word", "position")


def default_path(dataset: str) -> Path:
    """Where `incstream train-dense` writes a dataset's model unless told otherwise."""
    return bundles_dir() / f"{task_slug(dataset)}-minilm-dense-finetuned"


def flat_tensors(w: MiniLMWeights) -> dict[str, torch.Tensor]:
    """MiniLMWeights -> {flat name: tensor} (the same tensor objects): "word", ...,
    "layers.3.w_up", ..."""
    out = {name: getattr(w, name) for name in TOP_FIELDS}
    for i, lw in enumerate(w.layers):
        out.update({f"layers.{i}.{f}": t for f, t in vars(lw).items()})
    return out


def weights_from_flat(config, tensors: dict[str, torch.Tensor]) -> MiniLMWeights:
    """{flat name: tensor} -> MiniLMWeights (the inverse of flat_tensors)."""
    layers = []
    for i in range(config.layers):
        prefix = f"layers.{i}."
        layers.append(LayerWeights(**{k.removeprefix(prefix): t for k, t in tensors.items()
                                      if k.startswith(prefix)}))
    return MiniLMWeights(config=config, layers=layers,
                         **{name: tensors[name] for name in TOP_FIELDS})


def encoder_delta(tuned: MiniLMWeights, base: MiniLMWeights) -> dict[str, torch.Tensor]:
    """What differs between two encoders of the same shape (bitwise), in float32 on CPU."""
    base_t = flat_tensors(base)
    out = {}
    for name, t in flat_tensors(tuned).items():
        t = t.detach().to(torch.float32).cpu()
        b = base_t[name].detach().to(torch.float32).cpu()
        if torch.equal(t, b):
            continue
        if name in ROW_TABLES:
            rows = (t != b).any(-1).nonzero().squeeze(-1)
            out[f"{name}.index"] = rows
            out[f"{name}.rows"] = t[rows].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def apply_delta(base: MiniLMWeights, delta: dict[str, torch.Tensor]) -> MiniLMWeights:
    """A new MiniLMWeights: the base with `delta` applied (the base is not modified)."""
    tensors = {k: t.clone() for k, t in flat_tensors(base).items()}
    for key, value in delta.items():
        value = value.to(device=base.device)
        if key.endswith(".index"):
            name = key.removesuffix(".index")
            tensors[name][value] = delta[f"{name}.rows"].to(base.device, base.dtype)
        elif not key.endswith(".rows"):
            tensors[key] = value.to(base.dtype)
    return weights_from_flat(base.config, tensors)


def save_dense_finetuned(path: Path, tuned: MiniLMWeights, base: MiniLMWeights,
                         head_weight: torch.Tensor, head_bias: torch.Tensor,
                         manifest: dict) -> Path:
    """Write the delta, the head and the manifest (which gets format, sizes and sha256s)."""
    from incstream.engine.model.model_bundle import base_weights_sha256

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    delta = encoder_delta(tuned, base)
    save_file(delta, str(path / FILES[0]))
    save_file({"weight": head_weight.detach().float().cpu().contiguous(),
               "bias": head_bias.detach().float().cpu().contiguous()}, str(path / FILES[1]))
    changed_rows = {name: int(delta[f"{name}.index"].numel()) for name in ROW_TABLES
                    if f"{name}.index" in delta}
    full = {"format": FORMAT, **manifest,
            "base_weights_sha256": base_weights_sha256(manifest["base_model"]),
            "delta": {"tensors_stored": sorted(k for k in delta if not k.endswith(".index")),
                      "changed_rows": changed_rows,
                      "bytes": {f: (path / f).stat().st_size for f in FILES}},
            "files": {f: sha256_file(path / f) for f in FILES}}
    (path / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
    return path


@dataclass
class DenseFinetuned:
    weights: MiniLMWeights  # float32, the fine-tuned encoder (forward_dense runs it)
    head: ClassificationHead  # float64, with label names
    manifest: dict

    @property
    def chunk_tokens(self) -> int:
        return self.manifest["chunking"]["chunk_tokens"]


def load_dense_finetuned(path: Path | str, device: str | torch.device | None = None,
                         check_base: bool = True) -> DenseFinetuned:
    """The fine-tuned encoder (base weights + delta) and head of a train-dense directory."""
    from incstream.engine.model.model_bundle import base_weights_sha256

    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} model (format={manifest.get('format')!r})")
    base_name = manifest["base_model"]
    if check_base and base_weights_sha256(base_name) != manifest["base_weights_sha256"]:
        raise ValueError(f"{path}: base model {base_name!r} weights differ from the ones it was "
                         "fine-tuned from (sha256 mismatch)")
    base = load_minilm(base_model_path(base_name), torch.float32, resolve_device(device))
    weights = apply_delta(base, load_file(str(path / FILES[0])))
    h = load_file(str(path / FILES[1]))
    head = ClassificationHead(h["weight"].to(torch.float64), h["bias"].to(torch.float64),
                              tuple(manifest["labels"]))
    return DenseFinetuned(weights, head, manifest)
