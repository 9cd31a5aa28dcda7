"""incstream: keep a document classifier's answer current while documents are edited.

The code lives in the design card's top-level folders, ``engine/`` (pure PyTorch), ``state/``
(per-document state and its codecs) and ``pipeline/`` (the Faust worker, CLI and benchmarks).
pyproject.toml maps them into this one namespace (``incstream.engine``, ``incstream.state``,
``incstream.pipeline``), so installing incstream never shadows another package called
``engine`` or ``state``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("incstream")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
