"""Exactness under random edit sequences, on tiny random models (fast, many code changes).

Random codebooks make codes flip often, and a large q/k scale makes attention so peaked that
new scores exceed row references and subtractions cancel most of a denominator: the rebase and
cancellation paths of incremental attention must keep the state exact too.
"""

from __future__ import annotations

import pytest
import torch
from exactness import assert_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.session import DocumentSession
from incstream.engine.model.codebooks import Codebooks
from incstream.engine.model.head import ClassificationHead
from incstream.engine.model.minilm import MiniLMConfig, random_minilm
from incstream.engine.model.vq_model import VQModel

WORDS = st.sampled_from(["alpha", "beta", " ", "\n", ".", "gamma", "x", "incremental", "é",
                         "(", ")", "42", "the", "of"])
TEXT = st.lists(WORDS, max_size=40).map(" ".join)


def tiny(qk_scale: float, seed: int) -> VQModel:
    cfg = MiniLMConfig(hidden=32, layers=3, heads=2, ffn=64)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randn(cfg.layers, cfg.heads, 6, cfg.head_dim, generator=gen,
                        dtype=torch.float64) * 0.3
    return VQModel(random_minilm(cfg, seed=seed, qk_scale=qk_scale), Codebooks.from_tensor(codes),
                   ClassificationHead.identity(cfg.hidden))


MODELS = {"mild": tiny(0.05, 1), "peaked": tiny(2.0, 2)}


@pytest.mark.parametrize("kind", sorted(MODELS))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data())
def test_random_edit_sequences_are_exact(tokenizer, kind, text, data):
    model = MODELS[kind]
    s = DocumentSession(model, tokenizer, text, ChunkPolicy(max_tokens=12))
    for _ in range(data.draw(st.integers(1, 8))):
        n = len(s.text)
        start = data.draw(st.integers(0, n))
        deleted = data.draw(st.integers(0, min(n - start, 30)))
        inserted = data.draw(TEXT)
        s.apply_ops([{"retain": start}, {"delete": deleted}, {"insert": inserted}])
        assert_exact(s)  # against a fresh build of the current text, after every edit


def test_peaked_attention_exercises_rebase_paths(tokenizer):
    model = MODELS["peaked"]
    text = " ".join(["alpha beta gamma incremental of the 42"] * 6)
    s = DocumentSession(model, tokenizer, text, ChunkPolicy(max_tokens=128))
    rebased = 0
    for i in range(12):
        # near the end: most rows precede the edit and keep their positions and inputs
        at = len(s.text) - 12 - 7 * i
        report = s.apply_ops([{"retain": at}, {"delete": 3}, {"insert": " x42 beta"}])
        rebased += sum(u.rebased for u in report.chunk_updates)
        assert_exact(s)
    assert rebased > 0  # unchanged rows were rebased / recomputed after heavy cancellation
