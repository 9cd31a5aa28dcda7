"""What a worker's doc-class/v1 answer must equal: a fresh classification of the same text."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class FreshAnswer:
    label: str
    scores: dict[str, float]
    model: str


def assert_same_answer(record: dict, fresh: FreshAnswer, what: str = "") -> None:
    """The worker's label equals a fresh classification; scores agree to 1e-9 (the record
    rounds them to 9 decimals, hence the extra half unit)."""
    assert record["model"] == fresh.model, what
    assert record["label"] == fresh.label, f"{what}: {record['scores']} vs {fresh.scores}"
    assert set(record["scores"]) == set(fresh.scores), what
    for label, p in fresh.scores.items():
        assert math.isclose(record["scores"][label], p, rel_tol=0, abs_tol=1.5e-9), (
            f"{what}: score {label} {record['scores'][label]} vs fresh {p}")
