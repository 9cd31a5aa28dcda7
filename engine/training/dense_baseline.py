"""The dense linear probe: the frozen float32 encoder + a linear head on pooled embeddings.

Document vectors are computed once with the ORIGINAL model (engine.model.minilm.forward_dense, chunk
by chunk, exactly what the engine's dense baseline runs) and cached as safetensors under
<data home>/cache/dense/ (incstream.paths), keyed by the texts, the chunking and the base
weights. The head is an L2-regularised logistic regression fitted full-batch with L-BFGS; the
L2 strength is picked on the validation split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from incstream.engine.model.head import document_pooled
from incstream.engine.model.minilm import MiniLMWeights, forward_dense
from incstream.engine.training.train_data import DocChunks
from incstream.paths import dense_cache_dir

L2_GRID = (1e-4, 1e-3, 1e-2)
# `incstream train --refit-head`: a finer grid, used for BOTH heads (dense and VQ) so that the
# two baselines get the same selection budget on the validation split
REFIT_L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def doc_vectors(weights: MiniLMWeights, docs: Sequence[DocChunks],
                progress: bool = False) -> torch.Tensor:
    """(N, C) float32 document vectors of the original (non-VQ) model."""
    out = []
    with torch.no_grad():
        for doc in tqdm(docs, desc="dense embeddings", disable=not progress, leave=False):
            pooled = [forward_dense(weights, c.to(weights.device),
                                    torch.arange(len(c), device=weights.device)).mean(0)
                      for c in doc.chunks]
            out.append(document_pooled(pooled, doc.counts).float().cpu())
    return torch.stack(out)


def cached_doc_vectors(weights: MiniLMWeights, docs: Sequence[DocChunks], tag: str,
                       cache_dir: Path | None = None, progress: bool = False) -> torch.Tensor:
    """doc_vectors, cached on disk by (tag, token ids of every chunk); the cache defaults to
    incstream.paths.dense_cache_dir()."""
    return cached_vectors(Path(cache_dir or dense_cache_dir()), tag, docs,
                          lambda: doc_vectors(weights, docs, progress), describe=True)


def cached_vectors(cache_dir: Path, tag: str, docs: Sequence[DocChunks],
                   compute: Callable[[], torch.Tensor], salt: bytes = b"",
                   describe: bool = False) -> torch.Tensor:
    """`compute()`'s (N, C) vectors, cached in cache_dir by (tag, salt, every chunk's ids);
    `describe` also writes a JSON sidecar saying what the file holds."""
    digest = hashlib.sha256(tag.encode())
    digest.update(salt)
    for doc in docs:
        for c in doc.chunks:
            digest.update(c.numpy().tobytes())
        digest.update(b"|")
    path = cache_dir / f"{digest.hexdigest()[:24]}.safetensors"
    if path.exists():
        return load_file(str(path))["vectors"]
    vecs = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": vecs.contiguous()}, str(path))
    if describe:
        path.with_suffix(".json").write_text(json.dumps({"tag": tag, "n": len(docs)}) + "\n")
    return vecs


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_labels: int, l2: float,
                 iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS logistic regression: weight (labels, C), bias (labels,)."""
    x = x.to(torch.float64)
    weight = torch.zeros(n_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def fit_dense_head(x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   n_labels: int, grid: Sequence[float] = L2_GRID
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Best-on-validation logistic head over `grid`; also returns what was chosen.

    Selection uses the validation split only: highest accuracy, ties broken by the lower
    validation cross-entropy (then the smaller L2). Works for any document vectors (the dense
    encoder's, or the VQ model's for `incstream train --refit-head`).
    """
    best = None
    tried = []
    for l2 in grid:
        w, b = fit_logistic(x, y, n_labels, l2)
        logits = val_x.float() @ w.T + b
        acc = float((logits.argmax(-1) == val_y).float().mean())
        ce = float(F.cross_entropy(logits, val_y))
        tried.append({"l2": l2, "val_acc": round(acc, 6), "val_ce": round(ce, 6)})
        if best is None or (acc, -ce) > (best[0], -best[1]):
            best = (acc, ce, l2, w, b)
    acc, ce, l2, w, b = best
    return w, b, {"l2": l2, "val_acc": acc, "val_ce": ce, "grid": tried}
