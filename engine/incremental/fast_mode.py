"""The fast mode's dial: how far an incrementally kept chunk may drift from a fresh build.

Exact mode keeps every chunk equal to a fresh build of its tokens (canonical positions, nearest
codes), which costs little less than re-running the chunk: an insertion renumbers every later
row, and most codes inside the chunk flip by layer 1. The fast mode trades a measured, bounded
divergence for reuse, with five knobs:

- stable position ids: an inserted row takes a free id between its neighbours (or, at the end
  of a chunk, pushes at most `shift_limit` following rows along), else duplicates the id on its
  left; no other row is renumbered, so rows after the edit keep their layer-0 input;
- code hysteresis: a row keeps its code unless the nearest code is closer than it by more than
  tau_l = `tau` x (median distance from a code to its nearest neighbour in layer l's codebooks);
- held contexts: a row whose own input did not change gets an estimate of how far the changed
  keys moved its context (their attention weights against the row's stored softmax normaliser,
  times their values' offset from the row's code vector); its context is recomputed only once
  the moves add up past its slack: the distance it can travel before hysteresis could replace
  its code, and at least `context_tolerance` x the layer's median code gap;
- refresh: a chunk is rebuilt canonically (a fresh build: canonical ids, nearest codes, nothing
  held) after `refresh_edits` incremental updates, or instead of an update that would leave a
  row's id more than `refresh_displacement` away from its canonical index (judged on the ids
  the update leaves: a chunk edited once and then left alone keeps its ids for good). This
  bounds how far history can pull a chunk away from a fresh build; 0 disables a trigger;
- near ties: after an edit, when the document's two most probable classes are closer than
  `refresh_margin` (in probability), every chunk updated incrementally at least
  `near_tie_edits` times since its last build is rebuilt canonically before the answer is
  read. Drift moves probabilities by a few hundredths (its p90 is ~0.03), so it can flip a
  label only where the answer is that close to a tie; there the answer is (nearly) a fresh
  build's. One update's drift is the smallest, so by default a chunk updated once is left
  (on peps-typing: the same agreement with 16 rebuilds instead of 27). 0 disables it.

Everything runs in float32 and the kept state is float16 (engine.incremental.fast_chunk): only
what an update needs. A sixth knob, `matmul`, says how the per-row linear layers (Q/K/V and the
feed-forward) multiply: float32; bfloat16 with float32 accumulation (2-4x faster on CPUs with
AVX512-BF16 or AMX, at a small measured cost in divergence); or int8 (CPU only: int8 weights
and dynamically quantized rows, engine.model.int8_linear; a quarter of the weight bytes, for
CPUs whose caches cannot hold the float32 weights, at about twice the divergence); or float16
(CPU only: float16 copies of the weights for products of a few rows, read by a compiled kernel,
engine.model.half_linear; rows and arithmetic stay float32, so it answers like float32 while
reading half the bytes). Attention, codebook search, LayerNorm and the kept state are
unchanged. `matmul="auto"` (what a worker resolves when neither its settings nor its bundle
choose) takes bfloat16 where the hardware runs it natively (CUDA, or a CPU with AVX512-BF16 or
AMX), else float16 where its kernel compiles, else float32; it never takes int8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from incstream.engine.incremental.held_attention import prepare_codebooks
from incstream.engine.model.codebooks import Codebooks
from incstream.engine.model.half_linear import (
    HalfWeight,
    half_available,
    half_weight,
    prepare_feed_forward_rows,
    rows_alone,
)
from incstream.engine.model.int8_linear import Int8Weight, int8_available, quantize
from incstream.engine.model.minilm import (
    MiniLMWeights,
    cast_weights,
    with_half_matrices,
    with_int8_matrices,
    with_matmul_dtype,
    with_packed_matrices,
)
from incstream.engine.model.packed_linear import PackedWeight, pack

MAX_POSITIONS = 512
MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# "int8": int8 weights and dynamically quantized int8 rows (engine.model.int8_linear);
# "float16": float16 weights, float32 rows and arithmetic (engine.model.half_linear)
MATMUL_KINDS = (*MATMUL_DTYPES, "float16", "int8")
MATMUL_CHOICES = (*MATMUL_KINDS, "auto")
# How an update's few-row work runs: compiled CPU kernels (held attention,
# engine.incremental.held_attention, and with float16 matrices the rest of each block,
# engine.model.half_linear.feed_forward_rows), their PyTorch references, or the kernels where
# they can.
KERNELS = ("auto", "fused", "torch")


@dataclass(frozen=True)
class FastModeConfig:
    tau: float = 1.0
    context_tolerance: float = 0.5
    refresh_edits: int = 64
    refresh_displacement: int = 16
    shift_limit: int = 2
    refresh_margin: float = 0.0  # rebuild drifted chunks when the top two probs are this close
    near_tie_edits: int = 2  # ... those updated at least this often since their last build
    matmul: str = "float32"  # or "bfloat16" / "int8": how the linear layers multiply
    kernel: str = "auto"  # "fused" C kernels, "torch", or "auto" (fused on the CPU)

    def __post_init__(self) -> None:
        if self.tau < 0 or self.context_tolerance < 0:
            raise ValueError("tau and context_tolerance must be >= 0")
        if not 0 <= self.refresh_margin <= 1:
            raise ValueError("refresh_margin is a probability difference, in [0, 1]")
        if self.matmul not in MATMUL_KINDS:
            raise ValueError(f"matmul must be one of {', '.join(MATMUL_KINDS)}, "
                             f"not {self.matmul!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {self.kernel!r}")
        if min(self.refresh_edits, self.refresh_displacement, self.shift_limit) < 0 or \
                self.near_tie_edits < 1:
            raise ValueError("refresh budgets and shift_limit must be >= 0, near_tie_edits >= 1")

    def as_dict(self) -> dict[str, float | int]:
        return {"tau": self.tau, "context_tolerance": self.context_tolerance,
                "refresh_edits": self.refresh_edits,
                "refresh_displacement": self.refresh_displacement,
                "shift_limit": self.shift_limit, "refresh_margin": self.refresh_margin,
                "near_tie_edits": self.near_tie_edits,
                "matmul": self.matmul, "kernel": self.kernel}


def resolve_mode(bundle_engine: dict | None = None, mode: str | None = None,
                 **overrides: float | int | str | None) -> str | FastModeConfig:
    """The engine mode a worker runs: "exact" or a FastModeConfig.

    Precedence: an explicit `mode` / dial setting (CLI flag or environment), then the model
    bundle's manifest section {"engine": {"mode": ..., "fast": {dial}}}, then exact mode. The
    fast dial's `matmul` defaults to "auto" here (resolve_matmul), on the CPU.
    """
    bundle_engine = bundle_engine or {}
    chosen = mode or bundle_engine.get("mode") or "exact"
    if chosen not in ("exact", "fast"):
        raise ValueError(f"unknown engine mode {chosen!r} (exact or fast)")
    if chosen == "exact":
        return "exact"
    auto = {"matmul": "auto", **bundle_engine.get("fast", {})}  # "auto" unless chosen
    return bundle_dial({"fast": auto}, **overrides)


def bundle_dial(bundle_engine: dict | None = None,
                **overrides: float | int | str | None) -> FastModeConfig:
    """The fast dial a model bundle asks for (its manifest's {"engine": {"fast": {...}}}),
    then the default dial, with the given (non-None) settings replaced; matmul "auto" is
    resolved for the CPU (resolve_matmul)."""
    dial = {**(bundle_engine or {}).get("fast", {}),
            **{k: v for k, v in overrides.items() if v is not None}}
    if "matmul" in dial:
        dial["matmul"] = resolve_matmul(str(dial["matmul"]))
    return FastModeConfig(**dial)


def resolve_matmul(choice: str, device: str = "cpu") -> str:
    """A matmul kind: `choice` itself, or for "auto" bfloat16 where it runs natively on
    `device` (CUDA; a CPU with AVX512-BF16 or AMX), else on a CPU float16 weights where their
    kernel compiles (engine.model.half_linear: float32 arithmetic, half the bytes to read),
    else float32."""
    if choice != "auto":
        return choice
    if device.startswith("cuda"):
        return "bfloat16"
    if native_bfloat16_cpu():
        return "bfloat16"
    return "float16" if half_available() else "float32"


def native_bfloat16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16, as
    Linux lists them). Without them oneDNN emulates bfloat16 matmuls, slower than float32."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


@dataclass
class FastWeights:
    """The VQ model in float32, with what the fast mode derives from its codebooks."""

    w: MiniLMWeights  # float32 base weights
    codebooks: Codebooks  # float32
    # The output lookup tables (W_o,h . codebook_h, float32) and the codebooks flattened to
    # (H*K, C) and (H*K, d): head h's code c is row h*K + c (code_offsets[h] = h*K). One
    # embedding lookup over a flat table is several times cheaper on CPU than advanced
    # indexing of an (H, K, .) tensor by (head, code).
    tables_flat: list[torch.Tensor]  # per layer (H*K, C)
    codes_flat: list[torch.Tensor]  # per layer (H*K, d)
    code_offsets: torch.Tensor  # (H,) long: h*K
    code_gap: torch.Tensor  # (layers, H, K) distance from each code to its nearest other code
    gap_median: torch.Tensor  # (layers,) median of code_gap per layer: tau's unit
    # per layer: codebooks, their squared norms and gaps as the compiled held attention reads
    # them (engine.incremental.held_attention.CodebookConstants; on the CPU only)
    codebook_kernels: list
    # per layer Q, K, V stacked: (3C, C), (3C,); the matrix packed for oneDNN where it can be
    wqkv: list[tuple[torch.Tensor | PackedWeight | Int8Weight | HalfWeight, torch.Tensor]]
    # The layers the fast mode computes with: copies of `w.layers` whose feed-forward matrices
    # and biases are in the matmul dtype (LayerNorm stays float32), the matrices packed for
    # oneDNN where they can be, or int8 Int8Weights (each with its bias) for matmul "int8";
    # wqkv likewise. (Q, K, V go through wqkv, the output
    # projection through the lookup tables: only the feed-forward pair is read here.)
    layers: list = field(default_factory=list)
    # per layer, for matmul "float16": the compiled rest of a block's constants
    # (engine.model.half_linear.FeedForwardRows; None where its kernel does not apply)
    feed_forward_kernels: list = field(default_factory=list)
    # Whether every few-row product (Q/K/V and the rest of each block) goes through the float16
    # kernels built with intrinsics, which sum each row alone in a fixed order: then a row's
    # result does not depend on the rows sharing its call (fast_chunk._shared_calls)
    rows_alone: bool = False
    extra: dict = field(default_factory=dict)


def fast_weights(model, matmul: str = "float32") -> FastWeights:
    """float32 weights, codebooks and lookup tables of a VQModel, the linear layers as
    `matmul` asks (float32, bfloat16 or int8; cached on the model, per kind)."""
    cache = model.__dict__.setdefault("_fast_weights", {})
    if matmul not in cache:
        cache[matmul] = _with_matmul(_fast_weights32(model), matmul)
    return cache[matmul]


def _with_matmul(fw: FastWeights, matmul: str) -> FastWeights:
    from dataclasses import replace

    if matmul == "float16":  # (engine.model.half_linear: float16 copies for few rows)
        if fw.w.device.type != "cpu" or not half_available():
            raise ValueError("matmul float16 runs on the CPU with a working C compiler (cc or "
                             "$CC); use float32 or bfloat16 here")
        wqkv = [(half_weight(w), b) for w, b in fw.wqkv]
        layers = with_half_matrices(fw.w, ("w_up", "w_down")).layers
        heads, eps = fw.codebooks.codes.shape[1], fw.w.config.layer_norm_eps
        kernels = [prepare_feed_forward_rows(tables, lw, heads, eps)
                   for tables, lw in zip(fw.tables_flat, layers, strict=True)]
        alone = (rows_alone() and all(k is not None for k in kernels)
                 and all(w.panels is not None for w, _ in wqkv))
        return replace(fw, layers=layers, wqkv=wqkv, feed_forward_kernels=kernels,
                       rows_alone=alone)
    if matmul == "int8":  # (engine.model.int8_linear: each matrix with its bias)
        if fw.w.device.type != "cpu" or not int8_available():
            raise ValueError("matmul int8 runs on the CPU with fbgemm only; use float32 or "
                             "bfloat16 here")
        wqkv = [(quantize(w, b), b) for w, b in fw.wqkv]
        layers = with_int8_matrices(fw.w, ("w_up", "w_down")).layers
        return replace(fw, layers=layers, wqkv=wqkv)
    dtype = MATMUL_DTYPES[matmul]
    # The linear layers' matrices laid out once for oneDNN on the CPU (packed_linear: an
    # update multiplies a few rows, where F.linear's per-call re-layout or float32 sgemm cost
    # as much as the product).
    wqkv = [(pack(w.to(dtype)), b.to(dtype)) for w, b in fw.wqkv]
    layers = with_packed_matrices(with_matmul_dtype(fw.w, dtype), ("w_up", "w_down")).layers
    return replace(fw, layers=layers, wqkv=wqkv)


def _fast_weights32(model) -> FastWeights:
    # The float32 encoder: the bundle's own (base weights, or base + adapter, cast down from the
    # float64 reference, which is exactly the float32 weights cast up), sharing the dense
    # baseline's tensors when they are the same weights.
    same = model.original is not None and not model.bundle.get("adapter")
    w32 = model.original if same else cast_weights(model.w, torch.float32)
    codebooks = model.codebooks.to(model.device, torch.float32)
    codes = codebooks.codes  # (L, H, K, d)
    dist = torch.cdist(codes.flatten(0, 1), codes.flatten(0, 1))  # (L*H, K, K)
    dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    gap = dist.amin(-1).view(codes.shape[:3])
    wqkv = [(torch.cat([lw.wq, lw.wk, lw.wv]), torch.cat([lw.bq, lw.bk, lw.bv]))
            for lw in w32.layers]
    heads, k = codes.shape[1], codes.shape[2]
    kernels = ([prepare_codebooks(cb, sq, g)
                for cb, sq, g in zip(codes, codebooks.sqnorm, gap, strict=True)]
               if codes.device.type == "cpu" else [])
    return FastWeights(w32, codebooks,
                       tables_flat=[t.to(torch.float32).flatten(0, 1).contiguous()
                                    for t in model.tables],
                       codes_flat=[c.flatten(0, 1).contiguous() for c in codes],
                       code_offsets=torch.arange(heads, device=codes.device) * k,
                       code_gap=gap, gap_median=gap.flatten(1).median(-1).values,
                       codebook_kernels=kernels, wqkv=wqkv)
