"""`./dev mutate [MODULE ...]`: a scoped mutmut run, one module at a time, with a JSON report.

Mutation testing changes the code in small ways (a ``<`` becomes ``<=``, a constant changes,
a line goes) and runs the tests that reach the changed function: a test suite that still
passes has a hole there, unless the change cannot alter behaviour (an "equivalent" mutant).
Not part of CI (minutes per module); run it after changing a core module or its tests.

For each MODULE (a path such as ``state/ordering.py`` or a dotted name such as
``engine.incremental.session``; default: the core set below) it:
1. copies engine/, state/, pipeline/ (laid out as installed: ``incstream/engine/`` ...) and
   tests/ to ``.incstream/mutate/<module>/`` (the working tree is never touched; ../shared is
   linked in for the tests that read edit streams),
2. runs ``mutmut run`` there on that module only, with the module's tests (``TESTS`` below, or
   ``--tests``; any other module gets the whole non-integration suite),
3. writes ``benchmarks/mutation-<module>.json``: counts by outcome, the score, and every
   surviving mutant's diff, each marked with the reason it is judged equivalent where
   ``mutation/equivalent.json`` has one. Runs are kept by ``--label`` (default ``latest``), so
   a ``before`` and an ``after`` run sit side by side.

Score = detected / (mutants - skipped), detected = killed + timeout (a mutant that makes the
tests hang is caught by the timeout). ``score_without_equivalent`` leaves out the survivors
judged equivalent.

Examples::

    ./dev mutate                                  # the core set
    ./dev mutate state/ordering.py --label after
    ./dev mutate engine/incremental/session.py \
        --functions common_ends,update_chunk,ExactChunks.*,DocumentSession.apply_token_edit
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".incstream" / "mutate"
EQUIVALENT = REPO / "mutation" / "equivalent.json"
COPY = ("engine", "state", "pipeline", "tests")
CORE = ("state/ordering.py", "engine/incremental/text_ops.py",
        "engine/incremental/edit_tokenizer.py")
# The fast tests of the incremental update (the slow real-stream ones add minutes per mutant
# and caught nothing these miss).
INCREMENTAL_TESTS = ["tests/engine/test_incremental_mutants.py",
                     "tests/engine/test_incremental_random.py",
                     "tests/engine/test_chunk_layout.py", "tests/engine/test_incremental.py",
                     "tests/engine/test_scaling.py", "-m", "not slow"]
# Tests that exercise each module directly (mutmut runs, per mutant, only those of them that
# reached the mutated function).
TESTS = {
    "state/ordering.py": ["tests/test_ordering.py"],
    "engine/incremental/text_ops.py": ["tests/test_text_ops.py", "tests/test_ordering.py"],
    "engine/incremental/edit_tokenizer.py": ["tests/engine/test_edit_tokenizer.py"],
    **{f"engine/incremental/{name}.py": INCREMENTAL_TESTS
       for name in ("session", "chunks", "incremental_attention")},
}
DEFAULT_TESTS = ["tests", "-m", "not integration"]
DETECTED = ("killed", "timeout")


def module_path(name: str) -> str:
    """'engine.incremental.session', 'engine/incremental/session.py' or
    './engine/incremental/session.py' -> 'engine/incremental/session.py'."""
    path = name.removeprefix("./")
    if not path.endswith(".py"):
        path = path.replace(".", "/") + ".py"
    if not (REPO / path).is_file():
        raise SystemExit(f"mutate: no module {path} in {REPO}")
    if path.split("/")[0] not in COPY[:3]:
        raise SystemExit(f"mutate: {path} is not under {', '.join(COPY[:3])}")
    return path


def installed_path(path: str) -> str:
    """'engine/x.py' -> 'incstream/engine/x.py': where pyproject's package-dir puts it, and so
    the path mutmut mutates and names its mutants by."""
    return f"incstream/{path}"


def slug(path: str) -> str:
    return path.removesuffix(".py").replace("/", "-")


def prepare(path: str, tests: list[str], tests_rev: str | None) -> Path:
    work = WORK / slug(path)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache")
    for name in COPY:
        if name == "tests" and tests_rev:  # the tests as committed at tests_rev
            archive = subprocess.run(["git", "archive", tests_rev, "tests"], cwd=REPO,
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
            continue
        # the sources go where the tests import them from: incstream/engine, ... (mutmut runs
        # the tests with the work dir first on sys.path, ahead of the editable install)
        target = work / name if name == "tests" else work / installed_path(name)
        shutil.copytree(REPO / name, target, ignore=ignore)
    shutil.copy(REPO / "incstream" / "__init__.py", work / "incstream")
    shutil.copy(REPO / "mutation" / "pytest_mutmut_compat.py", work)
    shared = REPO.parent / "shared"
    if shared.is_dir():  # tests/engine/engine_streams.py looks for <checkout>/../shared
        (work / "shared").symlink_to(shared)
    import tomllib

    pytest_ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"]

    def toml_list(values: list[str]) -> str:
        return "[" + ", ".join(json.dumps(v) for v in values) + "]"

    (work / "pyproject.toml").write_text(
        "# written by mutation/mutate.py\n"
        "[tool.mutmut]\n"
        'source_paths = ["incstream"]\n'
        f"only_mutate = {toml_list([installed_path(path)])}\n"
        'also_copy = ["pytest_mutmut_compat.py"]\n'
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "pytest_mutmut_compat"]\n'
        # a mutant that makes a test loop forever is stopped at 5x the tests' normal time
        # (mutmut's default 15x made one hanging mutant of edit_tokenizer cost minutes)
        "timeout_multiplier = 5.0\n"
        "\n[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
        f"markers = {toml_list(pytest_ini.get('markers', []))}\n"
        f"filterwarnings = {toml_list(pytest_ini.get('filterwarnings', []))}\n"
    )
    return work


def change_lines(diff: str) -> list[str]:
    """The removed and added lines of a mutant's diff, stripped: what identifies the mutation
    independently of mutmut's numbering (which shifts when the module changes)."""
    return [line[0] + line[1:].strip() for line in diff.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def mutant_globs(path: str, functions: list[str]) -> list[str]:
    """mutmut's names for the mutants of some functions of `path`: 'common_ends' ->
    'incstream.engine.incremental.session.x_common_ends__mutmut_*', 'ExactChunks.*' ->
    'incstream.engine.incremental.session.xǁExactChunksǁ*__mutmut_*'."""
    dotted = installed_path(path).removesuffix(".py").replace("/", ".")
    globs = []
    for function in functions:
        owner, _, method = function.rpartition(".")
        globs.append(f"{dotted}.xǁ{owner}ǁ{method}__mutmut_*" if owner
                     else f"{dotted}.x_{function}__mutmut_*")
    return globs


def collect(work: Path, path: str, globs: list[str] | None = None) -> list[dict]:
    """Every mutant of `path` in the finished run (of the functions `globs` name, if given):
    name, outcome, diff."""
    cwd = os.getcwd()
    os.chdir(work)
    try:
        from mutmut.__main__ import get_diff_for_mutant, status_by_exit_code
        from mutmut.configuration import Config
        from mutmut.mutation.data import SourceFileMutationData

        Config.ensure_loaded()
        data = SourceFileMutationData(path=Path(installed_path(path)))
        data.load()
        out = []
        for name, code in sorted(data.exit_code_by_key.items()):
            if globs and not any(fnmatch.fnmatchcase(name, g) for g in globs):
                continue
            status = status_by_exit_code[code]
            entry = {"name": name, "status": status}
            if status not in DETECTED:
                entry["diff"] = get_diff_for_mutant(name, path=Path(installed_path(path)))
            out.append(entry)
        return out
    finally:
        os.chdir(cwd)


def tree_state(path: str, tests_rev: str | None) -> dict:
    """What is mutated and tested: the working tree's module (it may differ from HEAD) and the
    working tree's tests, or those committed at `tests_rev`."""
    return {"module_blob": _git("hash-object", path),
            "module_differs_from_commit": bool(_git("status", "--porcelain", "--", path)),
            "tests_rev": _git("rev-parse", "--short", tests_rev) if tests_rev else None,
            "tests_differ_from_commit": (False if tests_rev else
                                         bool(_git("status", "--porcelain", "--", "tests")))}


def summarize(path: str, mutants: list[dict], tests: list[str], seconds: float,
              snapshot: dict, functions: list[str] | None = None) -> dict:
    counts = Counter(m["status"] for m in mutants)
    survivors = [{"name": m["name"], "status": m["status"], "change": change_lines(m["diff"]),
                  "equivalent": None, "diff": m["diff"]}
                 for m in mutants if m["status"] not in DETECTED]
    run = {
        "module": path,
        "command": f"./dev mutate {path}" + (
            f" --tests {shlex.quote(shlex.join(tests))}"
            if tests != TESTS.get(path, DEFAULT_TESTS) else "") + (
            f" --tests-rev {snapshot['tests_rev']}" if snapshot["tests_rev"] else "") + (
            f" --functions {','.join(functions)}" if functions else ""),
        "tests": tests,
        "functions": functions or "all",
        "tool": "mutmut 3.7.0 (requirements-dev.lock), hypothesis derandomized",
        "commit": _git("rev-parse", "--short", "HEAD"),
        **snapshot,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "mutants": len(mutants),
        "counts": dict(sorted(counts.items())),
        "survivors": survivors,
    }
    return annotate(run)


def annotate(run: dict) -> dict:
    """Mark the survivors mutation/equivalent.json judges equivalent; (re)compute the scores."""
    judged = json.loads(EQUIVALENT.read_text()).get(run["module"], []) \
        if EQUIVALENT.exists() else []
    reasons = {tuple(j["change"]): j["reason"] for j in judged}
    for survivor in run["survivors"]:
        survivor["equivalent"] = reasons.get(tuple(survivor["change"]))
    counts = run["counts"]
    total = run["mutants"] - counts.get("skipped", 0)
    detected = sum(counts.get(s, 0) for s in DETECTED)
    equivalent = sum(1 for s in run["survivors"] if s["equivalent"])
    survivors = run.pop("survivors")
    run.update({
        "score": round(detected / total, 4) if total else None,
        "judged_equivalent": equivalent,
        "score_without_equivalent": (round(detected / (total - equivalent), 4)
                                     if total - equivalent else None),
        "unjudged_survivors": [s["name"] for s in survivors if not s["equivalent"]],
        "survivors": survivors,
    })
    return run


def annotate_report(path: str, out_dir: Path) -> None:
    """Re-mark every run of a module's report after mutation/equivalent.json changed."""
    report = out_dir / f"mutation-{slug(path)}.json"
    data = json.loads(report.read_text())
    for label, run in data["runs"].items():
        annotate(run)
        print(f"[mutate] {path} [{label}]: score {run['score']}, {run['judged_equivalent']} "
              f"judged equivalent, {len(run['unjudged_survivors'])} unjudged survivors",
              file=sys.stderr)
    report.write_text(json.dumps(data, indent=1) + "\n")


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip()


def run_module(path: str, tests: list[str], max_children: int, label: str,
               out_dir: Path, tests_rev: str | None = None,
               functions: list[str] | None = None) -> dict:
    snapshot = tree_state(path, tests_rev)
    work = prepare(path, tests, tests_rev)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("CI", None)  # skips inside a mutation run are not CI's business
    mutmut = Path(sys.executable).parent / "mutmut"
    print(f"[mutate] {path}: mutmut run in {work} (tests: {' '.join(tests)})", file=sys.stderr)
    started = time.monotonic()
    globs = mutant_globs(path, functions) if functions else []
    proc = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *globs],
                          cwd=work, env=env, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"mutate: mutmut run exited {proc.returncode} for {path}; "
                         f"see {work}")
    result = summarize(path, collect(work, path, globs), tests, seconds, snapshot, functions)
    report = out_dir / f"mutation-{slug(path)}.json"
    runs = json.loads(report.read_text()).get("runs", {}) if report.exists() else {}
    runs[label] = result
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"module": path, "runs": runs}, indent=1) + "\n")
    print(f"[mutate] {path}: {result['mutants']} mutants {result['counts']}; "
          f"score {result['score']}, {result['judged_equivalent']} judged equivalent, "
          f"{len(result['unjudged_survivors'])} unjudged survivors -> {report} [{label}]",
          file=sys.stderr)
    for s in result["survivors"]:
        if not s["equivalent"]:
            print(f"\n# {s['name']}: {s['status']}\n{s['diff']}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./dev mutate", description=__doc__.split("\n")[0])
    p.add_argument("modules", nargs="*", help=f"default: {' '.join(CORE)}")
    p.add_argument("--tests", default=None,
                   help="pytest selection for every module given, one quoted string, e.g. "
                        "\"tests/engine -m 'not slow'\" (default: per module, see TESTS)")
    p.add_argument("--max-children", type=int, default=1,
                   help="mutants tested in parallel (default 1: a 2-core shared machine)")
    p.add_argument("--tests-rev", default=None,
                   help="take tests/ as committed at this git revision (e.g. to score the "
                        "tests before a change: --tests-rev HEAD~1 --label before)")
    p.add_argument("--functions", default=None,
                   help="mutate only these functions, comma-separated; Class.method or "
                        "Class.* for methods, e.g. "
                        "'common_ends,update_chunk,ExactChunks.*,DocumentSession.apply_token_edit'"
                        " (default: the whole module)")
    p.add_argument("--label", default="latest", help="name of this run in the report")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks",
                   help="report directory (default benchmarks/)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a survivor is not judged equivalent")
    p.add_argument("--annotate-only", action="store_true",
                   help="run nothing: re-mark the existing reports' survivors from "
                        "mutation/equivalent.json")
    args = p.parse_args(argv)
    if args.annotate_only:
        for path in [module_path(m) for m in args.modules or CORE]:
            annotate_report(path, args.out)
        return 0
    unjudged = 0
    for path in [module_path(m) for m in args.modules or CORE]:
        tests = shlex.split(args.tests) if args.tests else TESTS.get(path, DEFAULT_TESTS)
        functions = args.functions.split(",") if args.functions else None
        result = run_module(path, tests, args.max_children, args.label, args.out,
                            args.tests_rev, functions)
        unjudged += len(result["unjudged_survivors"])
    return 1 if args.strict and unjudged else 0


if __name__ == "__main__":
    raise SystemExit(main())
