"""pipeline.event_batches: steps of one event per document, and the Gathering where a step's
events meet at the classifier."""

from __future__ import annotations

import asyncio

import faust.streams
import pytest

from incstream.pipeline.event_batches import (
    Gathering,
    Redeliveries,
    act_for,
    answer_each,
    document_steps,
    rebalanced_since,
)


def test_steps_hold_one_event_per_document_and_keep_each_documents_order():
    events = [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3), ("b", 2), (None, 1), (None, 2)]
    steps = document_steps(events, document=lambda e: e[0])
    assert steps == [[("a", 1), ("b", 1), ("c", 1), (None, 1)],
                     [("a", 2), ("b", 2), (None, 2)],
                     [("a", 3)]]
    for step in steps:
        assert len({doc for doc, _ in step}) == len(step)
    assert document_steps([], document=lambda e: e) == []


def test_one_call_answers_every_member_that_asked_once_all_have_decided():
    calls: list[list[str]] = []

    async def run(requests: list[str]) -> list[str]:
        calls.append(list(requests))
        return [r.upper() for r in requests]

    async def main() -> list[str | None]:
        gathering: Gathering[str, str] = Gathering(4, run)

        async def member(i: int, seat) -> str | None:
            try:
                await asyncio.sleep(0.01 * i)  # they arrive at different times
                if i == 2:
                    return None  # finishes without asking (a duplicate, a dead letter)
                if i == 3:
                    raise ValueError("a bad event")
                return await seat.ask(f"doc{i}")
            finally:
                seat.leave()

        return await asyncio.gather(*(member(i, gathering.seat()) for i in range(4)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert results[:3] == ["DOC0", "DOC1", None]
    assert isinstance(results[3], ValueError)
    assert calls == [["doc0", "doc1"]]  # one call, after the last member decided


def test_an_exception_of_the_call_reaches_every_asker_and_nobody_asking_calls_nothing():
    class Stopping(Exception):
        pass

    async def run(requests: list[int]) -> list[int]:
        raise Stopping

    async def main() -> None:
        gathering: Gathering[int, int] = Gathering(2, run)
        seats = [gathering.seat(), gathering.seat()]
        results = await asyncio.gather(*(s.ask(i) for i, s in enumerate(seats)),
                                       return_exceptions=True)
        assert all(isinstance(r, Stopping) for r in results)
        with pytest.raises(RuntimeError):
            await seats[0].ask(5)  # one request per seat

        idle: Gathering[int, int] = Gathering(2, run)
        for seat in (idle.seat(), idle.seat()):
            seat.leave()
            seat.leave()  # leaving twice counts once
        await asyncio.sleep(0)
        assert idle._running is None

    asyncio.run(main())


def test_act_for_makes_the_event_current_in_its_own_task_only():
    """Faust's tables find the changelog partition through faust.streams.current_event()."""
    class Event:  # what the table needs of it here is its identity
        pass

    event = Event()

    async def main() -> None:
        async def story() -> object:
            act_for(event)  # type: ignore[arg-type]
            return faust.streams.current_event()

        assert await asyncio.create_task(story()) is event
        assert faust.streams.current_event() is None  # the caller's context is untouched

    asyncio.run(main())


def test_answer_each_classifies_one_document_at_a_time():
    seen = []

    def classify(doc_id: str, previous: str | None, revisions: list[int]) -> list[int]:
        seen.append(doc_id)
        return [r * 10 for r in revisions]

    assert answer_each(classify)([("a", None, [1, 2]), ("b", "x", [3])]) == [[10, 20], [30]]
    assert seen == ["a", "b"]


def test_an_event_fetched_before_a_rebalance_is_left_for_the_seek_after_it():
    class FlowControl:
        active = True

        def is_active(self) -> bool:
            return self.active

    class App:
        flow_control = FlowControl()
        consumer_generation_id = 3

    class Message:
        generation_id = 3

    class Event:
        message = Message()

    app, event = App(), Event()
    assert not rebalanced_since(app, event)  # type: ignore[arg-type]
    app.flow_control.active = False  # a rebalance is under way
    assert rebalanced_since(app, event)  # type: ignore[arg-type]
    app.flow_control.active, app.consumer_generation_id = True, 4  # one happened
    assert rebalanced_since(app, event)  # type: ignore[arg-type]


def test_redeliveries_are_judged_by_batch_not_by_the_order_steps_handle_them():
    class Message:
        def __init__(self, tp: str, offset: int) -> None:
            self.tp, self.offset = tp, offset

    class Event:
        def __init__(self, tp: str, offset: int) -> None:
            self.message = Message(tp, offset)

    seen = Redeliveries()
    # Doc A at offsets 5, 7, 8 and doc B at 6, 20 of one partition: the steps handle 5, 6,
    # then 7, 20, then 8; nothing of this first batch was handled before.
    first = [Event("p0", o) for o in (5, 6, 7, 8, 20)] + [Event("p1", 3)]
    assert seen.judge(first) == [False] * 6
    # A rebalance left 8 and 20 unhandled; after the seek they come with the uncommitted 6, 7.
    seen.left([first[3], first[4]])
    again = [Event("p0", o) for o in (6, 7, 8, 20, 21)] + [Event("p1", 3), Event("p1", 4)]
    assert seen.judge(again) == [True, True, False, False, False, True, False]
    # 8 and 20 were handled this time: a third delivery is seen again.
    assert seen.judge([Event("p0", 8), Event("p0", 20)]) == [True, True]
