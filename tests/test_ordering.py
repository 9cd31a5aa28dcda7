"""Revision ordering: duplicates, gaps, snapshots, rejections (state.ordering)."""

from incstream.engine.incremental.text_ops import TextChange, sha1_hex
from incstream.state.document import DocumentState, awaiting_snapshot
from incstream.state.edit_event import EditEvent, parse_edit_event
from incstream.state.ordering import AppliedRevision, advance


def snapshot(rev: int, text: str, doc: str = "d1") -> EditEvent:
    return EditEvent(doc_id=doc, rev=rev, snapshot=text)


def insert_at_end(state_text: str, rev: int, piece: str, doc: str = "d1", **checks) -> EditEvent:
    return EditEvent(doc_id=doc, rev=rev, ops=[{"retain": len(state_text)}, {"insert": piece}],
                     **checks)


def test_snapshot_creates_then_edits_apply_in_order():
    d = advance(None, snapshot(0, "ab"))
    assert d.outcome == "ok" and d.state.text == "ab" and d.state.rev == 0
    d = advance(d.state, insert_at_end("ab", 1, "c", sha1_after=sha1_hex("abc"), len_after=3))
    assert d.outcome == "ok" and d.state.text == "abc" and d.state.rev == 1
    assert [a.rev for a in d.applied] == [1]


def test_duplicates_are_dropped_and_change_nothing():
    state = advance(None, snapshot(0, "ab")).state
    state = advance(state, insert_at_end("ab", 1, "c")).state
    for event in (snapshot(0, "zz"), insert_at_end("ab", 1, "c")):
        d = advance(state, event)
        assert d.outcome == "duplicate" and not d.state_changed and d.state == state


def test_gap_is_held_then_drained_in_order_when_it_fills():
    state = advance(None, snapshot(0, "a")).state
    d3 = advance(state, insert_at_end("abc", 3, "d"))
    assert d3.outcome == "gap" and d3.state.rev == 0 and set(d3.state.held) == {3}
    d2 = advance(d3.state, insert_at_end("ab", 2, "c"))
    assert d2.outcome == "gap" and set(d2.state.held) == {2, 3}
    assert advance(d2.state, insert_at_end("ab", 2, "c")).outcome == "duplicate"
    d1 = advance(d2.state, insert_at_end("a", 1, "b"))
    assert d1.outcome == "ok"
    assert [a.rev for a in d1.applied] == [1, 2, 3]
    assert d1.state.text == "abcd" and d1.state.rev == 3 and d1.state.held == {}


def test_events_before_the_first_snapshot_wait_for_it():
    d = advance(None, insert_at_end("x", 1, "y"))
    assert d.outcome == "gap" and not d.state.exists
    d = advance(d.state, snapshot(0, "x"))
    assert [a.rev for a in d.applied] == [0, 1] and d.state.text == "xy"


def test_gap_bound_overflow_goes_to_dlq_and_a_snapshot_resyncs():
    state = advance(None, snapshot(0, "a")).state
    state = advance(state, insert_at_end("a", 5, "x"), max_held=2).state
    state = advance(state, insert_at_end("a", 6, "x"), max_held=2).state
    d = advance(state, insert_at_end("a", 7, "x"), max_held=2)
    assert d.outcome == "dlq" and d.rejected[0].reason == "gap_overflow"
    assert d.state.needs_snapshot and set(d.state.held) == {5, 6}
    # A snapshot at rev 6 resyncs: held rev 5 and 6 are obsolete, the flag clears.
    r = advance(d.state, snapshot(6, "fresh"))
    assert r.outcome == "ok" and r.state.text == "fresh" and r.state.rev == 6
    assert r.state.held == {} and not r.state.needs_snapshot


def test_snapshot_resync_keeps_later_held_events_and_applies_them():
    state = advance(None, snapshot(0, "a")).state
    state = advance(state, insert_at_end("new", 5, "!")).state
    d = advance(state, snapshot(4, "new"))
    assert [a.rev for a in d.applied] == [4, 5] and d.state.text == "new!"


def test_rejections_leave_the_document_exactly_as_it_was():
    state = advance(None, snapshot(0, "abc")).state
    cases = {
        "ops_past_end": EditEvent("d1", 1, ops=[{"retain": 10}]),
        "invalid_ops": EditEvent("d1", 1, ops=[{"frobnicate": 1}]),
        "checksum_mismatch": insert_at_end("abc", 1, "d", sha1_after="0" * 40),
        "length_mismatch": insert_at_end("abc", 1, "d", len_after=99),
        "base_rev_mismatch": insert_at_end("abc", 1, "d", base_rev=7),
    }
    for reason, event in cases.items():
        d = advance(state, event)
        assert d.outcome == "dlq", reason
        assert d.rejected[0].reason == reason
        assert d.state == state and not d.state_changed
    # ... and the right next edit still applies.
    assert advance(state, insert_at_end("abc", 1, "d")).state.text == "abcd"


def test_a_held_event_that_turns_out_bad_is_rejected_and_draining_stops():
    state = advance(None, snapshot(0, "a")).state
    state = advance(state, EditEvent("d1", 2, ops=[{"retain": 99}])).state
    state = advance(state, insert_at_end("abc", 3, "d")).state
    d = advance(state, insert_at_end("a", 1, "b"))
    assert [a.rev for a in d.applied] == [1]
    assert [r.reason for r in d.rejected] == ["ops_past_end"]
    assert d.state.rev == 1 and d.state.text == "ab" and set(d.state.held) == {3}


def test_state_of_a_new_document_defaults():
    assert not DocumentState("x").exists


# ------------------------------------------------------ edges found by mutation testing
# (./dev mutate state/ordering.py; see benchmarks/mutation-state-ordering.json). What goes to
# the dead-letter topic and what the worker publishes come straight from these fields.


def test_a_new_document_gets_the_event_doc_id_and_an_applied_revision_says_everything():
    d = advance(None, EditEvent("doc-7", 0, snapshot="hello", ts=17.5))
    assert d.state.doc_id == "doc-7" and d.state_changed
    assert d.applied == [AppliedRevision(0, TextChange(0, 0, 5), True, "hello", 17.5)]
    d = advance(d.state, EditEvent("doc-7", 1, ops=[{"retain": 5}, {"insert": "!"}], ts=18))
    assert d.applied == [AppliedRevision(1, TextChange(5, 0, 1), False, "hello!", 18)]
    assert d.state_changed and d.state.needs_snapshot is False


def test_a_resync_snapshot_replaces_the_whole_text():
    state = advance(None, snapshot(0, "old text")).state
    d = advance(state, snapshot(1, "new"))
    assert d.applied[0].change == TextChange(start=0, deleted=8, inserted=3)
    assert d.applied[0].is_snapshot and d.applied[0].text == "new"


def test_state_changed_is_set_exactly_when_the_state_changes():
    state = advance(None, snapshot(0, "a")).state
    gap = advance(state, insert_at_end("ab", 2, "c"), max_held=1)
    assert gap.outcome == "gap" and gap.state_changed
    # Overflow: the needs_snapshot flag is set once (a state change), then stays set (none).
    first = advance(gap.state, insert_at_end("abc", 3, "d"), max_held=1)
    assert first.outcome == "dlq" and first.state_changed and first.state.needs_snapshot
    again = advance(first.state, insert_at_end("abcd", 4, "e"), max_held=1)
    assert again.outcome == "dlq" and not again.state_changed and again.state == first.state
    # A rejected in-order event changes nothing; an applied one does.
    bad = advance(state, insert_at_end("a", 1, "b", len_after=5))
    assert bad.outcome == "dlq" and not bad.state_changed
    assert advance(state, insert_at_end("a", 1, "b")).state_changed


def test_draining_held_events_is_a_state_change_whether_they_apply_or_not():
    state = advance(None, snapshot(0, "a")).state
    good = advance(state, insert_at_end("ab", 2, "c")).state
    d = advance(good, insert_at_end("a", 1, "b"))
    assert d.state_changed and [a.rev for a in d.applied] == [1, 2] and d.state.held == {}
    bad = advance(state, insert_at_end("ab", 2, "c", sha1_after="0" * 40)).state
    # rev 1 rejected itself: nothing changes, the held event stays.
    d = advance(bad, insert_at_end("a", 1, "b", base_rev=5))
    assert d.outcome == "dlq" and not d.state_changed and set(d.state.held) == {2}
    # rev 1 applies, held rev 2 is rejected and dropped.
    d = advance(bad, insert_at_end("a", 1, "b"))
    assert d.state_changed and [a.rev for a in d.applied] == [1]
    assert [r.reason for r in d.rejected] == ["checksum_mismatch"] and d.state.held == {}
    assert (d.state.rev, d.state.text) == (1, "ab")


def test_dead_letters_carry_the_event_and_say_what_was_wrong():
    state = advance(None, snapshot(0, "abc")).state
    cases = [
        (insert_at_end("abc", 1, "d", len_after=99),
         "len_after says 99 code points, applying gives 4"),
        (insert_at_end("abc", 1, "d", sha1_after="0" * 40),
         f"sha1_after {'0' * 40} does not match the text after rev 1"),
        (insert_at_end("abc", 1, "d", base_rev=7), "base_rev 7 but the document is at rev 0"),
        (EditEvent("d1", 1, ops=[{"retain": 10}]),
         "op #0: retain 10 at position 0 runs past the end of the text (3 code points)"),
        (EditEvent("d1", 1, ops=[{"frobnicate": 1}]), "op #0: unknown op 'frobnicate'"),
    ]
    for event, message in cases:
        (rejection,) = advance(state, event).rejected
        assert rejection.message == message
        assert rejection.event == event.to_json()


def test_gap_overflow_dead_letter_names_the_missing_revision():
    state = advance(None, snapshot(0, "a")).state
    state = advance(state, insert_at_end("abc", 3, "x"), max_held=1).state
    late = insert_at_end("abcx", 4, "y")
    (rejection,) = advance(state, late, max_held=1).rejected
    assert rejection.reason == "gap_overflow"
    assert rejection.message == ("rev 4 arrived while rev 1 is missing and 1 events are already "
                                 "held; send a snapshot to resync")
    assert rejection.event == late.to_json()


def test_a_bad_held_event_is_dead_lettered_as_it_was_held():
    state = advance(None, snapshot(0, "a")).state
    bad = insert_at_end("ab", 2, "c", len_after=42)
    state = advance(state, bad).state
    (rejection,) = advance(state, insert_at_end("a", 1, "b")).rejected
    assert rejection.reason == "length_mismatch"
    assert rejection.message == "len_after says 42 code points, applying gives 3"
    assert rejection.event == bad.to_json()


def test_a_held_event_keeps_the_text_it_arrived_as_and_applies_from_it():
    state = advance(None, snapshot(0, "a")).state
    raw = ('{"schema": "doc-edit/v1", "doc_id": "d1", "rev": 2,\n'
           ' "ops": [{"retain": 2}, {"insert": "c"}], "len_after": 3}')
    d = advance(state, parse_edit_event(raw), raw=raw)
    assert d.outcome == "gap" and d.state.held == {2: raw}
    d = advance(d.state, insert_at_end("a", 1, "b"))
    assert [a.rev for a in d.applied] == [1, 2] and d.state.text == "abc" and not d.rejected


def test_a_bad_held_event_is_dead_lettered_as_it_arrived_not_as_the_incoming_event():
    state = advance(None, snapshot(0, "a")).state
    raw = '{"schema":"doc-edit/v1","doc_id":"d1","rev":2,"ops":[{"retain":9}]}'
    state = advance(state, parse_edit_event(raw), raw=raw).state
    (rejection,) = advance(state, insert_at_end("a", 1, "b")).rejected
    assert rejection.reason == "ops_past_end"
    assert rejection.event == raw and rejection.incoming is False
    # The event being advanced is the incoming one: the caller dead-letters its own bytes.
    (own,) = advance(state, insert_at_end("a", 1, "b", len_after=7)).rejected
    assert own.incoming is True
    (overflow,) = advance(state, insert_at_end("a", 3, "x"), max_held=1).rejected
    assert overflow.reason == "gap_overflow" and overflow.incoming is True


def test_a_document_awaiting_a_snapshot_dead_letters_edits_and_any_snapshot_restores_it():
    reset = awaiting_snapshot("d1")
    for rev in (0, 1, 7):
        d = advance(reset, insert_at_end("", rev, "x"))
        assert d.outcome == "dlq" and not d.state_changed and d.state == reset
        assert [r.reason for r in d.rejected] == ["awaiting_snapshot"]
        (rejection,) = d.rejected
        assert rejection.message == ("this document's stored state was unreadable and has been "
                                     "reset; it needs a snapshot before edits can apply")
        assert rejection.event == insert_at_end("", rev, "x").to_json()
    d = advance(reset, snapshot(5, "back"))
    assert d.outcome == "ok" and d.state.rev == 5 and d.state.text == "back"
    assert not d.state.needs_snapshot and not d.state.awaits_snapshot
    assert advance(d.state, insert_at_end("back", 6, "!")).state.text == "back!"
