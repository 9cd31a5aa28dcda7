"""One MAC counter shared by the dense and the incremental paths.

Ratios between the two paths are only meaningful if both are counted by the same code with the
same conventions, so every matmul in engine/ reports here through `MacCounter.add`.

Conventions (what counts as a multiply-accumulate):
- linear layers: rows x in_features x out_features (biases are not counted);
- attention scores q.k and value products p.v: one MAC per multiplied pair;
- codebook searches: rows x K x d (the distance expansion -2 c.x; norms are precomputed);
- the VQ output projection is a table lookup (W_o,h . codebook_h precomputed), so it costs
  0 MACs; the per-head rows it sums are reported separately as `adds`, never as MACs;
- LayerNorm, GELU, softmax exponentials and the softmax-state bookkeeping of incremental
  attention (subtracting / adding terms) are elementwise and not counted as MACs, except that
  the products e^(s-m) * v_j in the incremental numerator update are value products and are
  counted in `attn_values`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

CATEGORIES = ("linear", "attn_scores", "attn_values", "codebook_search")


@dataclass
class MacCounter:
    """Accumulates MACs per category; `adds` tracks the lookup-table additions (not MACs)."""

    macs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    adds: int = 0

    def add(self, category: str, n: int) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"unknown MAC category {category!r}")
        self.macs[category] += int(n)

    def add_adds(self, n: int) -> None:
        self.adds += int(n)

    @property
    def total(self) -> int:
        return sum(self.macs.values())

    def merge(self, other: MacCounter) -> None:
        """Add another counter's counts to this one."""
        for category, n in other.macs.items():
            self.add(category, n)
        self.adds += other.adds

    def reset(self) -> None:
        self.macs = defaultdict(int)
        self.adds = 0

    def as_dict(self) -> dict[str, int]:
        return {**{c: int(self.macs.get(c, 0)) for c in CATEGORIES}, "total": self.total,
                "adds": self.adds}


def dense_chunk_macs(n: int, *, layers: int = 6, hidden: int = 384, ffn: int = 1536,
                     codes: int | None = None, head_dim: int = 32) -> int:
    """MACs of one dense forward over an n-token chunk, without running it.

    Mirrors exactly what `engine.model.minilm` / `engine.model.vq_model` report to a MacCounter
    (a test
    checks this), so a benchmark can price "re-run the dense model on the whole document"
    without spending the seconds. `codes=None` is the original model (the output projection is
    a matmul); with `codes=K` it is the VQ model (a K-code search per head, lookup instead of
    W_o).
    """
    heads = hidden // head_dim
    per_layer = 3 * n * hidden * hidden  # Q, K, V projections
    per_layer += 2 * n * n * hidden  # scores and value products over all heads
    per_layer += 2 * n * hidden * ffn  # FFN up and down
    if codes is None:
        per_layer += n * hidden * hidden  # output projection
    else:
        per_layer += n * heads * codes * head_dim  # nearest-code search
    return layers * per_layer
