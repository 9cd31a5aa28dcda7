"""int8 weights with dynamically quantized rows (engine.model.int8_linear): close to float32,
and a dial value of the fast mode and a chunk-cache peer that run on it."""

from __future__ import annotations

import pytest
import torch

from incstream.engine.benchmarks.peers import ChunkCache, chunk_cache_variants
from incstream.engine.incremental import fast_mode
from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig, fast_weights, resolve_mode
from incstream.engine.incremental.session import DocumentSession
from incstream.engine.model.int8_linear import Int8Weight, int8_available, quantize
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import (
    MiniLMConfig,
    forward_dense,
    random_minilm,
    with_int8_matrices,
)
from incstream.engine.model.packed_linear import project
from incstream.state.activation_record import mode_tag

needs_int8 = pytest.mark.skipif(not int8_available(), reason="torch without fbgemm")

TEXT = ("The film opens slowly, and its first hour is a patient study of a family that has "
        "stopped talking. What follows is a small miracle of acting and restraint.\n")


@needs_int8
@pytest.mark.parametrize("rows", [1, 4, 256])
def test_products_are_within_a_few_percent_of_float32(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(1152, 384, generator=gen) * 0.05
    b = torch.randn(1152, generator=gen)
    x = torch.randn(rows, 384, generator=gen)
    q = quantize(w, b)
    assert isinstance(q, Int8Weight) and q.shape == w.shape and q.numel() == w.numel()
    want = torch.nn.functional.linear(x, w, b)
    got = project(x, q, b)
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = float((got - want).norm() / want.norm())
    assert 1e-4 < err < 0.03, err  # quantized (not the float32 product), but close to it
    # the bias was packed with the weight: a product of zero rows of input gives the bias
    assert torch.allclose(project(torch.zeros(1, 384), q, None)[0], b, atol=1e-3)
    assert project(torch.zeros(0, 384), q, b).shape == (0, 1152)


@needs_int8
def test_an_int8_model_answers_close_to_the_float32_one():
    config = MiniLMConfig(vocab_size=50, hidden=64, heads=4, ffn=128, layers=2,
                          max_positions=64)
    plain = random_minilm(config, dtype=torch.float32)
    int8 = with_int8_matrices(plain)
    assert isinstance(int8.layers[0].w_up, Int8Weight)
    assert not isinstance(plain.layers[0].w_up, Int8Weight)  # the original untouched
    ids, pos = torch.randint(0, 50, (20,)), torch.arange(20)
    a, b = MacCounter(), MacCounter()
    want, got = forward_dense(plain, ids, pos, a), forward_dense(int8, ids, pos, b)
    assert float((got - want).abs().max()) < 0.1 * float(want.abs().max())
    assert a.total == b.total  # the same products counted


@needs_int8
def test_int8_fast_mode_stays_close_to_float32_and_its_peer_to_the_dense_model(model,
                                                                             tokenizer):
    policy = ChunkPolicy(max_tokens=64)
    f32 = DocumentSession(model, tokenizer, TEXT * 3, policy, mode=FastModeConfig())
    int8 = DocumentSession(model, tokenizer, TEXT * 3, policy, mode=FastModeConfig(matmul="int8"))
    assert isinstance(fast_weights(model, "int8").wqkv[0][0], Int8Weight)
    assert int8.chunks[0].layers[0].q.dtype == torch.float16  # the kept state is unchanged

    def probs(s: DocumentSession) -> torch.Tensor:
        return torch.softmax(s.logits(), -1)

    assert 0 < float((probs(f32) - probs(int8)).abs().max()) < 0.05
    for s in (f32, int8):
        s.apply_ops([{"retain": 40}, {"insert": " quite"}])
    assert float((probs(f32) - probs(int8)).abs().max()) < 0.05
    # the int8 chunk cache peer: the dense model's pooled vectors, moved (per-tensor row
    # quantization meets the LayerNorm outputs' outlier features: ~10 % in norm, cosine 0.99)
    ids, lengths = f32.tokens.ids, f32.chunk_lengths
    args = (model, f32.cls_id, f32.sep_id)
    _, dense = ChunkCache(*args).update(ids, lengths, MacCounter())
    _, quantized = ChunkCache(*args, matmul="int8").update(ids, lengths, MacCounter())
    assert 0 < float((dense - quantized).norm()) < 0.2 * float(dense.norm())
    assert float(torch.nn.functional.cosine_similarity(dense, quantized, 0)) > 0.98


def test_the_int8_peer_and_dial_run_only_on_a_cpu_with_fbgemm(model, monkeypatch):
    assert all(v.matmul != "int8" for v in chunk_cache_variants(torch.device("cuda")))
    assert "chunk_cache" in {v.key for v in chunk_cache_variants("cpu")}
    with pytest.raises(ValueError, match="CPU"):
        quantize(torch.zeros(4, 4, device="meta"), None)
    # without fbgemm the dial value is refused with a clear error, never half-run
    monkeypatch.setattr(fast_mode, "int8_available", lambda: False)
    monkeypatch.setattr(model, "_fast_weights", {}, raising=False)
    with pytest.raises(ValueError, match="int8 runs on the CPU with fbgemm"):
        fast_weights(model, "int8")


def test_int8_is_chosen_only_when_asked_and_its_records_are_its_own():
    assert resolve_mode(None, mode="fast", matmul="int8").matmul == "int8"
    assert resolve_mode(None, mode="fast").matmul != "int8"  # auto never picks it
    assert resolve_mode(None, mode="fast", matmul="auto").matmul != "int8"
    # a worker's durable chunk records are tagged by matmul: an int8 worker rebuilds a
    # float32 worker's records instead of reading them as its own
    assert mode_tag("fast", "int8") != mode_tag("fast", "float32")
