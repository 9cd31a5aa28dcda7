"""pyproject.toml installs every package of the design card's folders, under incstream.*.

The installed wheel is proven end to end by `./dev check-install` (CI): a fresh venv, pip install,
the demo, pip check. This is the fast half: a package folder added without being listed in
[tool.setuptools] packages would be missing from the wheel (and only from the wheel: the
editable install of ./dev still finds it).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def folder_packages() -> dict[str, Path]:
    """{incstream.<dotted name>: folder} for every folder holding Python code."""
    found: dict[str, Path] = {}
    for name, folder in SETUPTOOLS["package-dir"].items():
        base = ROOT / folder
        for source in base.rglob("*.py"):
            package = source.parent
            dotted = ".".join([name, *package.relative_to(base).parts])
            found[dotted] = package
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    found = folder_packages()
    assert {"incstream", "incstream.engine", "incstream.state", "incstream.pipeline"} <= set(found)
    missing = sorted(set(found) - set(SETUPTOOLS["packages"]))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(set(SETUPTOOLS["packages"]) - set(found))
    assert not stale, f"listed in pyproject.toml but no such folder: {stale}"


def test_every_package_folder_has_an_init() -> None:
    without = sorted(str(folder.relative_to(ROOT)) for folder in folder_packages().values()
                     if not (folder / "__init__.py").is_file())
    assert not without, f"folders with Python code but no __init__.py: {without}"


def test_only_the_incstream_namespace_is_installed() -> None:
    assert all(p == "incstream" or p.startswith("incstream.") for p in SETUPTOOLS["packages"])
    assert set(SETUPTOOLS["package-dir"]) <= set(SETUPTOOLS["packages"])


def _package_folder(package: str) -> str:
    """The folder setuptools takes a package from: the longest package-dir entry that is the
    package or a parent of it, and the rest of the dotted name below that."""
    dirs = SETUPTOOLS["package-dir"]
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in dirs:
            return "/".join([dirs[head], *parts[i:]])
    return package.replace(".", "/")


def test_package_data_exists() -> None:
    """The data globs match files (a renamed folder would ship a model-less wheel)."""
    for package, globs in SETUPTOOLS["package-data"].items():
        folder = ROOT / _package_folder(package)
        for glob in globs:
            assert any(p.is_file() for p in folder.glob(glob)), f"{package}: {glob} matches nothing"
