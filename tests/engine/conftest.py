"""Shared fixtures for engine tests: the real model is loaded once per test session."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "edits"


@pytest.fixture(scope="session", autouse=True)
def _no_grad():
    torch.set_grad_enabled(False)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    from engine.base_model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def model():
    from engine.vq_model import VQModel

    return VQModel.load(device="cpu")


def stream_docs(name: str, docs: int) -> list[tuple[str, str, list[dict]]]:
    """First `docs` documents of a shared edit stream; skips the test when data is absent."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    from engine.bench import read_stream

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
