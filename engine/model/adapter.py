"""Low-rank adapters: how a trained VQ bundle changes the encoder without copying it.

A bundle trained with an adapted encoder (engine.training.adapted_vq) stores, per adapted
weight matrix W (out, in) of a block, two factors A (r, in) and B (out, r), the scale already
folded into B, so the encoder it runs is

    W' = W + B @ A                (rank r: r*(in+out) numbers instead of in*out)

plus, whole, the small tensors it retrained (biases, LayerNorm gains and offsets). The file is
``adapter.safetensors`` in the bundle: keys ``layers.<i>.<matrix>.lora_a`` / ``.lora_b`` and
flat names (``layers.<i>.bq``, ...) for whole tensors. Rank 8 on the six matrices of all six
blocks is about 1.3 MB in float32, small enough for the repository (a fully fine-tuned encoder
is 67 MB).

The merge is done once, at load time, in float32: the VQ model's float64 weights are then the
float32 merged weights cast up, exactly as the unadapted model's float64 weights are the
float32 base cast up, so every engine path (float64 reference, float32 fast mode, bfloat16
matmuls) sees the same encoder and costs the same as without an adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from incstream.engine.model.dense_finetuned import flat_tensors, weights_from_flat
from incstream.engine.model.minilm import MiniLMWeights

ADAPTER_FILE = "adapter.safetensors"
ADAPTED_MATRICES = ("wq", "wk", "wv", "wo", "w_up", "w_down")
# Retrained whole: biases and LayerNorm of every block (a few thousand numbers per block).
WHOLE_FIELDS = ("bq", "bk", "bv", "bo", "b_up", "b_down", "ln1_w", "ln1_b", "ln2_w", "ln2_b")


def merge_adapter(base: MiniLMWeights, adapter: dict[str, torch.Tensor]) -> MiniLMWeights:
    """A new MiniLMWeights in base's dtype: W + B @ A for each factored matrix, whole tensors
    replaced. The merge is computed in float32 whatever base's dtype (see the module doc)."""
    tensors = dict(flat_tensors(base))
    for key, value in adapter.items():
        if key.endswith(".lora_b"):
            continue
        if key.endswith(".lora_a"):
            name = key.removesuffix(".lora_a")
            b = adapter[f"{name}.lora_b"].to(device=base.device, dtype=torch.float32)
            a = value.to(device=base.device, dtype=torch.float32)
            merged = tensors[name].to(torch.float32) + b @ a
        else:
            name, merged = key, value.to(device=base.device, dtype=torch.float32)
        if name not in tensors or tensors[name].shape != merged.shape:
            raise ValueError(f"adapter tensor {key!r} does not fit the base encoder")
        tensors[name] = merged.to(base.dtype).contiguous()
    return weights_from_flat(base.config, tensors)


def save_adapter(path: Path, adapter: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in adapter.items()},
              str(path))


def load_adapter(bundle: Path) -> dict[str, torch.Tensor] | None:
    """The adapter of a bundle directory (float32, CPU), or None for a frozen-encoder bundle."""
    path = Path(bundle) / ADAPTER_FILE
    return load_file(str(path)) if path.exists() else None
