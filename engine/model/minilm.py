"""all-MiniLM-L6-v2 (a BERT encoder) written out with explicit tensors, nanoGPT style.

Why our own model rather than transformers' BertModel: incremental inference needs to run each
piece of a layer (Q/K/V projections, attention, output projection, FFN) on arbitrary subsets of
rows, and to count the MACs of each piece with one counter. Weights come straight from the
HF safetensors file (never pickle).

Shapes: n = tokens in a chunk, C = hidden 384, H = 12 heads, d = 32 per head, F = 1536 FFN.
BERT is post-LayerNorm: x -> LN(x + Attn(x)) -> LN(h + FFN(h)). No attention mask is needed:
a chunk is always one unpadded sequence ([CLS] tokens [SEP]).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from incstream.engine.model.half_linear import half_weight
from incstream.engine.model.int8_linear import quantize
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.packed_linear import TYPICAL_ROWS, pack, project


@dataclass(frozen=True)
class MiniLMConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    ffn: int = 1536
    max_positions: int = 512
    layer_norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_json(cls, path: Path) -> MiniLMConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get(
            "position_embedding_type", "absolute"
        ) != "absolute":
            raise ValueError("only BERT encoders with GELU and absolute positions are supported")
        return cls(
            vocab_size=raw["vocab_size"], hidden=raw["hidden_size"],
            layers=raw["num_hidden_layers"], heads=raw["num_attention_heads"],
            ffn=raw["intermediate_size"], max_positions=raw["max_position_embeddings"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


@dataclass
class LayerWeights:
    """One transformer block. Linear weights are stored (out, in) like nn.Linear; in a model
    made by `with_packed_matrices`, `with_int8_matrices` or `with_half_matrices` some are
    PackedWeight, Int8Weight or HalfWeight (engine.model.packed_linear, int8_linear,
    half_linear), which only `linear` reads."""

    wq: torch.Tensor
    bq: torch.Tensor
    wk: torch.Tensor
    bk: torch.Tensor
    wv: torch.Tensor
    bv: torch.Tensor
    wo: torch.Tensor  # (C, C): columns h*d:(h+1)*d read head h's context
    bo: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    w_up: torch.Tensor  # (F, C)
    b_up: torch.Tensor
    w_down: torch.Tensor  # (C, F)
    b_down: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


@dataclass
class MiniLMWeights:
    config: MiniLMConfig
    word: torch.Tensor  # (V, C)
    position: torch.Tensor  # (512, C)
    token_type0: torch.Tensor  # (C,) we only ever use segment 0
    emb_ln_w: torch.Tensor
    emb_ln_b: torch.Tensor
    layers: list[LayerWeights]

    @property
    def dtype(self) -> torch.dtype:
        return self.word.dtype

    @property
    def device(self) -> torch.device:
        return self.word.device


def load_minilm(path: Path, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> MiniLMWeights:
    """Load config.json + model.safetensors from a local directory (no network, no pickle)."""
    path = Path(path)
    cfg = MiniLMConfig.from_json(path / "config.json")
    raw = load_file(str(path / "model.safetensors"))
    # Some exports prefix every key with "bert."; accept both.
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}

    def t(name: str) -> torch.Tensor:
        return raw[name].to(device=device, dtype=dtype).contiguous()

    layers = []
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}."
        layers.append(LayerWeights(
            wq=t(p + "attention.self.query.weight"), bq=t(p + "attention.self.query.bias"),
            wk=t(p + "attention.self.key.weight"), bk=t(p + "attention.self.key.bias"),
            wv=t(p + "attention.self.value.weight"), bv=t(p + "attention.self.value.bias"),
            wo=t(p + "attention.output.dense.weight"), bo=t(p + "attention.output.dense.bias"),
            ln1_w=t(p + "attention.output.LayerNorm.weight"),
            ln1_b=t(p + "attention.output.LayerNorm.bias"),
            w_up=t(p + "intermediate.dense.weight"), b_up=t(p + "intermediate.dense.bias"),
            w_down=t(p + "output.dense.weight"), b_down=t(p + "output.dense.bias"),
            ln2_w=t(p + "output.LayerNorm.weight"), ln2_b=t(p + "output.LayerNorm.bias"),
        ))
    return MiniLMWeights(
        config=cfg, word=t("embeddings.word_embeddings.weight"),
        position=t("embeddings.position_embeddings.weight"),
        token_type0=t("embeddings.token_type_embeddings.weight")[0].contiguous(),
        emb_ln_w=t("embeddings.LayerNorm.weight"), emb_ln_b=t("embeddings.LayerNorm.bias"),
        layers=layers,
    )


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, macs: MacCounter) -> torch.Tensor:
    """x (n, in) @ w.T (in, out) + b; counts n*in*out MACs. Weights in a lower precision
    (the fast mode's bfloat16 matmuls) compute in their dtype and return x's."""
    macs.add("linear", x.shape[0] * w.shape[0] * w.shape[1])
    return project(x, w, b).to(x.dtype)


LINEAR_FIELDS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "w_up", "b_up", "w_down",
                 "b_down")
PACKED_FIELDS = ("wq", "wk", "wv", "wo", "w_up", "w_down")


def with_matmul_dtype(w: MiniLMWeights, dtype: torch.dtype) -> MiniLMWeights:
    """The same model with its linear layers' weights and biases in `dtype` (e.g. bfloat16:
    `linear` then multiplies in that dtype and returns float32); embeddings and LayerNorm
    unchanged. The float32 model itself when dtype is float32."""
    if dtype == w.word.dtype:
        return w
    layers = [replace(lw, **{name: getattr(lw, name).to(dtype) for name in LINEAR_FIELDS})
              for lw in w.layers]
    return replace(w, layers=layers)


def with_packed_matrices(w: MiniLMWeights, fields: tuple[str, ...] = PACKED_FIELDS,
                         rows: int = TYPICAL_ROWS) -> MiniLMWeights:
    """The same model with these matrices of its linear layers laid out once for oneDNN, for
    products of about `rows` rows, where it can (engine.model.packed_linear: fewer seconds per
    product on the CPU, same values); `linear` multiplies with them. Only for models that are
    run, never read as matrices (cast first, then pack)."""
    layers = [replace(lw, **{name: pack(getattr(lw, name), rows) for name in fields})
              for lw in w.layers]
    return replace(w, layers=layers)


def with_half_matrices(w: MiniLMWeights,
                       fields: tuple[str, ...] = PACKED_FIELDS) -> MiniLMWeights:
    """The same model with these matrices of its linear layers as HalfWeights (float16 copies
    for products of a few rows, engine.model.half_linear; float32 arithmetic). Only for
    models that are run, never read as matrices."""
    layers = [replace(lw, **{name: half_weight(getattr(lw, name)) for name in fields})
              for lw in w.layers]
    return replace(w, layers=layers)


def with_int8_matrices(w: MiniLMWeights,
                       fields: tuple[str, ...] = PACKED_FIELDS) -> MiniLMWeights:
    """The same model with these matrices of its linear layers (and their biases) quantized
    to int8 per output channel and packed for fbgemm (engine.model.int8_linear): `linear`
    then multiplies dynamically quantized rows with them and returns float32. Only for
    models that are run, never read as matrices."""
    layers = [replace(lw, **{name: quantize(getattr(lw, name), getattr(lw, "b" + name[1:]))
                             for name in fields}) for lw in w.layers]
    return replace(w, layers=layers)


def cast_weights(w: MiniLMWeights, dtype: torch.dtype) -> MiniLMWeights:
    """The same model with every floating-point tensor in `dtype` (w itself if already)."""
    if w.dtype == dtype:
        return w

    def conv(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    layers = [replace(lw, **{name: conv(t) for name, t in vars(lw).items()}) for lw in w.layers]
    return replace(w, word=conv(w.word), position=conv(w.position),
                   token_type0=conv(w.token_type0), emb_ln_w=conv(w.emb_ln_w),
                   emb_ln_b=conv(w.emb_ln_b), layers=layers)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def embed(w: MiniLMWeights, token_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Layer-0 input (n, C): LN(word + position + segment-0). Lookups, no MACs.

    Depends only on (token, position) of the same row: an edit changes here the inserted rows
    and the rows whose canonical position moved (those after it in the same chunk).
    """
    x = w.word[token_ids] + w.position[position_ids] + w.token_type0
    return layer_norm(x, w.emb_ln_w, w.emb_ln_b, w.config.layer_norm_eps)


def qkv(layer: LayerWeights, x: torch.Tensor, heads: int,
        macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row projections, each (n, H, d). Row i depends only on x_i."""
    n, d = x.shape[0], layer.wq.shape[0] // heads
    q = linear(x, layer.wq, layer.bq, macs).view(n, heads, d)
    k = linear(x, layer.wk, layer.bk, macs).view(n, heads, d)
    v = linear(x, layer.wv, layer.bv, macs).view(n, heads, d)
    return q, k, v


def attention_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      macs: MacCounter) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for the rows in q against all rows of k, v: (m, H, d)."""
    m, heads, d = q.shape
    n = k.shape[0]
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)  # (H, m, n)
    macs.add("attn_scores", m * n * heads * d)
    probs = torch.softmax(scores, dim=-1)
    ctx = torch.einsum("hij,jhd->ihd", probs, v)
    macs.add("attn_values", m * n * heads * d)
    return ctx


def softmax_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-row softmax state for queries q (r, H, d) over keys/values (n, H, d).

    Returns m (r, H), N (r, H, d), D (r, H) with m the row maximum of the scores.
    """
    r, heads, d = q.shape
    n = k.shape[0]
    s = torch.einsum("ihd,jhd->ihj", q, k) / math.sqrt(d)  # (r, H, n)
    macs.add("attn_scores", r * n * heads * d)
    m = s.amax(-1)
    e = torch.exp(s - m.unsqueeze(-1))
    num = torch.einsum("ihj,jhd->ihd", e, v)
    macs.add("attn_values", r * n * heads * d)
    return m, num, e.sum(-1)


def feed_forward_block(layer: LayerWeights, x: torch.Tensor, attn_out: torch.Tensor,
                       eps: float, macs: MacCounter) -> torch.Tensor:
    """The per-position rest of a block after the attention output projection.

    h = LN(x + attn_out); out = LN(h + W_down GELU(W_up h)). Row i depends only on row i.
    """
    h = layer_norm(x + attn_out, layer.ln1_w, layer.ln1_b, eps)
    up = torch.nn.functional.gelu(linear(h, layer.w_up, layer.b_up, macs))
    return layer_norm(h + linear(up, layer.w_down, layer.b_down, macs), layer.ln2_w,
                      layer.ln2_b, eps)


def forward_dense(w: MiniLMWeights, token_ids: torch.Tensor, position_ids: torch.Tensor,
                  macs: MacCounter | None = None) -> torch.Tensor:
    """The ORIGINAL model (no VQ): last hidden state (n, C) of one chunk. The baseline."""
    macs = macs if macs is not None else MacCounter()
    cfg = w.config
    x = embed(w, token_ids, position_ids)
    for layer in w.layers:
        q, k, v = qkv(layer, x, cfg.heads, macs)
        ctx = attention_context(q, k, v, macs).reshape(x.shape[0], cfg.hidden)
        x = feed_forward_block(layer, x, linear(ctx, layer.wo, layer.bo, macs),
                               cfg.layer_norm_eps, macs)
    return x


def random_minilm(config: MiniLMConfig, seed: int = 0, dtype: torch.dtype = torch.float64,
                  device: torch.device | str = "cpu", qk_scale: float = 0.05) -> MiniLMWeights:
    """Random weights of any shape: for fast tests, never for answers.

    A large `qk_scale` gives very peaked attention (scores spread over hundreds), which drives
    incremental attention through its rebase and cancellation paths.
    """
    gen = torch.Generator().manual_seed(seed)
    c, f = config.hidden, config.ffn

    def r(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    layers = [LayerWeights(
        wq=r(c, c, scale=qk_scale), bq=r(c), wk=r(c, c, scale=qk_scale), bk=r(c),
        wv=r(c, c), bv=r(c), wo=r(c, c), bo=r(c),
        ln1_w=ones(c), ln1_b=r(c), w_up=r(f, c), b_up=r(f), w_down=r(c, f), b_down=r(c),
        ln2_w=ones(c), ln2_b=r(c)) for _ in range(config.layers)]
    return MiniLMWeights(config=config, word=r(config.vocab_size, c, scale=1.0),
                         position=r(config.max_positions, c, scale=1.0), token_type0=r(c),
                         emb_ln_w=ones(c), emb_ln_b=r(c), layers=layers)
