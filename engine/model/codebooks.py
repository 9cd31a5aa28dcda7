"""Per-layer, per-head codebooks for the attention context, and the nearest-code search.

Each head's 32-dim context softmax(QK^T/sqrt(d))V is replaced by its nearest code. Besides the
code we return the margin d2 - d1 (distance to the second-nearest code minus the nearest):
by the triangle inequality, a context that has moved less than margin/2 since it was quantized
still has the same nearest code, which is what lets incremental inference skip most searches
and stay exact.

Bundles live in engine/bundles/<name>/: ``codebooks.safetensors`` (one float32 tensor
``codebooks`` of shape (layers, heads, K, d)) and ``manifest.json`` (base model, K, sha256 of
the base weights, how they were made). Nothing calibrates at run time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from incstream.engine.model.macs import MacCounter
from incstream.paths import bundles_dir

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
DEFAULT_BUNDLE = "calibrated-minilm"

# Distances are computed by the expansion |x|^2 - 2x.c + |c|^2 in float64; its rounding error
# after the square root can reach ~1e-7 near zero, so the "cannot have moved across a Voronoi
# boundary" test keeps this much slack (a larger slack only costs extra searches, never
# exactness).
MARGIN_SLACK = 1e-6


@dataclass
class Codebooks:
    """codes: (layers, heads, K, d); `sqnorm` caches |c|^2 for the distance expansion."""

    codes: torch.Tensor
    sqnorm: torch.Tensor

    @classmethod
    def from_tensor(cls, codes: torch.Tensor) -> Codebooks:
        return cls(codes=codes, sqnorm=(codes * codes).sum(-1))

    @property
    def k(self) -> int:
        return self.codes.shape[2]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Codebooks:
        return Codebooks.from_tensor(self.codes.to(device=device, dtype=dtype))

    def nearest(self, layer: int, ctx: torch.Tensor, heads: torch.Tensor,
                macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code and margin for P (context, head) pairs.

        ctx: (P, d); heads: (P,) head index of each pair. Returns codes (P,) and margins (P,).
        One function for the dense and the incremental path, so both round identically.
        """
        p, d = ctx.shape
        if p == 0:
            return (torch.empty(0, dtype=torch.long, device=ctx.device),
                    torch.empty(0, dtype=ctx.dtype, device=ctx.device))
        cb = self.codes[layer]  # (H, K, d)
        k = cb.shape[1]
        if p >= 4 * cb.shape[0]:
            # Group pairs by head: H small matmuls beat gathering P copies of a codebook.
            order = torch.argsort(heads, stable=True)
            counts = torch.bincount(heads, minlength=cb.shape[0]).tolist()
            parts = ctx[order].split(counts)
            dots = torch.empty(p, k, dtype=ctx.dtype, device=ctx.device)
            dots[order] = torch.cat([part @ cb[h].T for h, part in enumerate(parts)])
        else:
            dots = torch.einsum("pd,pkd->pk", ctx, cb[heads])
        macs.add("codebook_search", p * k * d)
        dist2 = self.sqnorm[layer][heads] - 2.0 * dots + (ctx * ctx).sum(-1, keepdim=True)
        top = torch.topk(dist2, 2, dim=-1, largest=False)
        d12 = top.values.clamp_min(0.0).sqrt()
        return top.indices[:, 0], d12[:, 1] - d12[:, 0]

    def nearest_all(self, layer: int, ctx: torch.Tensor,
                    macs: MacCounter) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and margins (n, H) for a full (n, H, d) context tensor."""
        n, h, d = ctx.shape
        heads = torch.arange(h, device=ctx.device).repeat(n)
        codes, margin = self.nearest(layer, ctx.reshape(n * h, d), heads, macs)
        return codes.view(n, h), margin.view(n, h)


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) so repeated model loads stay cheap."""
    stat = Path(path).stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def bundle_dir(name: str = DEFAULT_BUNDLE) -> Path:
    """A bundle by name, shipped (engine/bundles/) or trained (<data home>/bundles/, where
    `incstream train` writes), the shipped one first; else ``name`` as a directory."""
    for root in (BUNDLES_DIR, bundles_dir()):
        if (root / name).is_dir():
            return root / name
    path = Path(name)
    return path if path.is_dir() else BUNDLES_DIR / name


def load_bundle(name: str = DEFAULT_BUNDLE) -> tuple[Codebooks, dict]:
    """Codebooks (float32, CPU) and manifest of a shipped bundle."""
    path = bundle_dir(name)
    manifest = json.loads((path / "manifest.json").read_text())
    codes = load_file(str(path / "codebooks.safetensors"))["codebooks"]
    return Codebooks.from_tensor(codes), manifest


def save_bundle(path: Path, codes: torch.Tensor, manifest: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({"codebooks": codes.to(torch.float32).contiguous().cpu()},
              str(path / "codebooks.safetensors"))
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def kmeans(x: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Plain Lloyd k-means with k-means++ seeding; (k, d). Empty clusters are re-seeded at the
    points farthest from their centroid, so no two codes coincide (exact ties would make the
    nearest code ambiguous)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.to(torch.float64)
    n = x.shape[0]
    centers = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    d2 = ((x - centers[0]) ** 2).sum(-1)
    for _ in range(1, k):
        idx = torch.multinomial(d2 / d2.sum(), 1, generator=gen)
        centers.append(x[idx].squeeze(0))
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(-1))
    c = torch.stack(centers)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        assign = dist.argmin(-1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        new_c = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(len(empty)).indices
            new_c[empty] = x[far]
        c = new_c
    return c
