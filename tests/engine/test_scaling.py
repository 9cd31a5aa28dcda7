"""An edit's cost does not grow with the document: same edit, 2k vs 50k tokens.

Uses a tiny random-weight model (same code paths, any shapes) so a 50k-token document builds
in seconds; the real-model figure is produced by `engine.benchmarks.bench.edit_cost_vs_length`.
"""

from __future__ import annotations

import pytest
import torch
from exactness import assert_exact

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.session import DocumentSession
from incstream.engine.model.codebooks import Codebooks
from incstream.engine.model.head import ClassificationHead
from incstream.engine.model.macs import dense_chunk_macs
from incstream.engine.model.minilm import MiniLMConfig, random_minilm
from incstream.engine.model.vq_model import VQModel


def tiny_model() -> VQModel:
    cfg = MiniLMConfig(hidden=32, layers=2, heads=2, ffn=64)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randn(cfg.layers, cfg.heads, 8, cfg.head_dim, generator=gen,
                        dtype=torch.float64) * 0.5
    return VQModel(random_minilm(cfg), Codebooks.from_tensor(codes),
                   ClassificationHead.identity(cfg.hidden))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_edit_macs_independent_of_document_length(tokenizer, mode):
    model = tiny_model()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
             "kappa", "lambda", "mu"]
    sentence = " ".join(w + str(i % 7) for i, w in enumerate(words * 3)) + ".\n"
    costs = {}
    for target in (2_000, 50_000):
        text = sentence
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
            text = text * 2
        s = DocumentSession(model, tokenizer, text, ChunkPolicy(max_tokens=256), mode=mode)
        n_tokens = len(s.tokens.ids)
        report = s.apply_ops([{"retain": 40}, {"insert": " inserted words"}])
        assert len(report.touched) == 1  # one chunk re-run, whatever the length
        if mode == "exact":
            assert_exact(s, report.touched)
        dense = sum(dense_chunk_macs(n + 2, layers=2, hidden=32, ffn=64, head_dim=16)
                    for n in s.chunk_lengths)
        costs[target] = (n_tokens, report.macs["total"], dense)
    (n_small, inc_small, dense_small), (n_big, inc_big, dense_big) = costs.values()
    assert n_big > 20 * n_small
    # Chunk sizes differ by a token or so between the two documents (equal-size split), so
    # the costs are close, not identical; what matters is that 25x the document is not 25x the
    # cost, while the dense re-run is.
    assert 0.5 < inc_big / inc_small < 2.0
    assert dense_big > 20 * dense_small
    assert dense_big > 100 * inc_big
