"""tests/conftest.py: in CI a skip fails the run, except for a test marked `gpu`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = '''
import pytest

def test_plain_skip():
    pytest.skip("data not fetched")

@pytest.fixture
def missing():
    pytest.skip("service not running")

def test_skip_in_a_fixture(missing):
    pass

@pytest.mark.gpu
def test_needs_gpu():
    import torch
    assert torch.cuda.is_available()

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
'''


def run_suite(tmp_path: Path, **env: str) -> tuple[int, str]:
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "INCSTREAM_NO_SKIPS")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def outcome_counts(out: str) -> dict[str, int]:
    """{outcome: n} from pytest's closing line."""
    tail = out.strip().splitlines()[-1]
    return {m[2]: int(m[1]) for m in re.finditer(r"(\d+) (\w+)", tail) if m[2] != "in"}


def gpu_outcome() -> str:
    import torch

    return "passed" if torch.cuda.is_available() else "skipped"


@pytest.mark.parametrize("env", [{"CI": "true"}, {"INCSTREAM_NO_SKIPS": "1"}])
def test_ci_turns_non_gpu_skips_into_failures(tmp_path: Path, env: dict[str, str]) -> None:
    code, out = run_suite(tmp_path, **env)
    assert code == 1, out
    counts = outcome_counts(out)
    # the skip in the test body fails it; the one in a fixture is an error at setup
    want = {"failed": 1, "error": 1, "passed": 1, "xfailed": 1}
    want[gpu_outcome()] = want.get(gpu_outcome(), 0) + 1
    assert counts == want, out
    assert "skipped in CI, where only tests marked `gpu` may skip: data not fetched" in out
    assert "service not running" in out
    if gpu_outcome() == "skipped":
        assert "needs a CUDA GPU" in out


def test_locally_skips_stay_skips(tmp_path: Path) -> None:
    code, out = run_suite(tmp_path)
    assert code == 0, out
    want = {"skipped": 2, "passed": 1, "xfailed": 1}
    want[gpu_outcome()] += 1
    assert outcome_counts(out) == want, out
