"""Shared fixtures for engine tests: the real model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from incstream.engine.model.base_model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def model():
    from incstream.engine.model.vq_model import VQModel

    return VQModel.load(device="cpu")
