"""The worker's log format: Faust's coloured text lines, or one JSON object a line.

INCSTREAM_LOG_FORMAT=json gives a log pipeline (Loki, Elasticsearch, Cloud Logging) records it
can parse without patterns: {"time", "level", "logger", "message"} plus "exception" (the
formatted traceback) when there is one. It goes to stderr, as the text lines do. Faust's
Worker takes it as a logging.config dict (mode.utils.logging), which replaces its default
handlers; the level stays INCSTREAM_LOG_LEVEL.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(log_format: str, level: str) -> dict[str, Any] | None:
    """The logging.config dict for Faust's Worker; None keeps Faust's own (text)."""
    if log_format == "text":
        return None
    if log_format != "json":
        raise ValueError(f"unknown log format {log_format!r}: text or json")
    return {
        "version": 1,
        "disable_existing_loggers": False,  # loggers made at import time must keep logging
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "json", "level": level.upper()}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }
