"""The worker's hot session cache and per-revision classifier (pipeline.document_sessions)."""

from __future__ import annotations

import pytest

from incstream.pipeline.document_sessions import SessionCache, dense_equivalent_macs, softmax_scores
from incstream.pipeline.settings import Settings


class Fake:
    def __init__(self, size: int) -> None:
        self.size = size

    def nbytes(self) -> int:
        return self.size


def test_lru_evicts_least_recently_used_within_the_budget():
    cache = SessionCache(budget_bytes=100)
    a, b, c = Fake(40), Fake(40), Fake(40)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recently used
    assert cache.put("c", c) == 1
    assert "b" not in cache and cache.get("a") is a and cache.get("c") is c
    assert cache.nbytes == 80 and cache.evictions == 1


def test_put_remeasures_a_grown_session_and_too_large_ones_are_not_kept():
    cache = SessionCache(budget_bytes=100)
    a = Fake(30)
    cache.put("a", a)
    cache.put("b", Fake(30))
    a.size = 60
    cache.put("a", a)  # re-measured after an edit: 90 bytes in all
    assert cache.nbytes == 90 and len(cache) == 2
    assert cache.put("huge", Fake(101)) == 1
    assert "huge" not in cache and cache.nbytes == 90
    cache.discard("a")
    assert cache.nbytes == 30 and cache.get("a") is None


def test_softmax_scores_sum_to_one_and_keep_label_order():
    scores = softmax_scores([2.0, -1.0], ("negative", "positive"))
    assert list(scores) == ["negative", "positive"]
    assert scores["negative"] > scores["positive"]
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-8)


def test_dense_equivalent_matches_the_engine_mac_counter():
    """The analytic dense-original MACs equal what engine.model.minilm reports for a real
    forward."""
    import torch

    from incstream.engine.model.base_model import base_model_path
    from incstream.engine.model.macs import MacCounter
    from incstream.engine.model.minilm import forward_dense, load_minilm

    torch.set_num_threads(1)
    weights = load_minilm(base_model_path(), torch.float32, "cpu")
    counter = MacCounter()
    for n in (5, 17):
        ids = torch.full((n + 2,), 1000)
        forward_dense(weights, ids, torch.arange(n + 2), counter)
    assert dense_equivalent_macs([5, 17], weights.config) == counter.total


def test_the_default_model_setting_is_the_default_bundle():
    from incstream.engine.model.model_bundle import DEFAULT_MODEL

    assert Settings().model == DEFAULT_MODEL
    assert Settings(model="none").model_enabled is False


def test_a_worker_on_the_default_settings_runs_the_fast_mode_and_says_so(caplog):
    """The default bundle asks for the fast mode; the classifier a worker loads with default
    settings runs it, and its start-up log names the mode and dial (an operator's only view
    of it besides the manifest)."""
    import logging

    from incstream.engine.incremental.fast_mode import FastModeConfig
    from incstream.engine.model.model_bundle import DEFAULT_MODEL
    from incstream.pipeline.document_sessions import DocumentClassifier
    from incstream.pipeline.metrics import WorkerMetrics

    settings = Settings()
    with caplog.at_level(logging.INFO, logger="incstream.sessions"):
        clf = DocumentClassifier.load(settings.model, 1 << 28, WorkerMetrics(), threads=1,
                                      mode=settings.engine)
        exact = DocumentClassifier.load(settings.model, 1 << 28, WorkerMetrics(), threads=1,
                                        mode="exact")
    assert isinstance(clf.mode, FastModeConfig) and clf.mode.tau == 2.0
    assert f"model {DEFAULT_MODEL}, engine mode fast (tau 2.0" in caplog.text
    assert exact.mode == "exact" and "engine mode exact" in caplog.text


def test_make_room_evicts_least_recently_used_before_a_session_is_built():
    cache = SessionCache(budget_bytes=100)
    cache.put("a", Fake(40))
    cache.put("b", Fake(40))
    assert cache.make_room(20) == 0  # 80 + 20 fits
    assert cache.make_room(30) == 1 and "a" not in cache and cache.nbytes == 40
    assert cache.make_room(100) == 1 and len(cache) == 0 and cache.evictions == 2


def test_the_cache_releases_memory_after_it_evicts_and_only_then():
    released = []
    cache = SessionCache(budget_bytes=100, released=lambda: released.append(len(cache)))
    cache.put("a", Fake(60))
    cache.make_room(30)
    assert released == []
    cache.make_room(50)  # a goes
    assert released == [0] and cache.evictions == 1
    cache.put("b", Fake(70))
    cache.put("c", Fake(70))  # b goes
    assert released == [0, 1] and cache.evictions == 2
