"""Linear layers whose weight matrices are laid out once for oneDNN, on the CPU.

`torch.nn.functional.linear` on the CPU gives a float32 product to MKL's sgemm and a bfloat16
one to oneDNN, which then re-lays the weight out into its blocked format on every call. Both
cost the engine's updates, which multiply only a few rows at a time:
- a bfloat16 call spends ~20 us re-laying a 1152 x 384 matrix out, as much as the product of
  4 rows itself;
- float32 sgemm runs 2-2.5x slower than oneDNN's float32 kernels on this project's CPUs (AMD
  EPYC, where MKL does not pick its AVX-512 paths), 4 rows or 256 alike.
oneDNN can take the weight laid out once, `torch.ops.mkldnn._reorder_linear_weight`, and
multiply with it, `torch.ops.mkldnn._linear_pointwise` (the operators torch.compile's weight
freezing emits for low-precision linear layers on the CPU; for float32 it prepacks for MKL,
which gains nothing here). Results equal F.linear's up to summation order (bfloat16: bit for
bit in tests/engine/test_packed_linear.py).

A packed weight is a tensor of the weight's shape whose memory is NOT the matrix; it travels
in a `PackedWeight` so that nothing but `project` can read it as one by mistake. Pack a model
after casting it, never before. Where oneDNN or those operators are missing (another build of
torch, CUDA, float64, bfloat16 on a CPU without AVX-512), `pack` returns the weight unchanged
and `project` is F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from incstream.engine.model.half_linear import HalfWeight, project_half
from incstream.engine.model.int8_linear import Int8Weight, project_int8

PACKABLE = (torch.float32, torch.bfloat16)
# The row count oneDNN is told to expect; its kernels serve any count (tested from 1 to 256).
TYPICAL_ROWS = 4


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """An (out, in) weight matrix in oneDNN's blocked layout; read it only through `project`."""

    blocked: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has oneDNN and the two operators that pack and multiply, and for
    bfloat16 a CPU oneDNN takes it on (it refuses to pack bfloat16 without AVX-512)."""
    if dtype not in PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 (resolving raises if absent)
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return True


def pack(w: torch.Tensor, rows: int = TYPICAL_ROWS) -> torch.Tensor | PackedWeight:
    """w (out, in) laid out for oneDNN, expecting products of about `rows` rows, or w itself
    where it cannot be (not a float32/bfloat16 CPU matrix, or no oneDNN for its dtype)."""
    if w.dim() != 2 or w.device.type != "cpu" or not packing_available(w.dtype):
        return w
    blocked = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
    return PackedWeight(blocked, w.shape, w.dtype)


def project(x: torch.Tensor, w: torch.Tensor | PackedWeight | Int8Weight | HalfWeight,
            b: torch.Tensor | None, any_rows: bool = False) -> torch.Tensor:
    """x (n, in) @ w.T + b in w's dtype (x is cast to it; the result stays in w's dtype).
    An Int8Weight (engine.model.int8_linear) carries its own bias and returns float32; a
    HalfWeight (engine.model.half_linear) returns float32, through its kernel for a few rows
    or, with `any_rows`, any number (half_linear.project_half)."""
    if isinstance(w, Int8Weight):
        return project_int8(x, w)
    if isinstance(w, HalfWeight):
        return project_half(x, w, b, any_rows)
    if isinstance(w, PackedWeight):
        if x.shape[0] == 0:  # (oneDNN wants at least one row)
            return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=w.dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(w.dtype).contiguous(), w.blocked, b,
                                                  "none", [], "")
    return torch.nn.functional.linear(x.to(w.dtype), w, b)
