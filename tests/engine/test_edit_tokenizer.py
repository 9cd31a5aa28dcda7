"""Window re-tokenization equals tokenizing the whole new text (random and real edits)."""

from __future__ import annotations

import logging

import pytest
from engine_streams import read_events, stream_docs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incstream.engine.incremental.edit_tokenizer import (
    BOUNDARY,
    TokenizedText,
    apply_text_change,
    token_count_delta,
    tokenize,
)
from incstream.engine.incremental.text_ops import TextChange, apply_ops

# Besides ASCII: accents (stripped by the normalizer), CJK (split per character), control
# characters (deleted: they glue neighbours), and Unicode spaces that are not our boundaries.
ALPHABET = st.sampled_from(
    list("ab cd\n\t.,:-_()'\"éÉüñ中文\x00\x07\r xyz0123 \u00a0\u2003\x0b\x0c\x1c\u0301")
    + ["``", "::", "##", "[SEP]", "[UNK]"])
TEXT = st.lists(ALPHABET, max_size=60).map("".join)


class Recording:
    """The tokenizer, recording every text it is asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, *args, **kwargs)


def expected_window(text: str, starts: list[int], ends: list[int], change: TextChange,
                    new_text: str) -> str:
    """The text the module docstring says is re-tokenized, by plain scans: the changed span plus
    one old token on each side, widened to boundary characters, as it reads after the edit."""
    a, b = change.start, change.start + change.deleted
    after_a = next((k for k, e in enumerate(ends) if e > a), len(ends))
    left = min(a, starts[after_a - 1] if after_a > 0 else 0)
    from_b = next((k for k, s in enumerate(starts) if s >= b), None)
    right = max(b, ends[from_b] if from_b is not None else len(text))
    while left > 0 and text[left - 1] not in BOUNDARY:
        left -= 1
    while right < len(text) and text[right] not in BOUNDARY:
        right += 1
    return new_text[left : right + change.inserted - change.deleted]


def _check(tokenizer, text: str, ops: list) -> None:
    old = tokenize(tokenizer, text)
    before, starts, ends = list(old.ids), list(old.starts), list(old.ends)
    new_text, change = apply_ops(text, ops)
    recording = Recording(tokenizer)
    got, edit = apply_text_change(recording, old, new_text, change)
    want = tokenize(tokenizer, new_text)
    assert got.ids == want.ids
    assert got.starts == want.starts and got.ends == want.ends
    # character offsets stay integers (they slice text), also after starting from no tokens
    assert all(type(x) is int for x in got.starts + got.ends)
    assert got.text == new_text
    # Only the window around the change was tokenized (nothing at all for a no-op).
    windows = [] if change.is_noop else [expected_window(text, starts, ends, change, new_text)]
    assert recording.texts == windows
    # The token edit is consistent with the splice it describes ...
    assert edit.start >= 0 and edit.start + edit.deleted <= len(before)
    spliced = before[: edit.start] + list(edit.inserted) + before[edit.start + edit.deleted :]
    assert spliced == got.ids
    # ... and minimal: nothing to trim at either end, and a no-op only if no id changed.
    assert edit.is_noop == (before == got.ids)
    if edit.deleted and edit.inserted:
        assert before[edit.start] != edit.inserted[0]
        assert before[edit.start + edit.deleted - 1] != edit.inserted[-1]


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data())
def test_random_edits(tokenizer, text, data):
    start = data.draw(st.integers(0, len(text)))
    deleted = data.draw(st.integers(0, len(text) - start))
    inserted = data.draw(TEXT)
    ops = [{"retain": start}, {"delete": deleted}, {"insert": inserted}]
    _check(tokenizer, text, ops)


def test_real_edits_from_both_streams(tokenizer):
    checked = 0
    for name, docs, cap in (("peps-hunks.jsonl.gz", 3, 120), ("peps-typing.jsonl.gz", 2, 400)):
        for _, snapshot, events in stream_docs(name, docs):
            text = snapshot
            for event in events[:cap]:
                if "snapshot" in event:
                    text = event["snapshot"]
                    continue
                _check(tokenizer, text, event["ops"])
                text = apply_ops(text, event["ops"])[0]
                checked += 1
    assert checked > 500


def test_edit_at_edges_and_empty(tokenizer):
    _check(tokenizer, "", [{"insert": "hello world"}])
    _check(tokenizer, "hello world", [{"delete": 11}])
    _check(tokenizer, "hello world", [{"insert": "x"}])
    _check(tokenizer, "hello world", [{"retain": 11}, {"insert": "ly"}])
    _check(tokenizer, "hello world", [{"retain": 5}, {"delete": 1}])  # words merge
    assert read_events("peps-hunks.jsonl.gz", 1)[0]["rev"] == 0


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_token_count_delta_matches_whole_text_counts(tokenizer, data):
    tok = tokenizer
    old = data.draw(st.text(alphabet="ab cé,.\n\t-😀x", max_size=60))
    start = data.draw(st.integers(0, len(old)))
    deleted = data.draw(st.integers(0, len(old) - start))
    inserted = data.draw(st.text(alphabet="ab cé,.\n\t-😀x", max_size=12))
    new, change = apply_ops(old, [{"retain": start}, {"delete": deleted}, {"insert": inserted}])

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    assert count(old) + token_count_delta(tok, old, new, change) == count(new)


def test_an_empty_text_grows_integer_offsets(tokenizer):
    _check(tokenizer, "", [{"insert": "hello, world"}])
    got, _ = apply_text_change(tokenizer, TokenizedText(""), "hi there", TextChange(0, 0, 8))
    assert (got.ids, got.starts, got.ends) == (tokenize(tokenizer, "hi there").ids, [0, 3], [2, 8])
    assert all(type(x) is int for x in got.starts + got.ends)


def test_no_op_change_keeps_tokens_and_text(tokenizer):
    _check(tokenizer, "hello world", [])
    _check(tokenizer, "hello world", [{"retain": 3}, {"delete": 0}, {"insert": ""}])
    old = tokenize(tokenizer, "hello world")
    got, edit = apply_text_change(tokenizer, old, "hello world", TextChange(11, 0, 0))
    assert edit.is_noop and (edit.start, edit.deleted, edit.inserted) == (len(old.ids), 0, ())
    assert got.text == "hello world"


@pytest.mark.parametrize(
    ("text", "ops"),
    [
        # the right edge of the window scans an odd number of characters to the boundary
        ("alpha beta gamma delta, epsilon", [{"retain": 11}, {"delete": 5}, {"insert": "x"}]),
        ("alpha beta gamma delta,, epsilon", [{"retain": 11}, {"delete": 5}, {"insert": "x"}]),
        # changes touching a token's end, its start, and the first token
        ("alpha beta gamma", [{"retain": 10}, {"insert": "s"}]),
        ("alpha beta gamma", [{"retain": 6}, {"insert": "x"}]),
        ("alpha beta gamma", [{"insert": "x"}]),
        ("alpha-beta gamma", [{"retain": 1}, {"delete": 1}]),
        ("(alpha) beta", [{"retain": 1}, {"delete": 5}, {"insert": "omega"}]),
        # the same word repeated: trimming must compare the right ends
        ("la la la la", [{"retain": 3}, {"delete": 2}, {"insert": "lo"}]),
        ("ab ab ab", [{"retain": 3}, {"insert": "ab ab "}]),
    ],
)
def test_window_and_edit_on_chosen_cases(tokenizer, text, ops):
    _check(tokenizer, text, ops)


def test_token_count_delta_tokenizes_only_the_window(tokenizer):
    old = "one two three four five"
    new, change = apply_ops(old, [{"retain": 8}, {"delete": 5}, {"insert": "THREE 3"}])
    recording = Recording(tokenizer)
    assert token_count_delta(recording, old, new, change) == 1
    assert recording.texts == ["THREE 3", "three"]
    assert token_count_delta(recording, old, old, TextChange(23, 0, 0)) == 0
    assert len(recording.texts) == 2


def test_long_documents_tokenize_without_a_length_warning(tokenizer):
    """The worker tokenizes documents far past the model's 512 positions (they are chunked);
    transformers would warn about every such text unless asked not to."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    key = "sequence-length-is-longer-than-the-specified-maximum"
    warned = tokenizer.deprecation_warnings.pop(key, None)
    try:
        long_text = "word " * 2000
        assert len(tokenize(tokenizer, long_text).ids) == 2000
        old = tokenize(tokenizer, long_text)
        apply_text_change(tokenizer, old, long_text + "x", TextChange(len(long_text), 0, 1))
        assert not records and key not in tokenizer.deprecation_warnings
    finally:
        logger.removeHandler(handler)
        if warned is not None:
            tokenizer.deprecation_warnings[key] = warned


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_the_backend_shortcut_tokenizes_as_the_wrapper(tokenizer, text):
    """tokenize() calls the fast tokenizer's Rust backend directly; the transformers wrapper
    (what Recording, having no backend, goes through) gives the same ids and offsets."""
    via_backend = tokenize(tokenizer, text, offset=3)
    via_wrapper = tokenize(Recording(tokenizer), text, offset=3)
    assert via_backend.ids == via_wrapper.ids
    assert via_backend.starts == via_wrapper.starts and via_backend.ends == via_wrapper.ends


def test_a_backend_left_truncating_is_not_used(tokenizer):
    """A backend someone left truncating (a call with truncation=True does) would cut the
    text: tokenize() then goes through the wrapper, which turns truncation off."""
    text = "word " * 40
    full = tokenize(tokenizer, text).ids
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    try:
        assert tokenize(tokenizer, text).ids == full
    finally:
        tokenizer.backend_tokenizer.no_truncation()
