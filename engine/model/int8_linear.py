"""Linear layers with int8 weights and dynamically quantized int8 activations, on the CPU.

Why: an update of the fast mode multiplies a few rows per layer, so its time goes into
reading the weight matrices, not into arithmetic. MiniLM's Q/K/V and feed-forward matrices
are 39 MB in float32: more than the last-level cache of many CPUs (35.8 MB shared on the
2-core Xeon this was measured on), so every update streams them from memory. In int8 they
are 9.8 MB and stay in the cache; a product of 4 rows with a 1152 x 384 matrix takes ~70 us
instead of ~350 us there.

How: the weight is quantized once per output channel (symmetric, scale = max |w| / 127) and
packed with its bias for fbgemm (`torch.ops.quantized.linear_prepack`); each call quantizes
its input rows with one scale and zero point for the whole input (their min and max) and
returns float32 (`torch.ops.quantized.linear_dynamic`). That is what
`torch.ao.quantization.quantize_dynamic` does to an `nn.Linear`, without its module machinery,
except that quantize_dynamic always gives the rows 7 bits (`reduce_range`) and this gives them 8
where the CPU has AVX512-VNNI (fbgemm's kernels for it cannot saturate). Relative error of one
product about 0.8 % (0.4 % from the weights alone); with 7-bit rows about 1.3 %.

Where fbgemm (or the x86 quantized engine) is missing, `int8_available()` is False: the fast
mode refuses matmul "int8" there with a ValueError (engine.incremental.fast_mode), and the
benchmarks leave the int8 peer out. `quantize` takes CPU tensors only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """An (out, in) weight matrix and its bias, quantized and packed for fbgemm; multiply
    with `project` (engine.model.packed_linear), which ignores the bias passed there."""

    packed: torch.ScriptObject
    shape: torch.Size
    reduce_range: bool
    dtype: torch.dtype = torch.float32  # what products return

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@cache
def int8_available() -> bool:
    """Whether this torch runs dynamically quantized linear layers on the CPU (fbgemm)."""
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" in engines or "x86" in engines


@cache
def _has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AVX512-VNNI, where fbgemm's int8 products do not saturate. (AVX-VNNI without AVX-512
    does not count: fbgemm has no kernels for it and runs its AVX2 ones, which can.)"""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_vnni" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def quantize(w: torch.Tensor, b: torch.Tensor | None) -> Int8Weight:
    """w (out, in) and bias b (out,) as int8 per output channel, packed for fbgemm."""
    if w.device.type != "cpu":
        raise ValueError(f"int8 weights are for the CPU (fbgemm), not {w.device}")
    w = w.detach().to(torch.float32).contiguous()
    scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12).to(torch.float64)
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated API in torch 2.13
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*",
                                category=UserWarning)
        qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        bias = None if b is None else b.detach().to(torch.float32).contiguous()
        packed = torch.ops.quantized.linear_prepack(qw, bias)
    return Int8Weight(packed, w.shape, reduce_range=not _has_vnni())


def project_int8(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x (n, in) @ w.T + bias in float32."""
    if x.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.float32)
    return torch.ops.quantized.linear_dynamic(x.to(torch.float32).contiguous(), w.packed,
                                              w.reduce_range)
