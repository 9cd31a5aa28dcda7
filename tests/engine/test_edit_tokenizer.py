"""Window re-tokenization equals tokenizing the whole new text (random and real edits)."""

from __future__ import annotations

from engine_streams import read_events, stream_docs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.edit_tokenizer import apply_text_change, token_count_delta, tokenize
from engine.text_ops import apply_ops

# Besides ASCII: accents (stripped by the normalizer), CJK (split per character), control
# characters (deleted: they glue neighbours), and Unicode spaces that are not our boundaries.
ALPHABET = st.sampled_from(
    list("ab cd\n\t.,:-_()'\"éÉüñ中文\x00\x07\r xyz0123 \u00a0\u2003\x0b\x0c\x1c\u0301")
    + ["``", "::", "##", "[SEP]", "[UNK]"])
TEXT = st.lists(ALPHABET, max_size=60).map("".join)


def _check(tokenizer, text: str, ops: list) -> None:
    old = tokenize(tokenizer, text)
    before = list(old.ids)
    new_text, change = apply_ops(text, ops)
    got, edit = apply_text_change(tokenizer, old, new_text, change)
    want = tokenize(tokenizer, new_text)
    assert got.ids == want.ids
    assert got.starts == want.starts and got.ends == want.ends
    # The token edit is consistent with the splice it describes.
    spliced = before[: edit.start] + list(edit.inserted) + before[edit.start + edit.deleted :]
    assert spliced == got.ids


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
