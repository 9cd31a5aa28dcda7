"""Classification head: mean-pooled embedding -> linear layer -> logits.

A chunk's pooled vector is the mean of its last hidden states; a document's is the
token-count-weighted mean of its chunks' pooled vectors (= the mean over all chunk rows), so
the document answer does not depend on where chunk boundaries fall more than the model itself
does. The head is untrained here (identity by default: logits = pooled embedding, which also
makes exactness checks cover every dimension); the next issue trains a real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ClassificationHead:
    weight: torch.Tensor  # (labels, C)
    bias: torch.Tensor  # (labels,)
    labels: tuple[str, ...] = ()

    @classmethod
    def identity(cls, hidden: int, device: torch.device | str = "cpu") -> ClassificationHead:
        return cls(torch.eye(hidden, dtype=torch.float64, device=device),
                   torch.zeros(hidden, dtype=torch.float64, device=device))

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=pooled.device, dtype=pooled.dtype)
        return pooled @ w.T + self.bias.to(device=pooled.device, dtype=pooled.dtype)


def document_pooled(chunk_pooled: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """Token-count-weighted mean of chunk pooled vectors."""
    weights = torch.tensor(counts, dtype=chunk_pooled[0].dtype, device=chunk_pooled[0].device)
    stacked = torch.stack(list(chunk_pooled))
    return (stacked * weights.unsqueeze(1)).sum(0) / weights.sum()
