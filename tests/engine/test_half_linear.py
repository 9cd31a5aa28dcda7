"""float16-weight products (engine/model/half_linear.c): what they compute, when they run, and
the fast mode that uses them against float32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from engine_streams import stream_docs

from incstream.engine import c_kernels
from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession
from incstream.engine.model import half_linear
from incstream.engine.model.half_linear import KERNEL_ROWS, half_weight, project_half


def _require_kernel() -> None:
    if not half_linear.half_available():
        pytest.skip("no working C compiler here (CI has one: a skip there fails the run)")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 11, 12, 13, 25, KERNEL_ROWS])
@pytest.mark.parametrize("shape", [(1152, 384), (384, 1536), (64, 40)])
def test_few_rows_multiply_the_float16_weights_in_float32(rows, shape):
    """The kernel's product is the float32 product with the float16-rounded weights (up to
    summation order), for row counts around its register blocks (12 rows with AVX-512, 3 with
    AVX2) and inputs of any width."""
    _require_kernel()
    torch.manual_seed(rows)
    w, b = torch.randn(*shape) * 0.05, torch.randn(shape[0])
    x = torch.randn(rows, shape[1])
    got = project_half(x, half_weight(w), b)
    want = torch.nn.functional.linear(x, w.half().float(), b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    without_bias = project_half(x, half_weight(w), None)
    torch.testing.assert_close(without_bias, want - b, rtol=1e-5, atol=1e-5)


def test_many_rows_other_widths_and_no_compiler_use_the_float32_matrix(monkeypatch, tmp_path):
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    hw = half_weight(w)
    x = torch.randn(KERNEL_ROWS + 1, 64)
    exact = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(project_half(x, hw, b), exact, rtol=1e-4, atol=1e-4)
    assert project_half(x[:0], hw, b).shape == (0, 96)
    odd = half_weight(w[:33])  # 33 outputs: no panels, float32 for every product
    assert odd.panels is None
    torch.testing.assert_close(project_half(x[:2], odd, b[:33]), exact[:2, :33], rtol=1e-4,
                               atol=1e-4)
    monkeypatch.setattr(c_kernels, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("INCSTREAM_HOME", str(tmp_path))
    assert not half_linear.half_available()
    # float32 weights, not float16 ones: closer to the exact product than rounding allows
    torch.testing.assert_close(project_half(x[:2], hw, b), exact[:2], rtol=1e-4, atol=1e-4)


def test_float16_weights_answer_like_float32_along_an_edit_history(model, tokenizer):
    """The fast mode with float16 weights against float32 weights, edit after edit: answers
    a few 1e-4 apart (bfloat16 or int8 matmuls move them 10-100x more)."""
    _require_kernel()
    (_, snapshot, events), = stream_docs("peps-typing.jsonl.gz", 1)
    dial = FastModeConfig(tau=2.0, refresh_edits=64, refresh_displacement=12)
    f32, f16 = (DocumentSession(model, tokenizer, snapshot, ChunkPolicy(max_tokens=256),
                                mode=replace(dial, matmul=m)) for m in ("float32", "float16"))
    worst = 0.0
    for event in events[:60]:
        f32.apply_ops(event["ops"])
        f16.apply_ops(event["ops"])
        p32, p16 = torch.softmax(f32.logits(), -1), torch.softmax(f16.logits(), -1)
        worst = max(worst, float((p32 - p16).abs().max()))
    assert 0.0 < worst < 3e-3, worst


def test_float16_weights_are_for_the_cpu():
    with pytest.raises(ValueError, match="CPU"):
        half_weight(torch.empty(4, 4, device="meta"))


@pytest.mark.parametrize("isa", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma",
                                                    "-mno-f16c")])
def test_the_avx2_and_plain_c_versions_compute_the_same(isa):
    """The kernel as built for CPUs without AVX-512 (F16C + FMA, 3 rows a group) and without
    either (plain C): the same products as the float32 product with the rounded weights."""
    if c_kernels.compiler() is None:
        pytest.skip("no C compiler here (CI has one: a skip there fails the run)")
    lib = c_kernels.load(half_linear.SOURCE, isa)
    assert lib is not None
    half_linear.declare(lib)
    torch.manual_seed(1)
    w, b = torch.randn(64, 40) * 0.05, torch.randn(64)
    hw = half_weight(w)
    for rows in (1, 2, 3, 4, 5, 7):
        x = torch.randn(rows, 40)
        y = torch.empty(rows, 64)
        lib.half_linear(rows, 64, 40, x.data_ptr(), hw.panels.data_ptr(), b.data_ptr(),
                        y.data_ptr())
        want = torch.nn.functional.linear(x, w.half().float(), b)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # the AVX2 build sums each row alone with intrinsics (batching may share its calls); the
    # plain-C loop is the vectorizer's, so it says it makes no such promise
    assert lib.half_linear_rows_alone() == (1 if "-mno-fma" not in isa else 0)


@pytest.mark.parametrize("isa", [(), ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")],
                         ids=["native", "plain-c"])
def test_the_rest_of_a_block_in_one_call_equals_pytorch(model, monkeypatch, isa):
    """feed_forward_rows (the fast mode's step 4 for a few rows: code table lookup, LayerNorm,
    float16 feed-forward with GELU, LayerNorm) against the same with PyTorch operations and
    the float16 products, every layer of the real model, row counts around the register
    blocks; None where it does not apply (many rows, float32 matrices)."""
    from incstream.engine.incremental.fast_chunk import _lookup
    from incstream.engine.incremental.fast_mode import fast_weights
    from incstream.engine.model.macs import MacCounter
    from incstream.engine.model.minilm import feed_forward_block

    _require_kernel()
    if isa:
        lib = c_kernels.load(half_linear.SOURCE, isa)
        assert lib is not None
        half_linear.declare(lib)
        monkeypatch.setattr(half_linear, "_load", lambda: lib)
    fw = fast_weights(model, "float16")
    eps = fw.w.config.layer_norm_eps
    heads, k = fw.codebooks.codes[0].shape[:2]
    gen = torch.Generator().manual_seed(3)
    for layer, lw in enumerate(fw.layers):
        for rows in (1, 3, 13, KERNEL_ROWS):
            x = torch.randn(rows, fw.w.config.hidden, generator=gen)
            codes = torch.randint(0, k, (rows, heads), generator=gen)
            got = half_linear.feed_forward_rows(x, codes, fw.tables_flat[layer], lw, eps)
            want = feed_forward_block(lw, x, _lookup(fw, layer, codes, MacCounter()), eps,
                                      MacCounter())
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    x = torch.randn(KERNEL_ROWS + 1, fw.w.config.hidden)
    codes = torch.zeros(KERNEL_ROWS + 1, heads, dtype=torch.long)
    assert half_linear.feed_forward_rows(x, codes, fw.tables_flat[0], fw.layers[0], eps) is None
    f32 = fast_weights(model, "float32")
    assert half_linear.feed_forward_rows(x[:2], codes[:2], f32.tables_flat[0], f32.layers[0],
                                         eps) is None


def test_the_rest_of_a_block_counts_the_same_macs_in_c_and_in_pytorch(model):
    """fast_chunk._rest_of_block counts the compiled call's MACs by hand (the kernel cannot
    reach the counter): they must be what the PyTorch path counts, so that the fast mode's
    MACs do not depend on which kernel ran."""
    from incstream.engine.incremental.fast_chunk import _rest_of_block
    from incstream.engine.incremental.fast_mode import fast_weights
    from incstream.engine.model.macs import MacCounter

    _require_kernel()
    fw = fast_weights(model, "float16")
    heads, k = fw.codebooks.codes[0].shape[:2]
    x = torch.randn(3, fw.w.config.hidden)
    codes = torch.randint(0, k, (3, heads))
    counted = []
    for fused in (True, False):
        macs = MacCounter()
        _rest_of_block(fw, 2, x, codes, fused, macs)
        counted.append(macs.as_dict())
    assert counted[0] == counted[1] and counted[0]["total"] > 0, counted
