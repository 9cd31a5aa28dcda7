"""The vector-quantized MiniLM: the original weights plus per-head codebooks on the attention
context, and its dense forward, which is THE REFERENCE that incremental inference must equal.

Numerics: the VQ model runs in float64 (weights cast up from float32). Why: a code is a
discrete decision, and float32 matmuls over different row subsets differ in the last bits on
CPU (measured ~1e-5 here), which can flip a near-tie between two codes. In float64 the
incremental path and this dense path agree to ~1e-13, far inside the margin slack, so codes
match exactly. The original (non-VQ) baseline stays float32, as a user would run it.

Output projection: a head's context is replaced by code c, so W_o,h . codebook_h[c] is a fixed
row of a (H, K, C) table; the attention output of a row is the sum of its H table rows plus the
bias (lookups and adds, 0 MACs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from incstream.engine.model.base_model import DEFAULT_BASE_MODEL, base_model_path
from incstream.engine.model.codebooks import DEFAULT_BUNDLE, Codebooks, load_bundle, sha256_file
from incstream.engine.model.device import resolve_device
from incstream.engine.model.head import ClassificationHead
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import (
    MiniLMWeights,
    embed,
    feed_forward_block,
    load_minilm,
    qkv,
    softmax_rows,
)


@dataclass
class LayerState:
    """Per position state of one layer; n rows in document order."""

    x: torch.Tensor  # (n, C) layer input
    q: torch.Tensor  # (n, H, d)
    k: torch.Tensor  # (n, H, d)
    v: torch.Tensor  # (n, H, d)
    m: torch.Tensor  # (n, H) reference subtracted from scores before exp
    num: torch.Tensor  # (n, H, d) softmax numerator
    den: torch.Tensor  # (n, H) softmax denominator
    codes: torch.Tensor  # (n, H) long
    margin: torch.Tensor  # (n, H) d2 - d1 at quantization time
    ctx_q: torch.Tensor  # (n, H, d) the context when the row was last quantized


@dataclass
class ChunkActivations:
    """Everything a chunk's incremental update needs: per layer state, and the last output."""

    token_ids: torch.Tensor  # (n,) long, [CLS] ... [SEP]
    position_ids: torch.Tensor  # (n,) long
    layers: list[LayerState]
    out: torch.Tensor  # (n, C) last hidden state

    @property
    def pooled(self) -> torch.Tensor:
        """Mean over all rows ([CLS] and [SEP] included, as sentence-transformers pools)."""
        return self.out.mean(0)

    def nbytes(self) -> int:
        """Memory held by this chunk's tensors (what a hot cache has to budget for)."""
        tensors = [self.token_ids, self.position_ids, self.out]
        for state in self.layers:
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


class VQModel:
    """MiniLM weights (float64), codebooks and output lookup tables, and a classification head.

    `original` is the same base model in float32 without VQ: the dense baseline.
    """

    def __init__(self, weights: MiniLMWeights, codebooks: Codebooks, head: ClassificationHead,
                 original: MiniLMWeights | None = None, name: str = DEFAULT_BASE_MODEL,
                 bundle: dict | None = None):
        self.w = weights
        self.cfg = weights.config
        self.codebooks = codebooks.to(weights.device, weights.dtype)
        self.head = head
        self.original = original
        self.name = name
        self.bundle = bundle or {}
        d = self.cfg.head_dim
        tables = []
        for layer_idx, layer in enumerate(weights.layers):
            cb = self.codebooks.codes[layer_idx]  # (H, K, d)
            wo_heads = layer.wo.view(self.cfg.hidden, self.cfg.heads, d)  # (C, H, d)
            tables.append(torch.einsum("hkd,chd->hkc", cb, wo_heads))  # (H, K, C)
        self.tables = tables

    @classmethod
    def load(cls, name: str = DEFAULT_BASE_MODEL, bundle: str = DEFAULT_BUNDLE,
             device: str | torch.device | None = None, with_original: bool = True,
             head: ClassificationHead | None = None) -> VQModel:
        dev = resolve_device(device)
        path = base_model_path(name)
        codebooks, manifest = load_bundle(bundle)
        weights_sha = sha256_file(path / "model.safetensors")
        if manifest.get("base_weights_sha256") not in (None, weights_sha):
            # Codebooks calibrated on other weights would quantize meaningless contexts.
            raise ValueError(f"codebook bundle {bundle!r} was made for other base weights "
                             f"({manifest.get('base_model')!r}), not {name!r}")
        w64 = load_minilm(path, torch.float64, dev)
        original = load_minilm(path, torch.float32, dev) if with_original else None
        head = head or ClassificationHead.identity(w64.config.hidden, dev)
        return cls(w64, codebooks, head, original, name=name, bundle=manifest)

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def k(self) -> int:
        return self.codebooks.k

    def attention_output(self, layer: int, codes: torch.Tensor, macs: MacCounter) -> torch.Tensor:
        """Sum over heads of table[h, code_h] plus bias, for codes (m, H) -> (m, C)."""
        m, heads = codes.shape
        table = self.tables[layer]
        rows = table[torch.arange(heads, device=codes.device), codes]  # (m, H, C)
        macs.add_adds(m * heads * self.cfg.hidden)
        return rows.sum(1) + self.w.layers[layer].bo

    def layer_dense(self, layer: int, x: torch.Tensor,
                    macs: MacCounter) -> tuple[LayerState, torch.Tensor]:
        """One VQ block on all rows: the reference computation."""
        lw = self.w.layers[layer]
        q, k, v = qkv(lw, x, self.cfg.heads, macs)
        m, num, den = softmax_rows(q, k, v, macs)
        ctx = num / den.unsqueeze(-1)
        codes, margin = self.codebooks.nearest_all(layer, ctx, macs)
        out = feed_forward_block(lw, x, self.attention_output(layer, codes, macs),
                                 self.cfg.layer_norm_eps, macs)
        state = LayerState(x=x, q=q, k=k, v=v, m=m, num=num, den=den, codes=codes,
                           margin=margin, ctx_q=ctx)
        return state, out

    def forward(self, token_ids: torch.Tensor, position_ids: torch.Tensor,
                macs: MacCounter | None = None) -> ChunkActivations:
        """Dense VQ forward of one chunk, keeping the state incremental updates start from."""
        macs = macs if macs is not None else MacCounter()
        token_ids = token_ids.to(self.device)
        position_ids = position_ids.to(self.device)
        x = embed(self.w, token_ids, position_ids)
        layers = []
        for layer in range(self.cfg.layers):
            state, x = self.layer_dense(layer, x, macs)
            layers.append(state)
        return ChunkActivations(token_ids, position_ids, layers, x)
