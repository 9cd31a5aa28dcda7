"""deploy/prometheus checked by promtool (Debian's `prometheus` package; .ci/run installs it):
the config loads its rules by a relative path from the repo, the rules parse, and
rules_test.yml's unit tests pass. Every alert must have a unit test that fires it and one where
it stays quiet (the unit tests' own `alertname` entries are checked against rules.yml here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("needs promtool (apt-get install prometheus; .ci/run installs it)")
    return path


def run(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_config_and_rules_check(promtool, tmp_path):
    # From the repo root, as an operator would run it: the rules path is relative to the file.
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout
    assert "SUCCESS" in run(promtool, "check", "rules", "rules.yml")


def test_rule_unit_tests_pass(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "rules_test.yml")


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]
              if "alert" in rule}
    cases = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fires == set(), "alerts without a unit test that fires them"
    assert alerts - quiet == set(), "alerts without a unit test where they stay quiet"
