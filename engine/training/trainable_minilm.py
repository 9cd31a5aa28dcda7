"""The whole MiniLM encoder as trainable tensors: a batched, differentiable forward_dense.

Every tensor of engine.model.minilm.MiniLMWeights becomes an nn.Parameter (same names, same
layout), so `weights()` is a MiniLMWeights view that the engine's own forward_dense runs
unchanged, and `encode` is the same math (embed -> per block: QKV, softmax attention, W_o,
post-LN FFN) on right-padded batches (B, n) with padding keys masked out. Pads sit after every
valid row and are never attended to, so each valid row equals forward_dense of its chunk alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from incstream.engine.model.dense_finetuned import flat_tensors, weights_from_flat
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import MiniLMWeights, embed, feed_forward_block


def is_decayed(name: str) -> bool:
    """AdamW weight decay on weight matrices only, not on the lookup tables ("word",
    "position": with no decay, rows never read stay bit-identical to the base, so the stored
    delta holds only the rows that moved), LayerNorm or biases."""
    return name.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w_up", "w_down")


class TrainableMiniLM(nn.Module):
    """A float32 copy of the encoder (all weights trainable) + a linear head (labels, C)."""

    def __init__(self, base: MiniLMWeights, n_labels: int):
        super().__init__()
        self.cfg = base.config
        # ParameterDict keys may not contain "."
        self.enc = nn.ParameterDict({
            name.replace(".", "__"): nn.Parameter(t.detach().to(torch.float32).clone())
            for name, t in flat_tensors(base).items()})
        self.head = nn.Linear(self.cfg.hidden, n_labels)
        with torch.no_grad():  # zero-initialised: the first steps train the head, seeded or not
            self.head.weight.zero_()
            self.head.bias.zero_()

    def named_encoder(self) -> dict[str, nn.Parameter]:
        return {key.replace("__", "."): p for key, p in self.enc.items()}

    def weights(self) -> MiniLMWeights:
        """The encoder as MiniLMWeights over the live parameters (forward_dense runs on it)."""
        return weights_from_flat(self.cfg, self.named_encoder())

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, n), canonical positions 0..n-1, pads at the right -> pooled (B, C):
        the mean of each chunk's valid last hidden rows (what the engine pools per chunk)."""
        x = encode_hidden(self.weights(), ids, mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1)


def encode_hidden(w: MiniLMWeights, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state (B, n, C) of a right-padded batch, canonical positions 0..n-1, padding
    keys masked out (each valid row equals forward_dense of its chunk alone)."""
    return encode_layers(w, ids, mask)[-1]


def encode_layers(w: MiniLMWeights, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """encode_hidden, keeping every block's output: a list of (B, n, C), one per layer."""
    cfg = w.config
    b, n = ids.shape
    h, d = cfg.heads, cfg.head_dim
    macs = MacCounter()  # not reported; the engine's own paths count MACs
    x = embed(w, ids, torch.arange(n, device=ids.device).expand(b, n))  # (B, n, C)
    pad_keys = ~mask[:, None, None, :]  # (B, 1, 1, n)
    outputs = []
    for lw in w.layers:
        q = F.linear(x, lw.wq, lw.bq).view(b, n, h, d)
        k = F.linear(x, lw.wk, lw.bk).view(b, n, h, d)
        v = F.linear(x, lw.wv, lw.bv).view(b, n, h, d)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
        probs = scores.masked_fill(pad_keys, float("-inf")).softmax(-1)
        ctx = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, n, h * d)
        x = feed_forward_block(lw, x, F.linear(ctx, lw.wo, lw.bo), cfg.layer_norm_eps, macs)
        outputs.append(x)
    return outputs
