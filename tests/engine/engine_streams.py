"""Edit-stream helpers for engine tests (a uniquely named module: `conftest` is not importable
reliably when several test directories have one)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "edits"


def stream_docs(name: str, docs: int) -> list[tuple[str, str, list[dict]]]:
    """First `docs` documents of a shared edit stream; skips the test when data is absent."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    from incstream.engine.benchmarks.bench import read_stream

    return list(read_stream(path, docs))


def read_events(name: str, limit: int) -> list[dict]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) >= limit:
                break
    return out
