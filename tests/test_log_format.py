"""INCSTREAM_LOG_FORMAT=json: the logging config the worker hands Faust writes one JSON object
a line, tracebacks included, through loggers that existed before it was applied."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from contextlib import redirect_stderr

import pytest

from incstream.pipeline.log_format import logging_config
from incstream.pipeline.settings import Settings


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_lines_with_level_logger_message_and_traceback(restore_logging):
    early = logging.getLogger("incstream.test.early")  # made before the config, as at import
    stream = io.StringIO()
    with redirect_stderr(stream):
        logging.config.dictConfig(logging_config("json", "info"))
    early.info("ready: %d partitions\nsecond line", 4)
    early.debug("below the level")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("incstream.test.other").exception("failed on %s", "doc-1")
    for handler in logging.getLogger().handlers:  # the handler took sys.stderr at config time
        handler.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info" and first["logger"] == "incstream.test.early"
    assert first["message"] == "ready: 4 partitions\nsecond line"
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["level"] == "error" and second["message"] == "failed on doc-1"
    assert "ValueError: bad" in second["exception"]


def test_text_keeps_fausts_own_config_and_the_setting_is_checked(monkeypatch):
    assert logging_config("text", "info") is None
    monkeypatch.setenv("INCSTREAM_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("INCSTREAM_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()
