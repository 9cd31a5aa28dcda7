"""StateTotals: the table's documents, bytes and held events, counted once and kept by writes."""

from __future__ import annotations

from prometheus_client import generate_latest

from incstream.pipeline.metrics import WorkerMetrics
from incstream.pipeline.state_totals import StateTotals
from incstream.state.document import DocumentState, encode_state


def gauges(metrics: WorkerMetrics) -> tuple[float, float, float]:
    registry = metrics.registry
    return (registry.get_sample_value("incstream_documents"),
            registry.get_sample_value("incstream_state_bytes"),
            registry.get_sample_value("incstream_held_events"))


def state(doc: str, rev: int, held: int = 0) -> bytes:
    return encode_state(DocumentState(doc_id=doc, rev=rev, text=f"text of {doc} at {rev}",
                                      held={rev + 2 + i: "{}" for i in range(held)}))


def test_recount_then_writes_match_a_recount_of_the_final_table():
    table = {b"a": state("a", 0), b"b": state("b", 3, held=2), b"bad": b"not a state",
             b"gone": None}
    metrics = WorkerMetrics()
    totals = StateTotals(metrics)
    totals.recount(table.items())
    assert gauges(metrics) == (3, sum(len(v) for v in table.values() if v), 2)

    # The gap of b fills (its held events go), a grows, c is new and holds one event.
    for key, value, held in [(b"b", state("b", 6), 0), (b"a", state("a", 1, held=1), 1),
                             (b"c", state("c", 0, held=1), 1), (b"a", state("a", 2), 0)]:
        totals.written(key, table.get(key), value, held)
        table[key] = value
    assert gauges(metrics) == (4, sum(len(v) for v in table.values() if v), 1)

    again = WorkerMetrics()
    StateTotals(again).recount(table.items())
    assert gauges(again) == gauges(metrics)


def test_a_restart_that_recounts_never_reads_negative_held_events():
    """The gauge once went to -1: a restart started it at 0, then a gap filled (-1)."""
    table = {b"d": state("d", 0, held=1)}
    metrics = WorkerMetrics()
    totals = StateTotals(metrics)
    totals.recount(table.items())
    assert gauges(metrics)[2] == 1
    totals.written(b"d", table[b"d"], state("d", 2), 0)
    assert gauges(metrics)[2] == 0
    # Written again with nothing held: still 0, never below.
    totals.written(b"d", state("d", 2), state("d", 3), 0)
    assert gauges(metrics)[2] == 0
    assert b"incstream_held_events 0.0" in generate_latest(metrics.registry)
