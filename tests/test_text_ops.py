"""Applying doc-edit/v1 character ops to text."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from incstream.engine.incremental.text_ops import InvalidOps, TextChange, apply_ops, sha1_hex


def test_replace_in_the_middle():
    text, change = apply_ops("hello world", [{"retain": 6}, {"delete": 5}, {"insert": "there"}])
    assert text == "hello there"
    assert change == TextChange(start=6, deleted=5, inserted=5)


def test_insert_at_start_and_implicit_retain_of_the_rest():
    text, change = apply_ops("world", [{"insert": "hello "}])
    assert text == "hello world"
    assert change == TextChange(start=0, deleted=0, inserted=6)


def test_delete_at_end():
    text, change = apply_ops("abcdef", [{"retain": 4}, {"delete": 2}])
    assert text == "abcd"
    assert change == TextChange(start=4, deleted=2, inserted=0)


def test_several_ops_collapse_into_their_enclosing_span():
    text, change = apply_ops("hello world", [{"retain": 2}, {"delete": 1}, {"retain": 3},
                                              {"insert": "X"}])
    assert text == "helo Xworld"
    old, new = "hello world", text
    assert old[: change.start] + new[change.start : change.start + change.inserted] + \
        old[change.start + change.deleted :] == new


def test_code_points_not_bytes():
    text, _ = apply_ops("naïve 😀 text", [{"retain": 6}, {"delete": 1}, {"insert": "🙂"}])
    assert text == "naïve 🙂 text"


def test_empty_ops_is_a_noop():
    text, change = apply_ops("abc", [])
    assert text == "abc" and change.is_noop


@pytest.mark.parametrize(
    "ops, reason",
    [
        ([{"retain": 4}], "ops_past_end"),
        ([{"retain": 2}, {"delete": 2}], "ops_past_end"),
        ([{"delete": -1}], "invalid_ops"),
        ([{"retain": 1.5}], "invalid_ops"),
        ([{"bogus": 1}], "invalid_ops"),
        ([{"retain": 1, "delete": 1}], "invalid_ops"),
        ([{"insert": 5}], "invalid_ops"),
        ("retain", "invalid_ops"),
    ],
)
def test_bad_ops_are_refused_with_a_reason(ops, reason):
    with pytest.raises(InvalidOps) as info:
        apply_ops("abc", ops)
    assert info.value.reason == reason


def test_sha1_is_of_utf8():
    assert sha1_hex("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709"
    import hashlib

    assert sha1_hex("é") == hashlib.sha1("é".encode()).hexdigest()


@st.composite
def text_and_ops(draw):
    text = draw(st.text(max_size=40))
    ops, cursor, expected = [], 0, []
    while cursor < len(text) and draw(st.booleans()):
        kind = draw(st.sampled_from(["retain", "delete", "insert"]))
        if kind == "insert":
            piece = draw(st.text(min_size=1, max_size=5))
            ops.append({"insert": piece})
            expected.append(piece)
            continue
        n = draw(st.integers(min_value=1, max_value=len(text) - cursor))
        ops.append({kind: n})
        if kind == "retain":
            expected.append(text[cursor : cursor + n])
        cursor += n
    expected.append(text[cursor:])
    return text, ops, "".join(expected)


@given(text_and_ops())
def test_matches_a_straightforward_reference_and_the_span_is_right(case):
    old, ops, expected = case
    new, change = apply_ops(old, ops)
    assert new == expected
    # The span: everything outside it is untouched.
    assert new[: change.start] == old[: change.start]
    assert new[change.start + change.inserted :] == old[change.start + change.deleted :]


# ------------------------------------------------------ edges found by mutation testing
# (./dev mutate engine/incremental/text_ops.py; see benchmarks/mutation-engine-text_ops.json)


def test_zero_counts_are_valid_noops():
    assert apply_ops("abc", [{"retain": 0}, {"delete": 0}, {"insert": ""}]) == (
        "abc", TextChange(start=3, deleted=0, inserted=0))
    text, change = apply_ops("abc", [{"retain": 1}, {"delete": 0}, {"insert": "X"}])
    assert (text, change) == ("aXbc", TextChange(start=1, deleted=0, inserted=1))


def test_an_empty_insert_does_not_end_the_op_list():
    text, change = apply_ops("abcd", [{"insert": ""}, {"retain": 1}, {"insert": ""},
                                      {"delete": 2}])
    assert (text, change) == ("ad", TextChange(start=1, deleted=2, inserted=0))


def test_a_delete_then_insert_elsewhere_spans_both():
    text, change = apply_ops("abcdef", [{"delete": 1}, {"retain": 3}, {"insert": "XY"}])
    assert text == "bcdXYef"
    assert change == TextChange(start=0, deleted=4, inserted=5)


@pytest.mark.parametrize("ops", [None, 5, {"retain": 1}, b"retain", "retain"])
def test_ops_that_are_not_a_list_are_refused(ops):
    with pytest.raises(InvalidOps) as info:
        apply_ops("abc", ops)
    assert info.value.reason == "invalid_ops"
    assert str(info.value) == "ops must be a list"


@pytest.mark.parametrize(
    "ops, message",
    [
        ([{"retain": 1}, "x"], "op #1 must be an object with exactly one key: 'x'"),
        ([{"retain": 1, "delete": 1}],
         "op #0 must be an object with exactly one key: {'retain': 1, 'delete': 1}"),
        ([{"insert": 5}], "op #0: insert takes a string"),
        ([{"retain": 1}, {"bogus": 1}], "op #1: unknown op 'bogus'"),
        ([{"delete": -1}], "op #0: delete takes a non-negative integer, got -1"),
        ([{"retain": True}], "op #0: retain takes a non-negative integer, got True"),
        ([{"retain": 2}, {"delete": 2}],
         "op #1: delete 2 at position 2 runs past the end of the text (3 code points)"),
    ],
)
def test_refusals_say_which_op_and_why(ops, message):
    with pytest.raises(InvalidOps) as info:
        apply_ops("abc", ops)
    assert str(info.value) == message
    assert info.value.args == (message,)


def test_invalid_ops_default_reason():
    assert InvalidOps("x").reason == "invalid_ops" and str(InvalidOps("x")) == "x"
