"""CI: the locks still match pyproject.toml (`./dev check-lock`; offline, about a second).

Regenerating the locks and diffing is not deterministic over time (it asks the package indexes,
where new releases and files appear), so this checks what "matching" means directly, against
the ./dev venv that pip installed from requirements-dev.lock with hashes:

1. every pin carries a sha256, and requirements.lock's pins are requirements-dev.lock's;
2. every requirement in pyproject.toml (and packaging/lock-constraints.txt) is satisfied by
   the pinned version: a requirement added or narrowed without `./dev lock` fails here;
3. the lock is exactly the dependency closure of pyproject's requirements, walked through the
   installed packages' own metadata: a dependency missing from the lock fails, and so does a
   stale pin that nothing needs any more (a requirement removed without `./dev lock`);
4. the venv holds exactly the dev lock's versions (so 3 read the right metadata).

`pip check` (run by CI beside this) then says the pinned set is consistent in itself.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def read_lock(path: Path) -> dict[str, Version]:
    """{canonical name: pinned version} of a uv-generated lock; every pin must carry a hash."""
    pins: dict[str, Version] = {}
    entries = re.split(r"\n(?=\S)", path.read_text())
    for entry in entries:
        match = PIN.match(entry)
        if match is None:
            if entry.strip() and not entry.lstrip().startswith("#"):
                raise SystemExit(f"{path.name}: not a pin: {entry.splitlines()[0]!r}")
            continue
        name = canonicalize_name(match.group(1))
        if "--hash=sha256:" not in entry:
            raise SystemExit(f"{path.name}: {name} has no --hash (regenerate with ./dev lock)")
        pins[name] = Version(match.group(2))
    return pins


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in extras | {""})


def closure(roots: list[Requirement], pins: dict[str, Version]) -> tuple[set[str], list[str]]:
    """The names reachable from `roots` through installed metadata, and every requirement on
    the way that the pins do not satisfy."""
    seen: set[str] = set()
    problems: list[str] = []
    todo = [(req, "pyproject.toml", set[str]()) for req in roots]
    while todo:
        req, by, extras = todo.pop()
        if not applies(req, extras):
            continue
        name = canonicalize_name(req.name)
        pinned = pins.get(name)
        if pinned is None:
            problems.append(f"{req} (needed by {by}) is not in the lock")
            continue
        if not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req} (needed by {by}) is not satisfied by the pin {pinned}")
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(name) or []:
            todo.append((Requirement(line), name, set(req.extras)))
    return {key.split("[")[0] for key in seen}, problems


def check(lock: Path, roots: list[Requirement], installed_pins: dict[str, Version]) -> list[str]:
    pins = read_lock(lock)
    problems = [f"{lock.name}: {name}=={version} differs from requirements-dev.lock"
                for name, version in pins.items() if installed_pins.get(name) != version]
    reached, unsatisfied = closure(roots, pins)
    problems += [f"{lock.name}: {p}" for p in unsatisfied]
    problems += [f"{lock.name}: {name} is pinned but nothing in pyproject.toml needs it"
                 for name in sorted(set(pins) - reached)]
    return problems


def installed_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [Requirement(r) for r in project["dependencies"]]
    dev = base + [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    constraints = [Requirement(line) for line in
                   (ROOT / "packaging/lock-constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    dev_pins = read_lock(ROOT / "requirements-dev.lock")
    problems = [f"the venv has {name} {installed_version(name)}, requirements-dev.lock pins "
                f"{version} (rebuild it: rm -rf .venv && ./dev lint)"
                for name, version in dev_pins.items() if installed_version(name) != version]
    for lock, roots in (("requirements.lock", base), ("requirements-dev.lock", dev)):
        problems += check(ROOT / lock, roots, dev_pins)
        pins = read_lock(ROOT / lock)
        problems += [f"{lock}: {req} (packaging/lock-constraints.txt) is not satisfied"
                     for req in constraints
                     if not req.specifier.contains(pins.get(canonicalize_name(req.name),
                                                            Version("0")), prereleases=True)]
    for problem in problems:
        print(f"check-lock: {problem}", file=sys.stderr)
    if problems:
        print("check-lock: the locks do not match pyproject.toml; regenerate them with "
              "./dev lock", file=sys.stderr)
        return 1
    print(f"check-lock: requirements.lock and requirements-dev.lock ({len(dev_pins)} pins) "
          "match pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
