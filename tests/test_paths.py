"""The data directory: everything incstream writes at run time goes under it, never the package."""

from __future__ import annotations

from pathlib import Path

import pytest

import incstream
from incstream import paths
from incstream.engine.model.codebooks import BUNDLES_DIR, bundle_dir
from incstream.engine.training.train import TrainConfig
from incstream.pipeline.settings import Settings


def test_home_defaults_to_the_user_data_dir(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.delenv("INCSTREAM_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert paths.data_home() == tmp_path / "xdg" / "incstream"


def test_every_run_time_path_is_under_home(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("INCSTREAM_HOME", str(tmp_path))
    monkeypatch.delenv("INCSTREAM_DATASETS_DIR", raising=False)
    package = Path(incstream.__file__).resolve().parent.parent
    cfg = TrainConfig(dataset="pang-lee-polarity")
    written = [paths.datasets_dir(), paths.dense_cache_dir(), cfg.bundle_path(),
               cfg.checkpoint_path(), Settings().data_dir]
    for path in written:
        assert path.is_relative_to(tmp_path), path
        assert not path.resolve().is_relative_to(package / "engine"), path


def test_trained_bundles_are_found_by_name(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("INCSTREAM_HOME", str(tmp_path))
    (tmp_path / "bundles" / "mine").mkdir(parents=True)
    assert bundle_dir("mine") == tmp_path / "bundles" / "mine"
    assert bundle_dir() == BUNDLES_DIR / "calibrated-minilm"  # shipped ones come first
