"""A differentiable, batched twin of engine.model.vq_model for quantization-aware training (QAT).

Same computation as VQModel.forward (embed -> per block: QKV, softmax attention, per-head
nearest code on the context, W_o, post-LN FFN) but on padded batches (B, n) with a key mask,
in float32, with gradients. Only the codebooks and the classification head are trainable; the
base encoder stays frozen, so a trained model is the base weights plus a few hundred KB.

Quantizer: the forward uses the nearest code c = argmin_k |ctx - codebook_k|; the quantized
context IS the code, so the task / distillation loss reaches the chosen codes directly. The
encoder being frozen, a straight-through estimator (ctx + (c - ctx).detach()) would only carry
gradient into weights we do not train; `codebook_loss` = |sg(ctx) - c|^2 keeps the codes on
their contexts (the k-means objective, what EMA codebooks would do).
With `quantize=False` the same module is the dense model (the distillation teacher).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import MiniLMWeights, embed, feed_forward_block


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, n, C) last hidden state
    pooled: torch.Tensor  # (B, C) mean over valid rows
    codebook_loss: torch.Tensor  # scalar, mean over layers of |sg(ctx) - c|^2 (0 when dense)


class TrainableVQ(nn.Module):
    """Frozen MiniLM weights + trainable codebooks (L, H, K, d) + linear head (labels, C)."""

    def __init__(self, base: MiniLMWeights, codebooks: torch.Tensor, n_labels: int):
        super().__init__()
        self.base = base
        self.cfg = base.config
        self.codebooks = nn.Parameter(codebooks.detach().to(torch.float32).clone())
        self.head = nn.Linear(self.cfg.hidden, n_labels)

    @property
    def k(self) -> int:
        return self.codebooks.shape[2]

    def quantize(self, layer: int, ctx: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx (B, n, H, d) -> nearest codes (B, n, H, d) (grad to the codebook) and its loss."""
        cb = self.codebooks[layer]  # (H, K, d)
        dots = torch.einsum("bihd,hkd->bihk", ctx.detach(), cb.detach())
        dist2 = (cb.detach() ** 2).sum(-1) - 2.0 * dots  # (B, n, H, K), |ctx|^2 dropped
        idx = dist2.argmin(-1)  # (B, n, H)
        heads = torch.arange(cb.shape[0], device=ctx.device)
        code = cb[heads, idx]  # (B, n, H, d)
        err = ((code - ctx.detach()) ** 2).sum(-1)  # (B, n, H)
        loss = (err * mask.unsqueeze(-1)).sum() / (mask.sum() * cb.shape[0])
        return code, loss

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, quantize: bool = True) -> EncoderOutput:
        """ids, mask: (B, n); canonical positions 0..n-1 (pads at the right)."""
        w, cfg = self.base, self.cfg
        b, n = ids.shape
        h, d = cfg.heads, cfg.head_dim
        macs = MacCounter()  # not reported; the engine's own paths count MACs
        pos = torch.arange(n, device=ids.device).expand(b, n)
        x = embed(w, ids, pos)  # (B, n, C)
        key_mask = ~mask[:, None, None, :]  # (B, 1, 1, n): True where a key is padding
        cb_loss = torch.zeros((), device=ids.device)
        for layer_idx, lw in enumerate(w.layers):
            q = F.linear(x, lw.wq, lw.bq).view(b, n, h, d)
            k = F.linear(x, lw.wk, lw.bk).view(b, n, h, d)
            v = F.linear(x, lw.wv, lw.bv).view(b, n, h, d)
            scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)  # (B, H, n, n)
            probs = scores.masked_fill(key_mask, float("-inf")).softmax(-1)
            ctx = torch.einsum("bhij,bjhd->bihd", probs, v)  # (B, n, H, d)
            if quantize:
                ctx, loss = self.quantize(layer_idx, ctx, mask)
                cb_loss = cb_loss + loss / cfg.layers
            attn_out = F.linear(ctx.reshape(b, n, h * d), lw.wo, lw.bo)  # (B, n, C)
            x = feed_forward_block(lw, x, attn_out, cfg.layer_norm_eps, macs)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1)
        return EncoderOutput(x, pooled, cb_loss)


def document_pool(chunk_pooled: torch.Tensor, counts: torch.Tensor,
                  doc_index: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Token-count-weighted mean of chunk vectors per document, as
    engine.model.head.document_pooled.

    chunk_pooled (B, C), counts (B,) rows per chunk, doc_index (B,) -> (n_docs, C).
    """
    wts = counts.to(chunk_pooled.dtype).unsqueeze(1)
    sums = torch.zeros(n_docs, chunk_pooled.shape[1], dtype=chunk_pooled.dtype,
                       device=chunk_pooled.device).index_add_(0, doc_index, chunk_pooled * wts)
    totals = torch.zeros(n_docs, 1, dtype=chunk_pooled.dtype,
                         device=chunk_pooled.device).index_add_(0, doc_index, wts)
    return sums / totals


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    log_target=True, reduction="batchmean") * t * t
