"""Shipped codebooks: present, matched to the base weights; margins make skipping exact."""

from __future__ import annotations

import torch

from incstream.engine.model.base_model import base_model_path
from incstream.engine.model.codebooks import Codebooks, kmeans, load_bundle, sha256_file
from incstream.engine.model.macs import MacCounter


def test_bundle_matches_base_model():
    codebooks, manifest = load_bundle()
    assert codebooks.codes.shape == (6, 12, manifest["k"], 32)
    assert manifest["base_weights_sha256"] == sha256_file(base_model_path() / "model.safetensors")
    assert torch.isfinite(codebooks.codes).all()
    # No two codes of a head coincide (an exact tie would make "nearest" ambiguous).
    for layer in range(6):
        for head in range(12):
            d = torch.cdist(codebooks.codes[layer, head], codebooks.codes[layer, head])
            assert (d + torch.eye(d.shape[0]) * 1e9).min() > 1e-6


def test_margin_bounds_the_nearest_code():
    """A point moved by less than margin/2 keeps its nearest code (triangle inequality)."""
    gen = torch.Generator().manual_seed(1)
    cb = Codebooks.from_tensor(torch.randn(1, 2, 16, 8, generator=gen, dtype=torch.float64))
    x = torch.randn(500, 8, generator=gen, dtype=torch.float64)
    heads = torch.randint(0, 2, (500,), generator=gen)
    codes, margin = cb.nearest(0, x, heads, MacCounter())
    direction = torch.randn(500, 8, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    moved = x + direction * (margin / 2 * 0.999).unsqueeze(1)
    codes2, _ = cb.nearest(0, moved, heads, MacCounter())
    assert torch.equal(codes, codes2)
    brute = torch.stack([torch.cdist(x[i : i + 1], cb.codes[0, heads[i]]).argmin()
                         for i in range(500)])
    assert torch.equal(codes, brute)


def test_kmeans_has_no_empty_or_duplicate_codes():
    x = torch.cat([torch.randn(200, 4), torch.randn(5, 4) + 50])
    c = kmeans(x, 32, iters=5)
    assert c.shape == (32, 4)
    assert len(torch.unique(c, dim=0)) == 32
