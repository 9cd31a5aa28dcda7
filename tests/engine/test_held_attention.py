"""The compiled held attention (engine/incremental/held_attention.c) against its PyTorch
reference: the same chunks, edit after edit, and the fallbacks where it cannot run."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from engine_streams import stream_docs

from incstream.engine import c_kernels
from incstream.engine.incremental import held_attention
from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_chunk import FastSplice, use_fused_kernel
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession

DIAL = FastModeConfig(tau=2.0, refresh_edits=64, refresh_displacement=12)


def _require_kernel() -> None:
    if not held_attention.available():
        pytest.skip("no working C compiler here (CI has one: a skip there fails the run)")


@pytest.mark.parametrize("isa", [(), ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")],
                         ids=["native", "plain-c"])
def test_every_layer_of_real_splices_equals_the_reference(model, tokenizer, monkeypatch, isa):
    """Each layer of each splice of a real edit history, run both ways from the same state:
    the same rows recomputed, the same codes and flips, the same inputs for the rest of the
    block, and normalisers and slack equal up to float rounding. Also with the kernel built
    for a CPU without AVX-512 or F16C (its conversions element by element)."""
    _require_kernel()
    if isa:
        lib = c_kernels.load(held_attention.SOURCE, held_attention.DEFINES + isa)
        assert lib is not None
        held_attention.declare(lib)
        monkeypatch.setattr(held_attention, "_load", lambda: lib)
    original = FastSplice.attend
    compared = []

    def both(self: FastSplice, layer: int, qkv_s: torch.Tensor):
        twin = copy.copy(self)
        twin.qkv, twin.lse, twin.slack, twin.codes = (
            t.clone() for t in (self.qkv, self.lse, self.slack, self.codes))
        twin.layers, twin.report = list(self.layers), copy.deepcopy(self.report)
        self.fused, twin.fused = False, True
        x_ref, codes_ref = original(self, layer, qkv_s)
        x_fused, codes_fused = original(twin, layer, qkv_s.clone())
        a, b = self.layers[-1], twin.layers[-1]
        assert torch.equal(self.s_idx, twin.s_idx)
        assert torch.equal(a.codes, b.codes) and torch.equal(codes_ref, codes_fused)
        assert torch.equal(a.qkv, b.qkv)
        torch.testing.assert_close(a.lse, b.lse, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.slack.float(), b.slack.float(), rtol=2e-3, atol=2e-3)
        assert torch.equal(x_ref, x_fused)
        assert self.report == twin.report
        compared.append(self.report.full_rows)
        return x_ref, codes_ref

    monkeypatch.setattr(FastSplice, "attend", both)
    (_, snapshot, events), = stream_docs("peps-typing.jsonl.gz", 1)
    s = DocumentSession(model, tokenizer, snapshot, ChunkPolicy(max_tokens=128),
                        mode=replace(DIAL, kernel="torch"))
    for event in events[:60 if not isa else 25]:  # (the variant: a shorter history)
        s.apply_ops(event["ops"])
    assert len(compared) > 40 and sum(compared) > len(compared)


def test_a_replay_answers_the_same_with_either_kernel(model, tokenizer):
    """A whole edit history: the answers of the fused and the PyTorch fast mode agree (their
    codes may part only at exact near-ties of float rounding, which did not happen here)."""
    _require_kernel()
    (_, snapshot, events), = stream_docs("peps-typing.jsonl.gz", 1)
    sessions = [DocumentSession(model, tokenizer, snapshot, ChunkPolicy(max_tokens=256),
                                mode=replace(DIAL, kernel=k)) for k in ("torch", "fused")]
    worst = 0.0
    for event in events[:120]:
        for s in sessions:
            s.apply_ops(event["ops"])
        worst = max(worst, float((sessions[0].logits() - sessions[1].logits()).abs().max()))
    assert worst < 1e-3, worst
    a, b = (s.chunk_records() for s in sessions)
    assert [r.content for r in a] == [r.content for r in b]
    same = sum(int((x.codes == y.codes).sum()) for x, y in zip(a, b, strict=True))
    total = sum(x.codes.numel() for x in a)
    assert same >= total * 0.999, (same, total)


def test_without_a_compiler_auto_runs_the_reference_and_fused_is_refused(monkeypatch,
                                                                         tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("INCSTREAM_HOME", str(tmp_path))  # no cached build to find
    monkeypatch.setattr(c_kernels, "_loaded", {})
    assert not held_attention.available()
    cpu = torch.device("cpu")
    assert not use_fused_kernel(replace(DIAL, kernel="auto"), cpu, 32)
    assert not use_fused_kernel(replace(DIAL, kernel="torch"), cpu, 32)
    with pytest.raises(RuntimeError, match="C compiler"):
        use_fused_kernel(replace(DIAL, kernel="fused"), cpu, 32)


def test_the_kernel_is_used_on_the_cpu_for_its_head_width_only():
    _require_kernel()
    cpu = torch.device("cpu")
    assert use_fused_kernel(DIAL, cpu, held_attention.HEAD_DIM)
    assert not use_fused_kernel(DIAL, cpu, 64)  # another model's heads: the reference
    assert not use_fused_kernel(DIAL, torch.device("meta"), held_attention.HEAD_DIM)
    with pytest.raises(ValueError, match="kernel"):
        FastModeConfig(kernel="cuda")


def test_an_edited_shared_header_gets_its_own_library(monkeypatch, tmp_path):
    """The kernels include engine/kernel_math.h: its bytes are part of their build key, so an
    edit there is never answered by a library built from the old header."""
    monkeypatch.setenv("INCSTREAM_HOME", str(tmp_path / "home"))
    (tmp_path / "model").mkdir()
    source = tmp_path / "model" / "kernel.c"
    source.write_text(held_attention.SOURCE.read_text())
    header = tmp_path / "kernel_math.h"
    header.write_text((held_attention.SOURCE.parent.parent / "kernel_math.h").read_text())
    first = c_kernels.library_path(source, held_attention.DEFINES)
    assert c_kernels.library_path(source, held_attention.DEFINES) == first
    header.write_text(header.read_text() + "\n/* edited */\n")
    assert c_kernels.library_path(source, held_attention.DEFINES) != first


def test_a_rebuilt_source_gets_its_own_library(monkeypatch, tmp_path):
    monkeypatch.setenv("INCSTREAM_HOME", str(tmp_path))
    first = held_attention.library_path()
    monkeypatch.setattr(c_kernels, "FLAGS", (*c_kernels.FLAGS, "-DEXTRA"))
    assert held_attention.library_path() != first
    assert first.parent == tmp_path / "cache" / "kernels"
