"""An INCSTREAM_* variable that names no setting stops the CLI with an error naming it (and the
closest known name) instead of being silently ignored; the ones read elsewhere (datasets, test
hooks, CI) are allowed by name, and every INCSTREAM_* name the repo uses is known."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from incstream.pipeline.cli import cli
from incstream.pipeline.settings import (
    OTHER_VARIABLES,
    UnknownVariablesError,
    check_environment,
    known_variables,
)

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "INCSTREAM_"  # typos below are built from it so that the repo scan does not see them


def test_settings_and_the_other_variables_pass():
    environ = {name: "1" for name in known_variables()}
    environ.update({"PATH": "/bin", "INCSTREAMER": "x", "incstream_broker": "kafka://b:9092"})
    check_environment(environ)
    assert {PREFIX + "BROKER", PREFIX + "LOG_FORMAT", PREFIX + "NO_SKIPS"} <= known_variables()


def test_a_misspelt_setting_is_named_with_the_closest_known_one():
    with pytest.raises(UnknownVariablesError) as raised:
        check_environment({PREFIX + "MODLE": "none", PREFIX + "BROKER": "x:1"})
    message = str(raised.value)
    assert f"{PREFIX}MODLE (did you mean {PREFIX}MODEL?)" in message
    assert f"{PREFIX}BROKER" not in message.split(".")[0]


def test_every_unknown_variable_is_named_even_without_a_close_match():
    unknown = {PREFIX + "MEMORY_BUDGET": "1", PREFIX + "ZZZ": "1", "incstream_dta_dir": "/x"}
    with pytest.raises(UnknownVariablesError) as raised:
        check_environment(unknown)
    message = str(raised.value)
    assert f"{PREFIX}MEMORY_BUDGET (did you mean {PREFIX}MEMORY_BUDGET_BYTES?)" in message
    assert f"{PREFIX}ZZZ," in message or f"{PREFIX}ZZZ." in message
    assert f"incstream_dta_dir (did you mean {PREFIX}DATA_DIR?)" in message


def test_the_cli_refuses_to_start_with_an_unknown_variable():
    runner = CliRunner()
    result = runner.invoke(cli, ["produce", "--help"], env={PREFIX + "BROKR": "x:1"})
    assert result.exit_code == 1
    assert f"{PREFIX}BROKR (did you mean {PREFIX}BROKER?)" in result.output
    assert runner.invoke(cli, ["produce", "--help"], env={PREFIX + "BROKER": "x:1"}).exit_code == 0


def test_every_incstream_variable_the_repo_names_is_known():
    """A variable added anywhere (code, tests, ./dev, CI, docs, deploy) must be a setting or be
    listed in settings.OTHER_VARIABLES, or the worker would refuse to start with it set."""
    name = re.compile(r"\bINCSTREAM_[A-Z0-9_]*[A-Z0-9]")  # (lower case: metric names)
    files = [ROOT / "dev", ROOT / ".ci" / "run", *ROOT.glob("*.md")]
    for folder in ("incstream", "engine", "state", "pipeline", "tests", "deploy", "docs",
                   "mutation", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in
                  (".py", ".md", ".yml", ".yaml", ".sh", ".toml", "")]
    used = {match for path in files if path.is_file()
            for match in name.findall(path.read_text(errors="replace"))}
    assert used  # the scan finds the settings
    assert used - known_variables() == set()
    assert known_variables() >= OTHER_VARIABLES


def test_the_agent_batches_by_default_only_where_a_batch_answers_as_one_at_a_time(monkeypatch):
    from incstream.pipeline.settings import BATCH_EVENTS, Settings

    monkeypatch.delenv(PREFIX + "BATCH_MAX_EVENTS", raising=False)

    class Alike:
        batches_alone_exact = True

    class Unlike:
        batches_alone_exact = False

    settings = Settings()
    assert settings.batch_max_events is None
    assert settings.batch_events(Alike()) == BATCH_EVENTS > 1
    assert settings.batch_events(Unlike()) == 1 and settings.batch_events(None) == 1
    assert Settings(batch_max_events=3).batch_events(Unlike()) == 3
