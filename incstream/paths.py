"""Where incstream writes at run time: one data directory, never the installed package.

Datasets fetched for training and evaluation, dense-vector caches, training checkpoints, trained
model bundles and the worker's local RocksDB all live under ``$INCSTREAM_HOME``; unset, that is
the user data directory (``$XDG_DATA_HOME/incstream``, usually ``~/.local/share/incstream``, on
Linux; platformdirs' equivalent elsewhere). ``./dev`` points it at the checkout's
``.incstream``. Standard library and platformdirs only, so engine code may use it and stay free
of the pipeline's settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV_HOME = "INCSTREAM_HOME"
ENV_DATASETS = "INCSTREAM_DATASETS_DIR"  # the datasets alone elsewhere (a shared cache)


def data_home() -> Path:
    """``$INCSTREAM_HOME``, else the user data directory."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("incstream", appauthor=False))


def datasets_dir() -> Path:
    """The pinned dataset archives (``$INCSTREAM_DATASETS_DIR``, else ``<home>/datasets``)."""
    env = os.environ.get(ENV_DATASETS)
    return Path(env).expanduser() if env else data_home() / "datasets"


def dense_cache_dir() -> Path:
    """Document vectors cached by training and evaluation."""
    return data_home() / "cache" / "dense"


def kernels_dir() -> Path:
    """Compiled CPU kernels (engine.incremental.held_attention), one file per source and CPU."""
    return data_home() / "cache" / "kernels"


def checkpoints_dir() -> Path:
    """Training checkpoints, one directory per bundle being trained."""
    return data_home() / "checkpoints"


def bundles_dir() -> Path:
    """Model bundles written by ``incstream train`` (the shipped ones stay in the package)."""
    return data_home() / "bundles"


def task_slug(dataset: str) -> str:
    """The short task name trained models are named by: a dataset name or file's stem, with the
    "pang-lee-" prefix dropped ("pang-lee-polarity" -> "polarity")."""
    return Path(dataset).stem.replace("pang-lee-", "")


def worker_dir() -> Path:
    """The worker's local RocksDB, unless ``INCSTREAM_DATA_DIR`` says otherwise."""
    return data_home() / "worker"
