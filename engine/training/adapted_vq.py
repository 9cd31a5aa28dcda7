"""The VQ model with a trainable encoder: low-rank adapters, codebooks and a head.

Same computation as engine.model.vq_model.VQModel.forward (embed -> per block: QKV, softmax
attention, per-head nearest code on the context, W_o, post-LN FFN) on right-padded batches
(B, n) with a key mask, in float32, with gradients, and with position ids given per row (the
fast mode's stable ids are not 0..n-1).

What trains (the base weights stay frozen and are never stored again):
- per block, a rank-r adapter on each of W_q, W_k, W_v, W_o, W_up, W_down:
  W' = W + (alpha / r) B A, with B initialised to zero, so training starts at the base model;
- per block, the biases and LayerNorm parameters, whole;
- the codebooks (L, H, K, d) and the linear head.
engine.model.adapter merges the same factors into the engine's weights at load time.

Quantizer with gradients both ways: the forward value of a quantized context is its nearest
code c; the task loss reaches c directly and the context ctx through a straight-through
estimator (c + ctx - sg(ctx)). Two VQ-VAE terms keep them together: `codebook_loss`
|sg(ctx) - c|^2 moves codes onto their contexts, `commitment_loss` |ctx - sg(c)|^2 moves the
encoder's contexts onto their codes. The second is what makes codes stable: a context that sits
close to its code, far from the Voronoi boundary, keeps its code when nearby text changes.
Pulling contexts onto codes has a trivial optimum, every context of a head on one code (measured:
layers 1-5 fell to 1-3 codes per head within 100 steps, and the classifier to chance), so
`usage_loss` keeps the codes in use: 1 - H(p)/log K for the batch's mean soft assignment p of
each head (softmax of -distance^2 at the typical nearest-code distance), 0 when every code is
used equally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from incstream.engine.model.adapter import ADAPTED_MATRICES, WHOLE_FIELDS
from incstream.engine.model.dense_finetuned import flat_tensors, weights_from_flat
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import MiniLMWeights, embed, feed_forward_block


@dataclass
class AdaptedOutput:
    hidden: torch.Tensor  # (B, n, C) last hidden state
    layer_outputs: list[torch.Tensor]  # per layer (B, n, C): each block's output
    pooled: torch.Tensor  # (B, C) mean over valid rows
    contexts: list[torch.Tensor]  # per layer (B, n, H, d): the context before quantization
    codes: list[torch.Tensor]  # per layer (B, n, H) long: the nearest codes chosen
    code_vectors: list[torch.Tensor]  # per layer (B, n, H, d): those codes' vectors (no grad)
    codebook_loss: torch.Tensor  # scalar: mean over layers of |sg(ctx) - c|^2
    commitment_loss: torch.Tensor  # scalar: mean over layers of |ctx - sg(c)|^2
    usage_loss: torch.Tensor  # scalar: mean over layers and heads of 1 - H(mean assignment)/log K


class AdaptedVQ(nn.Module):
    def __init__(self, base: MiniLMWeights, codebooks: torch.Tensor, n_labels: int,
                 rank: int = 8, alpha: float = 16.0, seed: int = 0):
        super().__init__()
        self.cfg = base.config
        self.base = base  # frozen float32 tensors; a plain attribute, so not in state_dict
        self.rank = rank
        self.scale = alpha / rank
        base_t = flat_tensors(base)
        gen = torch.Generator().manual_seed(seed)
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.whole = nn.ParameterDict()
        for i in range(self.cfg.layers):
            for name in ADAPTED_MATRICES:
                w = base_t[f"layers.{i}.{name}"]
                out_f, in_f = w.shape
                key = f"{i}__{name}"  # ParameterDict keys may not contain "."
                a = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
                self.lora_a[key] = nn.Parameter(a.to(w.device))
                self.lora_b[key] = nn.Parameter(torch.zeros(out_f, rank, device=w.device))
            for name in WHOLE_FIELDS:
                self.whole[f"{i}__{name}"] = nn.Parameter(
                    base_t[f"layers.{i}.{name}"].detach().clone())
        self.codebooks = nn.Parameter(codebooks.detach().to(torch.float32).clone())
        self.head = nn.Linear(self.cfg.hidden, n_labels)

    def weights(self) -> MiniLMWeights:
        """The adapted encoder as MiniLMWeights over live tensors (differentiable)."""
        tensors = dict(flat_tensors(self.base))
        for key, a in self.lora_a.items():
            i, name = key.split("__")
            flat = f"layers.{i}.{name}"
            tensors[flat] = tensors[flat] + self.scale * (self.lora_b[key] @ a)
        for key, t in self.whole.items():
            i, name = key.split("__")
            tensors[f"layers.{i}.{name}"] = t
        return weights_from_flat(self.cfg, tensors)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores (engine.model.adapter): A, B with the scale folded in, and the
        whole tensors."""
        out = {}
        for key, a in self.lora_a.items():
            i, name = key.split("__")
            out[f"layers.{i}.{name}.lora_a"] = a.detach()
            out[f"layers.{i}.{name}.lora_b"] = (self.scale * self.lora_b[key]).detach()
        for key, t in self.whole.items():
            i, name = key.split("__")
            out[f"layers.{i}.{name}"] = t.detach()
        return out

    def quantize(self, layer: int, ctx: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
        """ctx (B, n, H, d) -> (quantized ctx, codes, code vectors, and the codebook,
        commitment and usage losses over valid rows)."""
        cb = self.codebooks[layer]  # (H, K, d)
        k = cb.shape[1]
        dist2 = ((cb * cb).sum(-1) - 2.0 * torch.einsum("bihd,hkd->bihk", ctx, cb)
                 + (ctx * ctx).sum(-1, keepdim=True))  # (B, n, H, K)
        idx = dist2.detach().argmin(-1)  # (B, n, H)
        heads = torch.arange(cb.shape[0], device=ctx.device)
        code = cb[heads, idx]  # (B, n, H, d), gradient to the codebook
        valid = mask.unsqueeze(-1).to(ctx.dtype)  # (B, n, 1)
        per_row = valid.sum() * cb.shape[0]
        codebook = (((code - ctx.detach()) ** 2).sum(-1) * valid).sum() / per_row
        commitment = (((ctx - code.detach()) ** 2).sum(-1) * valid).sum() / per_row
        nearest = (dist2.detach().amin(-1) * valid).sum() / per_row
        soft = torch.softmax(-dist2 / nearest.clamp_min(1e-6), -1)  # (B, n, H, K)
        mean = (soft * valid.unsqueeze(-1)).sum((0, 1)) / valid.sum()  # (H, K)
        entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1)  # (H,)
        usage = (1.0 - entropy / math.log(k)).mean()
        quantized = code + (ctx - ctx.detach())  # value c; gradient to c and to ctx
        return quantized, idx, code.detach(), codebook, commitment, usage

    def encode(self, ids: torch.Tensor, mask: torch.Tensor,
               positions: torch.Tensor | None = None) -> AdaptedOutput:
        """ids, mask, positions: (B, n); pads at the right (positions default 0..n-1)."""
        w, cfg = self.weights(), self.cfg
        b, n = ids.shape
        h, d = cfg.heads, cfg.head_dim
        macs = MacCounter()  # not reported; the engine's own paths count MACs
        if positions is None:
            positions = torch.arange(n, device=ids.device).expand(b, n)
        x = embed(w, ids, positions)  # (B, n, C)
        pad_keys = ~mask[:, None, None, :]  # (B, 1, 1, n)
        zero = torch.zeros((), device=ids.device)
        cb_loss, commit, usage, contexts, codes, vectors, outputs = (zero, zero, zero, [], [],
                                                                     [], [])
        for layer_idx, lw in enumerate(w.layers):
            q = F.linear(x, lw.wq, lw.bq).view(b, n, h, d)
            k = F.linear(x, lw.wk, lw.bk).view(b, n, h, d)
            v = F.linear(x, lw.wv, lw.bv).view(b, n, h, d)
            scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)  # (B, H, n, n)
            probs = scores.masked_fill(pad_keys, float("-inf")).softmax(-1)
            ctx = torch.einsum("bhij,bjhd->bihd", probs, v)  # (B, n, H, d)
            quantized, idx, vec, cb_l, commit_l, usage_l = self.quantize(layer_idx, ctx, mask)
            contexts.append(ctx)
            codes.append(idx)
            vectors.append(vec)
            cb_loss = cb_loss + cb_l / cfg.layers
            commit = commit + commit_l / cfg.layers
            usage = usage + usage_l / cfg.layers
            attn_out = F.linear(quantized.reshape(b, n, h * d), lw.wo, lw.bo)  # (B, n, C)
            x = feed_forward_block(lw, x, attn_out, cfg.layer_norm_eps, macs)
            outputs.append(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1)
        return AdaptedOutput(x, outputs, pooled, contexts, codes, vectors, cb_loss, commit, usage)
