"""Revision ordering for one document: the rules of DESIGN.md §4, as a pure function.

    rev <= last            duplicate: dropped and counted (at-least-once delivery replays)
    rev == last + 1        applied (then any held successors are applied too)
    rev >  last + 1        held until the gap fills (bounded); past the bound -> dead letter
    snapshot, rev > last   creates or resyncs the document, then drains held successors
    awaiting a snapshot    (its stored state was unreadable: text and rev unknown) an edit is
                           dead-lettered (awaiting_snapshot); any snapshot restores it

An event that cannot be applied (ops past the end, checksum mismatch, base_rev mismatch) is
rejected with a reason and leaves the document exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from incstream.engine.incremental.text_ops import InvalidOps, TextChange, apply_ops, sha1_hex
from incstream.state.document import DocumentState
from incstream.state.edit_event import EditEvent, EventRejected, event_from_json, parse_edit_event

DEFAULT_MAX_HELD = 256


@dataclass(frozen=True)
class AppliedRevision:
    """One revision that is now part of the document."""

    rev: int
    change: TextChange
    is_snapshot: bool
    text: str  # the document text after this revision
    ts: float | None


@dataclass(frozen=True)
class Rejection:
    """An event that goes to the dead-letter topic, and why.

    `incoming`: it is the event being advanced (the caller has its bytes as they arrived);
    otherwise a held event, and `event` is what was held: its text as it arrived (a str) when
    the caller passed it, else its doc-edit/v1 JSON.
    """

    reason: str
    message: str
    event: dict[str, Any] | str
    incoming: bool = True


@dataclass
class Decision:
    outcome: str  # what happened to the incoming event: "ok", "duplicate", "gap" or "dlq"
    state: DocumentState
    state_changed: bool = False
    applied: list[AppliedRevision] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def _check_result(event: EditEvent, text: str) -> None:
    if event.len_after is not None and len(text) != event.len_after:
        raise EventRejected(
            "length_mismatch",
            f"len_after says {event.len_after} code points, applying gives {len(text)}",
        )
    if event.sha1_after is not None and sha1_hex(text) != event.sha1_after:
        raise EventRejected(
            "checksum_mismatch",
            f"sha1_after {event.sha1_after} does not match the text after rev {event.rev}",
        )


def apply_event(state: DocumentState, event: EditEvent) -> tuple[DocumentState, AppliedRevision]:
    """Apply one in-order event (edit with rev == last+1, or snapshot). Raises EventRejected."""
    if event.snapshot is not None:
        text = event.snapshot
        change = TextChange(start=0, deleted=len(state.text), inserted=len(text))
    else:
        if event.base_rev is not None and event.base_rev != state.rev:
            raise EventRejected(
                "base_rev_mismatch",
                f"base_rev {event.base_rev} but the document is at rev {state.rev}",
            )
        try:
            text, change = apply_ops(state.text, event.ops or [])
        except InvalidOps as exc:
            raise EventRejected(exc.reason, str(exc)) from None
    _check_result(event, text)
    held = {rev: e for rev, e in state.held.items() if rev > event.rev}
    new_state = state.evolve(
        rev=event.rev,
        text=text,
        held=held,
        needs_snapshot=state.needs_snapshot and not event.is_snapshot,
    )
    return new_state, AppliedRevision(event.rev, change, event.is_snapshot, text, event.ts)


def _drain_held(decision: Decision) -> None:
    """Apply held events while they continue the document's revision sequence."""
    while (next_rev := decision.state.rev + 1) in decision.state.held:
        state = decision.state
        held = state.held[next_rev]
        remaining = {rev: e for rev, e in state.held.items() if rev != next_rev}
        try:
            event = parse_edit_event(held) if isinstance(held, str) else event_from_json(held)
            new_state, applied = apply_event(state, event)
        except EventRejected as exc:
            decision.rejected.append(Rejection(exc.reason, str(exc), held, incoming=False))
            decision.state = state.evolve(held=remaining)
            decision.state_changed = True
            return
        decision.state, decision.state_changed = new_state, True
        decision.applied.append(applied)


def advance(
    state: DocumentState | None, event: EditEvent, max_held: int = DEFAULT_MAX_HELD,
    raw: str | None = None,
) -> Decision:
    """Decide what `event` does to `state` (None: a document never seen before).

    `raw`: the event's text as it arrived; a held event keeps it (so a held event that later
    turns out bad is dead-lettered as it arrived), else its doc-edit/v1 JSON."""
    if state is None:
        state = DocumentState(doc_id=event.doc_id)
    decision = Decision(outcome="ok", state=state)

    if event.rev <= state.rev:
        decision.outcome = "duplicate"
        return decision

    if state.awaits_snapshot and not event.is_snapshot:
        decision.outcome = "dlq"
        decision.rejected.append(Rejection(
            "awaiting_snapshot",
            "this document's stored state was unreadable and has been reset; it needs a "
            "snapshot before edits can apply", event.to_json()))
        return decision

    if not event.is_snapshot and event.rev > state.rev + 1:
        if event.rev in state.held:
            decision.outcome = "duplicate"
            return decision
        if len(state.held) >= max_held:
            decision.outcome = "dlq"
            decision.rejected.append(
                Rejection(
                    "gap_overflow",
                    f"rev {event.rev} arrived while rev {state.rev + 1} is missing and "
                    f"{len(state.held)} events are already held; send a snapshot to resync",
                    event.to_json(),
                )
            )
            if not state.needs_snapshot:
                decision.state = state.evolve(needs_snapshot=True)
                decision.state_changed = True
            return decision
        decision.outcome = "gap"
        held = raw if raw is not None else event.to_json()
        decision.state = state.evolve(held={**state.held, event.rev: held})
        decision.state_changed = True
        return decision

    try:
        new_state, applied = apply_event(state, event)
    except EventRejected as exc:
        decision.outcome = "dlq"
        decision.rejected.append(Rejection(exc.reason, str(exc), event.to_json()))
        return decision
    decision.state, decision.state_changed = new_state, True
    decision.applied.append(applied)
    _drain_held(decision)
    return decision
