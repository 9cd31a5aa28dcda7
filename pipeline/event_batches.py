"""How the agent handles a batch of events: in steps of one event per document, the events of a
step told as separate stories that meet once, at the classifier.

The agent takes what is pending (up to INCSTREAM_BATCH_MAX_EVENTS, waiting at most
INCSTREAM_BATCH_WAIT_S for more). `document_steps` cuts the batch into steps: step k holds each
document's k-th event of the batch, so a document's events are still handled one after the
other, each seeing the state its predecessor wrote. The events of one step belong to different
documents; each runs the story of one event (parse, look up, decide, classify, publish,
remember) concurrently with the others, and at "classify" they wait for each other at a
`Gathering`: once every event of the step has either asked for its classification or finished
without one, one call classifies all of them (pipeline.document_sessions.DocumentClassifier.
classify_batch: one batched engine step for the documents' incremental updates).

Each event is acknowledged on its own once its answer is published and its state written, so
a stop, a crash or a rebalance part way through a batch replays exactly the events not yet
handled (Faust commits an offset only once every offset before it in the partition is
acknowledged; after a rebalance it seeks back to the committed offsets).
"""

from __future__ import annotations

import asyncio
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import faust.streams

E = TypeVar("E")
Q = TypeVar("Q")  # a request
A = TypeVar("A")  # its answer


def document_steps(events: Sequence[E], document: Callable[[E], Hashable]) -> list[list[E]]:
    """The events in steps of at most one event per document, in arrival order: step k holds
    the k-th event of each document (a document's events stay in order, one step apart)."""
    steps: list[list[E]] = []
    seen: dict[Hashable, int] = {}
    for event in events:
        k = seen.get(document(event), 0)
        seen[document(event)] = k + 1
        if k == len(steps):
            steps.append([])
        steps[k].append(event)
    return steps


class Redeliveries:
    """Which events this process is handed again, at an offset it has handled before (around
    a restart's or rebalance's seek Faust can hand an event over twice): counted apart, so
    the metrics say how many distinct events were consumed.

    Judged when a batch is taken, in arrival order, against the offsets of earlier batches:
    the steps of a batch handle a partition's events by document, not in offset order, so a
    high-water mark moved event by event would call a later step's earlier offset seen. The
    events of a batch left unhandled at a rebalance (`left`) are not seen when they come
    again."""

    def __init__(self) -> None:
        self._up_to: dict[Any, int] = {}  # per partition: the highest offset taken
        self._left: dict[Any, set[int]] = defaultdict(set)  # taken, below it, not handled

    def judge(self, events: Sequence[faust.EventT]) -> list[bool]:
        """Per event of a newly taken batch: whether it was handled before."""
        again = []
        for event in events:
            tp, offset = event.message.tp, event.message.offset
            if offset in self._left[tp]:
                self._left[tp].discard(offset)
                again.append(False)
            else:
                again.append(offset <= self._up_to.get(tp, -1))
            self._up_to[tp] = max(offset, self._up_to.get(tp, -1))
        return again

    def left(self, events: Sequence[faust.EventT]) -> None:
        """Events of the batch that were not handled (they come again after the seek)."""
        for event in events:
            self._left[event.message.tp].add(event.message.offset)


def rebalanced_since(app: faust.App, event: faust.EventT) -> bool:
    """Whether a rebalance began, or happened, since `event` was fetched. Faust then seeks
    every partition the worker holds back to its committed offset, so the event comes again
    (here or to the partition's new owner); handling it now would write the table while the
    table recovers (a persisted changelog offset past the highwater stops the worker), and
    perhaps for a partition another worker holds. Faust skips such events the same way when it
    hands them out one at a time; a batch taken before the rebalance is checked step by step."""
    return (not app.flow_control.is_active()
            or event.message.generation_id != app.consumer_generation_id)


def act_for(event: faust.EventT) -> None:
    """Make `event` the current task's event. Faust tables pick the changelog partition of a
    write from the task's current event (faust.streams.current_event), which the agent's task
    does not have when it takes events in batches (faust-streaming #497): each event's story
    runs in a task of its own and says whose it is before it writes."""
    faust.streams._current_event.set(weakref.ref(event))


class Gathering(Generic[Q, A]):
    """`members` callers, each of which either asks (`Seat.ask`) or leaves without asking
    (`Seat.leave`); once none is undecided, one call `run(requests)` answers every request
    (its answers in the requests' order). An exception from `run` is raised to each asker."""

    def __init__(self, members: int, run: Callable[[list[Q]], Awaitable[list[A]]]) -> None:
        self._undecided = members
        self._asked: list[tuple[Q, asyncio.Future[A]]] = []
        self._run = run
        self._running: asyncio.Future[None] | None = None

    def seat(self) -> Seat[Q, A]:
        return Seat(self)

    def _decided(self) -> None:
        self._undecided -= 1
        if self._undecided == 0 and self._asked:
            self._running = asyncio.ensure_future(self._answer())

    async def _answer(self) -> None:
        asked = self._asked
        try:
            answers = await self._run([request for request, _ in asked])
        except BaseException as exc:  # noqa: BLE001 (handed to each asker)
            for _, future in asked:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), answer in zip(asked, answers, strict=True):
            if not future.done():  # an asker that was cancelled meanwhile
                future.set_result(answer)


class Seat(Generic[Q, A]):
    """One member's place at a Gathering: ask once, or leave (leaving after asking does
    nothing, so a story can always leave on its way out)."""

    def __init__(self, gathering: Gathering[Q, A]) -> None:
        self._gathering = gathering
        self._done = False

    async def ask(self, request: Q) -> A:
        if self._done:
            raise RuntimeError("one request per seat")
        self._done = True
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._gathering._asked.append((request, future))
        self._gathering._decided()
        return await future

    def leave(self) -> None:
        if not self._done:
            self._done = True
            self._gathering._decided()


def answer_each(classify: Callable[..., A]) -> Callable[[list[tuple[Any, ...]]], list[A]]:
    """classify_batch for a classifier that answers one document at a time (the dense peers):
    each request `(doc_id, previous_text, revisions)` in turn."""
    return lambda requests: [classify(*request) for request in requests]
