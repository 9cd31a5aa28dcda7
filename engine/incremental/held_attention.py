"""The fused CPU version of a fast-mode layer's held attention (steps 2-3 of
engine.incremental.fast_chunk), compiled from held_attention.c at first use (engine.c_kernels).

Why: on a CPU an update of a few rows spends most of its time in the dispatch of ~90 small
tensor operations a layer, not in arithmetic. held_attention.c does the same arithmetic in one
call. Where no compiler works (or on CUDA) `available()` is False and the fast mode runs its
PyTorch version, which stays the reference (tests/engine/test_held_attention.py compares the
two, layer by layer).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from incstream.engine import c_kernels

SOURCE = Path(__file__).with_name("held_attention.c")
HEAD_DIM = 32  # the head width the source is compiled for (its D; MiniLM's 384 / 12 heads)
DEFINES = (f"-DD={HEAD_DIM}",)


def declare(lib: ctypes.CDLL) -> None:
    """held_attention's C signature (held_attention.c)."""
    fn = lib.held_attention
    fn.restype = ctypes.c_int64
    fn.argtypes = ([ctypes.c_int64] * 6 + [ctypes.c_void_p] * 10 + [ctypes.c_float] * 3
                   + [ctypes.c_void_p] * 4)


def _load() -> ctypes.CDLL | None:
    lib = c_kernels.load(SOURCE, DEFINES)
    if lib is not None and lib.held_attention.argtypes is None:
        declare(lib)
    return lib


def available() -> bool:
    """Whether the compiled kernel can run here (builds it the first time)."""
    return _load() is not None


def library_path() -> Path:
    return c_kernels.library_path(SOURCE, DEFINES)


@dataclass(frozen=True, eq=False)
class CodebookConstants:
    """One layer's codebooks as the kernel reads them, converted once (an update calls the
    kernel every layer): cb (H, K, d), sqnorm and gap (H, K), float32, contiguous. `keep`
    holds the tensors that `pointers` point into."""

    codes_per_head: int
    keep: tuple[torch.Tensor, ...]
    pointers: tuple[int, int, int]


def prepare_codebooks(cb: torch.Tensor, sqnorm: torch.Tensor,
                      gap: torch.Tensor) -> CodebookConstants:
    """A layer's codebooks cb (H, K, d), their squared norms and code gaps (H, K) for
    held_attention."""
    keep = tuple(t.detach().to("cpu", torch.float32).contiguous() for t in (cb, sqnorm, gap))
    return CodebookConstants(cb.shape[1], keep, tuple(t.data_ptr() for t in keep))


def held_attention(qkv: torch.Tensor, qkv_s: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor,
                   slack: torch.Tensor, codes: torch.Tensor, s_idx: torch.Tensor,
                   book: CodebookConstants, tau: float,
                   min_slack: float) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One layer's steps 2-3 in place on qkv (n, 3, H, d) float16 (the rows of S take qkv_s,
    rounded), lse (n, H) float32, slack (n, H) float16 and codes (n, H) int64 (shapes and
    meaning in held_attention.c), with the layer's codebooks `book` (prepare_codebooks).
    Returns (u_idx, flips, f_idx): the rows whose context was recomputed (S first, then rows
    whose slack ran out, ascending), how many of them had a held code replaced, and those of
    them outside S (they need the rest of the block)."""
    lib = _load()
    if lib is None:
        raise RuntimeError("the fused held attention is not available (see available())")
    n, _, heads, d = qkv.shape
    for t, dtype in ((qkv, torch.float16), (slack, torch.float16), (lse, torch.float32),
                     (codes, torch.int64), (qkv_s, torch.float32), (kv, torch.float32),
                     (s_idx, torch.int64)):
        if t.dtype is not dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"expected a contiguous CPU {dtype} tensor, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if lse.shape != (n, heads) or slack.shape != (n, heads) or codes.shape != (n, heads):
        raise ValueError(f"expected lse, slack and codes of shape ({n}, {heads})")
    # one buffer for the outputs: u_idx (n), f_idx (n), then n flags of one byte
    out = torch.empty(3 * n, dtype=torch.int64)
    base = out.data_ptr()
    flips = (ctypes.c_int64 * 2)()
    u = lib.held_attention(
        n, heads, d, book.codes_per_head, s_idx.shape[0], kv.shape[0],
        qkv.data_ptr(), qkv_s.data_ptr(), kv.data_ptr(), lse.data_ptr(), slack.data_ptr(),
        codes.data_ptr(), s_idx.data_ptr(), *book.pointers, tau, min_slack, 1.0 / d ** 0.5,
        base, base + 16 * n, base + 8 * n, flips)
    if u < 0:
        raise MemoryError("held_attention: out of memory")
    return out[:u], flips[0], out[n : n + flips[1]]
