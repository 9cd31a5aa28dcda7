"""Choosing part of a doc-edit/v1 stream: the first N documents, the first N events."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def select_events(
    events: Iterable[dict[str, Any]], docs: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Events of the first `docs` documents (in order of first appearance), at most `limit`."""
    chosen: set[str] = set()
    selected: list[dict[str, Any]] = []
    for event in events:
        doc_id = event.get("doc_id")
        if docs is not None and doc_id not in chosen:
            if len(chosen) >= docs:
                continue
            chosen.add(doc_id)
        selected.append(event)
        if limit is not None and len(selected) >= limit:
            break
    return selected
