"""Weights laid out once for oneDNN multiply as F.linear does (engine.model.packed_linear)."""

from __future__ import annotations

import pytest
import torch

from incstream.engine.model.macs import MacCounter
from incstream.engine.model.minilm import (
    MiniLMConfig,
    forward_dense,
    random_minilm,
    with_matmul_dtype,
    with_packed_matrices,
)
from incstream.engine.model.packed_linear import PackedWeight, pack, packing_available, project

needs_onednn = pytest.mark.skipif(not packing_available(), reason="torch without oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(not packing_available(torch.bfloat16),
                                       reason="no oneDNN bfloat16 on this CPU")


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 4, 17, 256])
def test_bfloat16_products_are_bit_for_bit_those_of_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(1152, 384, generator=gen).to(torch.bfloat16)
    b = torch.randn(1152, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 384, generator=gen)
    packed = pack(w)
    assert isinstance(packed, PackedWeight) and packed.shape == w.shape
    assert packed.numel() == w.numel()
    assert torch.equal(project(x, packed, b), torch.nn.functional.linear(x.to(w.dtype), w, b))


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 256])
def test_float32_products_match_f_linear_up_to_summation_order(rows):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(384, 1536, generator=gen), torch.randn(384, generator=gen)
    x = torch.randn(rows, 1536, generator=gen)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = project(x, pack(w), b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-3)


@needs_onednn
def test_no_rows_give_an_empty_product():
    w = torch.randn(8, 4)
    assert project(torch.zeros(0, 4), pack(w), torch.zeros(8)).shape == (0, 8)


def test_what_onednn_cannot_take_is_left_as_it_is():
    for w in (torch.randn(8, 4, dtype=torch.float64), torch.randn(8)):
        assert pack(w) is w
    w = torch.randn(8, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(project(x, pack(w), None), x @ w.T)


@needs_onednn
@needs_onednn_bf16
def test_a_packed_model_answers_as_the_plain_one():
    config = MiniLMConfig(vocab_size=50, hidden=64, heads=4, ffn=128, layers=2,
                          max_positions=64)
    plain = random_minilm(config, dtype=torch.float32)
    ids, pos = torch.randint(0, 50, (20,)), torch.arange(20)
    for dtype in (torch.float32, torch.bfloat16):
        weights = with_matmul_dtype(plain, dtype)
        packed = with_packed_matrices(weights)
        assert isinstance(packed.layers[0].w_up, PackedWeight)
        assert not isinstance(weights.layers[0].w_up, PackedWeight)  # the original untouched
        a, b = MacCounter(), MacCounter()
        want, got = forward_dense(weights, ids, pos, a), forward_dense(packed, ids, pos, b)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if dtype == torch.float32
                                   else 0.0)
        assert a.total == b.total  # the same products counted
