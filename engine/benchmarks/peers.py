"""What a user would run instead of the engine, and the reference it is judged against.

- `ChunkCache`: the peer a user could build in an afternoon. Same tokens and the same content-
  defined chunks as the engine; keeps ONE pooled float32 vector per chunk (keyed by the chunk's
  token ids) and re-runs the dense float32 MiniLM only on chunks whose ids it has not seen.
  Timed on its dense forwards alone: its change detection is given to it for free. Also run
  with bfloat16 matmuls (`chunk_cache_bf16`), the cheap speed-up any user of a recent CPU has,
  and with its matrices laid out once for oneDNN (`chunk_cache_onednn`, float32, and
  `chunk_cache_bf16_onednn`; engine.model.packed_linear), and with int8 weights and
  dynamically quantized rows (`chunk_cache_int8`, engine.model.int8_linear: what
  `torch.ao.quantization.quantize_dynamic` makes of it, with 8-bit rows where AVX512-VNNI
  allows), the fastest ways we know to run it in
  PyTorch on the CPU. `CHUNK_CACHE_VARIANTS` lists them, `chunk_cache_variants` those that
  run on a device.
- `full_dense`: re-run the dense float32 MiniLM on the whole document (tokenize the whole text,
  forward every chunk), what a user without any cache runs.
- `FreshReference`: a fresh EXACT build of the current text (float64 VQ model, canonical
  positions, nearest codes), whose per-chunk pooled vectors are cached by the chunk's token ids
  (a chunk's activations depend only on its ids), so measuring divergence after every edit
  costs one dense forward per touched chunk. Nothing comes from the engine's state.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from incstream.engine.incremental.chunks import (
    ChunkPolicy,
    chunk_lengths,
    offsets,
    word_continuation_mask,
)
from incstream.engine.model.head import document_pooled
from incstream.engine.model.int8_linear import int8_available
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import (
    forward_dense,
    with_int8_matrices,
    with_matmul_dtype,
    with_packed_matrices,
)
from incstream.engine.model.vq_model import VQModel


def _chunk_ids(cls_id: int, sep_id: int, ids: Sequence[int], device) -> torch.Tensor:
    return torch.tensor([cls_id, *ids, sep_id], dtype=torch.long, device=device)


class _PooledCache:
    """LRU of chunk token ids -> pooled vector, so a long replay does not grow without bound."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[int, ...]) -> torch.Tensor | None:
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    def put(self, key: tuple[int, ...], value: torch.Tensor) -> None:
        self.entries[key] = value
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)


class ChunkCache:
    """Dense model re-run only on chunks whose token ids changed; its linear layers multiply
    in `matmul` (float32, or bfloat16 as a user on a CPU with AVX512-BF16/AMX could run it,
    or "int8": int8 weights, dynamically quantized rows), with matrices laid out once for
    oneDNN when `packed` (float32 and bfloat16)."""

    def __init__(self, model: VQModel, cls_id: int, sep_id: int,
                 matmul: torch.dtype | str = torch.float32, packed: bool = False):
        self.model = model
        # (cast, then packed for whole chunks; kept on the model, once per variant)
        kept = model.__dict__.setdefault("_chunk_cache_weights", {})
        if (matmul, packed) not in kept:
            if matmul == "int8":
                weights = with_int8_matrices(model.original)
            else:
                weights = with_matmul_dtype(model.original, matmul)
                weights = with_packed_matrices(weights, rows=256) if packed else weights
            kept[matmul, packed] = weights
        self.weights = kept[matmul, packed]
        self.cls_id, self.sep_id = cls_id, sep_id
        self.pooled: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.known = _PooledCache()

    def update(self, ids: Sequence[int], lengths: Sequence[int],
               macs: MacCounter) -> tuple[float, torch.Tensor]:
        """Bring the cache to these tokens and chunks; (seconds of dense work, doc pooled)."""
        seconds = 0.0
        pooled, counts = [], []
        for start, n in zip(offsets(list(lengths)), lengths, strict=True):
            key = tuple(ids[start : start + n])
            vec = self.known.get(key)
            if vec is None:
                started = time.perf_counter()
                chunk = _chunk_ids(self.cls_id, self.sep_id, key, self.model.device)
                with torch.inference_mode():
                    out = forward_dense(self.weights, chunk,
                                        torch.arange(len(chunk), device=chunk.device), macs)
                    vec = out.mean(0)
                if chunk.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - started
                self.known.put(key, vec)
            pooled.append(vec)
            counts.append(n + 2)
        self.pooled, self.counts = pooled, counts
        return seconds, document_pooled(pooled, counts)

    def nbytes(self) -> int:
        """What the peer must hold per document: one vector per chunk and the token ids
        (int32), to know which chunks changed."""
        vec = sum(v.numel() * v.element_size() for v in self.pooled)
        return vec + 4 * sum(n - 2 for n in self.counts)


@dataclass(frozen=True)
class ChunkCacheVariant:
    """One way to run the chunk cache peer; `key` names it in the bench's JSON."""

    key: str
    matmul: torch.dtype | str  # a float dtype, or "int8"
    packed: bool
    what: str

    def cache(self, model: VQModel, cls_id: int, sep_id: int) -> ChunkCache:
        return ChunkCache(model, cls_id, sep_id, self.matmul, self.packed)


CHUNK_CACHE_VARIANTS = (
    ChunkCacheVariant("chunk_cache", torch.float32, False,
                      "the dense float32 model re-run on the chunks whose ids changed "
                      "(torch.nn.functional.linear: MKL's sgemm on the CPU)"),
    ChunkCacheVariant("chunk_cache_bf16", torch.bfloat16, False,
                      "the chunk cache with bfloat16 matmuls (float32 accumulation): the same "
                      "MACs as chunk_cache, run faster on CPUs with AVX512-BF16/AMX"),
    ChunkCacheVariant("chunk_cache_onednn", torch.float32, True,
                      "the float32 chunk cache with its matrices laid out once for oneDNN "
                      "(engine.model.packed_linear): the same values, 2x faster than MKL's "
                      "sgemm on AMD CPUs; the fastest float32 peer we know in PyTorch there"),
    ChunkCacheVariant("chunk_cache_bf16_onednn", torch.bfloat16, True,
                      "the bfloat16 chunk cache with its matrices laid out once for oneDNN "
                      "(as the fast mode's own): F.linear re-lays them out on every call"),
    ChunkCacheVariant("chunk_cache_int8", "int8", False,
                      "the chunk cache with int8 weights and dynamically quantized int8 rows "
                      "(fbgemm; as torch.ao.quantization.quantize_dynamic, 8-bit rows where "
                      "AVX512-VNNI allows): a quarter of the weight bytes, ~1.6x faster than "
                      "float32 on a Xeon with VNNI"),
)


def chunk_cache_variants(device: torch.device | str) -> tuple[ChunkCacheVariant, ...]:
    """The variants that run on `device`: int8 only on a CPU with fbgemm."""
    cpu_int8 = torch.device(device).type == "cpu" and int8_available()
    return tuple(v for v in CHUNK_CACHE_VARIANTS if v.matmul != "int8" or cpu_int8)


def full_dense(model: VQModel, tokenizer: Any, text: str, policy: ChunkPolicy,
               macs: MacCounter) -> tuple[float, torch.Tensor]:
    """Tokenize the whole text, cut it, forward every chunk (dense float32). Timed."""
    started = time.perf_counter()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = chunk_lengths(ids, policy, word_continuation_mask(tokenizer))
    pooled = []
    with torch.inference_mode():
        for start, n in zip(offsets(lengths), lengths, strict=True):
            chunk = _chunk_ids(tokenizer.cls_token_id, tokenizer.sep_token_id,
                               ids[start : start + n], model.device)
            out = forward_dense(model.original, chunk,
                                torch.arange(len(chunk), device=chunk.device), macs)
            pooled.append(out.mean(0))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, document_pooled(pooled, [n + 2 for n in lengths])


class FreshReference:
    """Logits of a fresh exact build of a text, chunk forwards cached by token ids."""

    def __init__(self, model: VQModel, tokenizer: Any, policy: ChunkPolicy):
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.continues_word = word_continuation_mask(tokenizer)
        self.known = _PooledCache()

    def logits(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        lengths = chunk_lengths(ids, self.policy, self.continues_word)
        pooled = []
        scratch = MacCounter()
        for start, n in zip(offsets(lengths), lengths, strict=True):
            key = tuple(ids[start : start + n])
            vec = self.known.get(key)
            if vec is None:
                chunk = _chunk_ids(self.tokenizer.cls_token_id, self.tokenizer.sep_token_id,
                                   key, self.model.device)
                vec = self.model.forward(chunk, torch.arange(len(chunk)), scratch).pooled
                self.known.put(key, vec)
            pooled.append(vec)
        return self.model.head.logits(document_pooled(pooled, [n + 2 for n in lengths]))
