"""The Faust app: one agent that reads doc-edit/v1 events and keeps every document current.

The agent takes what is pending (up to INCSTREAM_BATCH_MAX_EVENTS) and handles it in steps of
one event per document (pipeline.event_batches), a document's events one step apart. The story
of one event, as `handle_event` tells it (the events of a step run it side by side):
  1. parse and validate it (anything malformed -> dead-letter topic, with the reason);
  2. look the document up in the RocksDB-backed table;
  3. let the revision rules decide (state.ordering): apply, hold, drop duplicate, reject;
  3b. classify each applied revision (pipeline.document_sessions: a cached session updated
     incrementally, or one built fresh from the text), on one inference thread so the event
     loop keeps heartbeating while torch works; the step's events ask together, and their
     documents' incremental updates go through one batched engine step;
  4. publish one doc-class/v1 update per applied revision and wait until Kafka has it;
  5. only then write the new state to the table (so a crash can replay, never lose, an update);
  6. acknowledge the event once Kafka also has the changelog records of its table writes
     (pipeline.durable_writes).
Faust commits offsets up to the first event not yet acknowledged: delivery is at-least-once,
replays are recognised as duplicates by (doc_id, rev), and a committed offset never runs ahead
of the state its event wrote.

Three fault-injection hooks exist for the integration tests only (never set them in production),
each "<doc_id>:<rev>":
  INCSTREAM_TEST_CRASH_AFTER_PUBLISH  the process SIGKILLs itself right after that revision's
                                      update was acknowledged by Kafka, before the table write;
  INCSTREAM_TEST_FAIL_BEFORE_PUBLISH  handling that event raises once, after classification and
                                      before anything is published (-> internal_error);
  INCSTREAM_TEST_STALL_AT             the agent never finishes that event (a stuck agent: the
                                      event loop, /metrics and the consumer go on).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faust

from incstream.engine.incremental.edit_tokenizer import token_count_delta
from incstream.engine.incremental.text_ops import sha1_hex
from incstream.engine.model.base_model import load_tokenizer
from incstream.pipeline.broker_watch import EXIT_BROKER_LOST, BrokerWatch, probe_broker
from incstream.pipeline.consumer_lag import ConsumerLagProbe
from incstream.pipeline.document_sessions import (
    BuildCancelled,
    DocumentClassifier,
    DocumentTooLarge,
    Inference,
)
from incstream.pipeline.durable_writes import ChangelogWrites
from incstream.pipeline.event_batches import (
    Gathering,
    Redeliveries,
    Seat,
    act_for,
    answer_each,
    document_steps,
    rebalanced_since,
)
from incstream.pipeline.metrics import NEAR_BUDGET, WorkerMetrics
from incstream.pipeline.peer_classifiers import classifier_type
from incstream.pipeline.records import dead_letter_key, dead_letter_record, to_bytes, update_record
from incstream.pipeline.settings import Settings
from incstream.pipeline.state_totals import StateTotals
from incstream.pipeline.store_check import is_corruption, mark_damaged, move_aside_damaged
from incstream.pipeline.web_surface import (
    BUILTIN_ROUTES_OFF,
    WEB_DRIVER_URL,
    AgentProgress,
    add_routes,
)
from incstream.state.document import (
    DocumentState,
    StateCodecError,
    StateTooLarge,
    awaiting_snapshot,
    decode_state,
    encode_state,
)
from incstream.state.edit_event import EditEvent, EventRejected, parse_edit_event
from incstream.state.ordering import AppliedRevision, advance

log = logging.getLogger("incstream.worker")

# Exit status of a worker that met a corruption in its local table store; the marker it
# leaves makes its restart move that store aside and rebuild it from the changelog.
EXIT_STORE_DAMAGED = 75


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _fault_point(variable: str) -> tuple[str, int] | None:
    """The (doc_id, rev) a test hook names in the environment, or None."""
    spec = os.environ.get(variable, "").strip()
    if not spec:
        return None
    doc_id, _, rev = spec.rpartition(":")
    if not doc_id or not rev.isdigit():
        raise ValueError(f"{variable} must be <doc_id>:<rev>, got {spec!r}")
    log.warning("test fault injection armed: %s=%s", variable, spec)
    return doc_id, int(rev)


class StateUnreadable(Exception):
    """The event met a stored state that could not be read; it has been dead-lettered."""


def _as_text(raw: bytes) -> str | None:
    """The event as it arrived, as text (None if it is not UTF-8)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build_app(settings: Settings, metrics: WorkerMetrics | None = None,
              classifier: DocumentClassifier | None = None) -> faust.App:
    """The worker's Faust app. With `settings.model_enabled` it loads the model bundle (unless
    a `classifier` is given) and classifies every applied revision."""
    metrics = metrics or WorkerMetrics()
    if classifier is None and settings.model_enabled:
        kind = classifier_type(settings.classifier)
        options: dict[str, Any] = {"threads": settings.torch_threads, "mode": settings.engine}
        if kind is DocumentClassifier:  # the dense peers hold a few bytes a chunk
            options.update(max_document_tokens=settings.max_document_tokens,
                           memory_budget=settings.memory_budget_bytes,
                           memory_reserve=settings.memory_reserve_bytes)
        classifier = kind.load(settings.model, settings.session_cache_bytes, metrics,
                               **options)
    # One inference thread: sessions and the cache are touched only there, and torch work
    # never blocks the event loop (heartbeats, commits, /metrics go on during a long build).
    inference = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="incstream-inference",
        initializer=_set_torch_threads, initargs=(settings.torch_threads,),
    ) if classifier is not None else None
    app = faust.App(
        settings.app_id,
        broker=settings.faust_broker,
        store="rocksdb://",
        datadir=str(settings.data_dir),
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web=WEB_DRIVER_URL,  # /metrics, /live, /ready only (pipeline.web_surface)
        **BUILTIN_ROUTES_OFF,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        consumer_auto_offset_reset="earliest",
        # On stop, do not wait for the event in progress (a long build would outlast the
        # 30 s grace period): it is not acknowledged, so it is handled again after the
        # restart (at-least-once; its update may then be published twice, same content).
        stream_wait_empty=False,
        producer_acks=-1,
        producer_max_batch_size=settings.producer_max_batch_bytes,
        autodiscover=False,
    )
    edits = app.topic(
        settings.edits_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    classes = app.topic(settings.classes_topic, key_serializer="raw", value_serializer="raw")
    dead_letters = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw")
    def raw_table(name: str) -> Any:
        # Raw bytes: the codecs in state/ own them (key_type/value_type bytes is how Faust
        # tables select the "raw" serializer).
        return app.Table(name, default=None, key_type=bytes, value_type=bytes,
                         partitions=settings.partitions)

    # doc_id (bytes) -> encoded DocumentState (state.document).
    documents = raw_table(settings.table_name)
    # Fast mode: per-chunk activation records (state.chunk_record_store), keyed by document
    # and chunk content, written in the document's partition next to its state.
    activations = raw_table(settings.activations_table)
    # An event is acknowledged once its tables' changelog records are in Kafka
    # (pipeline.durable_writes): a committed offset never runs ahead of the state it made.
    changelog_writes = ChangelogWrites()
    changelog_writes.track(documents)
    changelog_writes.track(activations)
    keeps_records = classifier is not None and hasattr(classifier, "keep_records") \
        and classifier.keep_records(activations)
    if settings.verify_store_at_start:
        # Before Faust opens a store (it does on partition assignment); logged there.
        for _ in move_aside_damaged(Path(app.conf.tabledir), settings.table_name):
            metrics.store_rebuilds.inc()
    tokenizer = load_tokenizer()
    crash_after_publish = _fault_point("INCSTREAM_TEST_CRASH_AFTER_PUBLISH")
    fail_before_publish = _fault_point("INCSTREAM_TEST_FAIL_BEFORE_PUBLISH")
    stall_at = _fault_point("INCSTREAM_TEST_STALL_AT")
    totals = StateTotals(metrics)
    progress = AgentProgress(settings.liveness_stall_s)
    metrics.state_record_budget_bytes.set(settings.max_state_bytes)
    faults_fired: set[str] = set()

    def token_counts(state: DocumentState | None, applied: list[AppliedRevision]) -> list[int]:
        """Token count after each applied revision: from a window around each edit when the
        count before it is known, from the whole text otherwise (snapshots, old states)."""
        count = state.tokens if state is not None else 0
        text = state.text if state is not None else ""
        counts = []
        for revision in applied:
            if revision.is_snapshot or count is None:
                count = len(tokenizer(revision.text, add_special_tokens=False)["input_ids"])
            else:
                count += token_count_delta(tokenizer, text, revision.text, revision.change)
            counts.append(count)
            text = revision.text
        return counts

    async def publish(topic: faust.TopicT, key: bytes | None, record: dict[str, Any]) -> None:
        """Send and wait for Kafka's acknowledgement (acks=all)."""
        delivery = await topic.send(key=key, value=to_bytes(record))
        await delivery

    async def publish_dead_letter(
        key: bytes | None, reason: str, message: str, event: bytes | str | dict | None
    ) -> None:
        """`event` is what arrived (the message's bytes), or a held event as it was stored.
        Counted whether or not the dead letter can be published; never raises."""
        log.warning("dead letter (%s): %s", reason, message[:500])
        metrics.dead_letters.labels(reason).inc()
        try:
            await publish(dead_letters, dead_letter_key(key),
                          dead_letter_record(reason, message, event))
        except Exception:
            metrics.dead_letter_failures.inc()
            log.exception("could not publish the %s dead letter of key %r", reason,
                          dead_letter_key(key))

    async def reject_too_large(key: bytes | None, size: int, event: bytes) -> None:
        await publish_dead_letter(
            key, "state_too_large",
            f"the document state would be {size} bytes, over the "
            f"{settings.max_state_bytes}-byte changelog limit; not applied", event)
        metrics.events.labels("dlq").inc()

    def encode_or_size(state: DocumentState) -> bytes | int:
        """The state's record, or its size when it cannot be written (over max_state_bytes,
        or inflating past what a reader would accept)."""
        try:
            encoded = encode_state(state)
        except StateTooLarge as exc:
            return exc.size
        return encoded if len(encoded) <= settings.max_state_bytes else len(encoded)

    def store_damaged(exc: Exception, partition: int) -> None:
        """RocksDB says the local store is corrupt: leave a marker and exit, so the restart
        moves the store aside and rebuilds it from the changelog (the event, uncommitted,
        is handled again then)."""
        store = Path(documents.data.partition_path(partition))  # type: ignore[attr-defined]
        mark_damaged(store, str(exc))
        log.critical("table store %s is corrupt (%s); exiting so that it is rebuilt from the "
                     "changelog at restart", store, exc)
        logging.shutdown()
        os._exit(EXIT_STORE_DAMAGED)

    async def read_state(key: bytes, edit: EditEvent, message: faust.EventT
                         ) -> DocumentState | None:
        """The document's stored state (None: a new document). A state that cannot be read
        is reset to await a snapshot: a snapshot resyncs it right away; any other event gets
        one state_unreadable dead letter and the reset state is written (StateUnreadable)."""
        try:
            stored: bytes | None = documents.get(key)
        except Exception as exc:
            if is_corruption(exc):
                store_damaged(exc, message.message.partition)
            raise
        if stored is None:
            return None
        try:
            return decode_state(stored)
        except StateCodecError as exc:
            metrics.unreadable_states.inc()
            if edit.is_snapshot:
                log.warning("state of %r was unreadable (%s); rev %s's snapshot replaces it",
                            edit.doc_id, exc, edit.rev)
                return awaiting_snapshot(edit.doc_id)
            await publish_dead_letter(
                key, "state_unreadable",
                f"{exc}; the document is reset and waits for a snapshot to resync it",
                message.value)
            write_state(key, encode_state(awaiting_snapshot(edit.doc_id)),
                        message.message.partition)
            raise StateUnreadable from None

    def write_state(key: bytes, encoded: bytes, partition: int, held: int = 0) -> None:
        """Store a document's state (`held`: the events it holds) and count it."""
        try:
            previous: bytes | None = documents.get(key)
            documents[key] = encoded
        except Exception as exc:
            if is_corruption(exc):
                store_damaged(exc, partition)
            raise
        totals.written(key, previous, encoded, held)
        metrics.state_record_bytes.observe(len(encoded))
        if len(encoded) > NEAR_BUDGET * settings.max_state_bytes:
            metrics.state_records_near_budget.inc()

    # Events handed over again around a restart's seek are counted apart (event_batches).
    redeliveries = Redeliveries()

    classify_batch = getattr(classifier, "classify_batch", None) or (
        answer_each(classifier.classify) if classifier is not None else None)

    async def classify_documents(requests: list[tuple[str, str | None, list[AppliedRevision]]],
                                 ) -> list[list[Inference | DocumentTooLarge]]:
        """The classifications a step's events asked for, in one call on the inference thread."""
        return await asyncio.get_running_loop().run_in_executor(inference, classify_batch,
                                                                requests)

    batch_events = settings.batch_events(classifier)
    why = ("INCSTREAM_BATCH_MAX_EVENTS" if settings.batch_max_events is not None
           else "batched steps answer each document as alone" if batch_events > 1
           else "a batched step's rounding could depend on its company")
    log.info("the agent takes up to %d event(s) at once (%s)", batch_events, why)

    @app.agent(edits)
    async def apply_edits(stream: faust.StreamT) -> None:
        # What is pending, up to batch_events, in steps of one event per document
        # (pipeline.event_batches); the events of a step meet at the classifier.
        async for batch in stream.noack_take(batch_events,
                                             within=settings.batch_wait_s):
            metrics.batch_events.observe(len(batch))
            metrics.redelivered.inc(sum(redeliveries.judge(batch)))
            for step in document_steps(batch, document=lambda event: event.key):
                # Events fetched before a rebalance come again after its seek: left. Judged
                # event by event: a batch may begin with one Faust held across the rebalance
                # and go on with events fetched after the seek (which come in offset order
                # from the committed offsets, so a document's order holds).
                before = [event for event in step if rebalanced_since(app, event)]
                if before:
                    redeliveries.left(before)
                    step = [event for event in step if event not in before]
                    if not step:
                        continue
                progress.took_event()
                classify = Gathering(len(step), classify_documents)
                handled = await asyncio.gather(*(handle_event(stream, event, classify.seat())
                                                 for event in step))
                progress.finished_event()
                if not all(handled):
                    return  # the worker is stopping

    async def handle_event(stream: faust.StreamT, message: faust.EventT, classify: Seat,
                           ) -> bool:
        """The story of one event (its own task; the other events of its step, other
        documents', run beside it). False: the worker is stopping and the event was left
        part way. Events are acknowledged by hand once handled, never when the worker stops
        part way through one: Faust acknowledges an event whose handling was cancelled, which
        would commit its offset and lose it instead of handling it again after the restart."""
        act_for(message)  # its table writes go to its partition's changelogs
        started = time.perf_counter()
        abandoned = False
        # A rebalance that begins while the event is classified leaves it for the seek after
        # it: nothing more is published or written (its partition may be recovering its
        # tables, here or at another worker, and a write then stops the worker), and it is not
        # acknowledged, so it comes again. The session cache's copy, now ahead of the stored
        # state, is set aside then (DocumentClassifier: a stale session is restored from the
        # chunk records).
        left_for_seek = False
        key: bytes | None = message.key
        try:
            # 1. Parse. The Kafka key must be the doc_id: it is what keeps a document's
            #    events in one partition, in order, next to its table entry.
            try:
                edit = parse_edit_event(message.value, settings.max_event_bytes)
                if key is None or key.decode("utf-8", "replace") != edit.doc_id:
                    raise EventRejected("key_mismatch", f"Kafka key {key!r} is not doc_id "
                                        f"{edit.doc_id!r}")
            except EventRejected as exc:
                await publish_dead_letter(key, exc.reason, str(exc), message.value)
                metrics.events.labels("dlq").inc()
                return True
            if stall_at == (edit.doc_id, edit.rev):
                log.critical("test fault injection: the agent stalls on %s rev %s", *stall_at)
                await asyncio.Event().wait()  # never set

            # 2. Look the document up.
            try:
                state = await read_state(key, edit, message)
            except StateUnreadable:
                metrics.events.labels("dlq").inc()
                return True

            # 3. Decide.
            decision = advance(state, edit, settings.max_held_per_doc,
                               raw=_as_text(message.value))
            lengths_in_tokens: list[int] = []
            if classifier is None:  # with a model, the sessions count the tokens
                lengths_in_tokens = token_counts(state, decision.applied)
                if lengths_in_tokens:
                    decision.state = decision.state.evolve(
                        tokens=lengths_in_tokens[-1], label=None, model_id=None)
            encoded = encode_or_size(decision.state) if decision.state_changed else None
            if isinstance(encoded, int):
                await reject_too_large(key, encoded, message.value)
                return True

            # 3b. Classify the applied revisions, off the event loop.
            answers: list[Inference | DocumentTooLarge | None] = [None] * len(
                decision.applied)
            label_changes = [False] * len(decision.applied)
            if classifier is not None and decision.applied:
                try:
                    answers = await classify.ask(
                        (edit.doc_id, state.text if state is not None else None,
                         decision.applied))
                except BuildCancelled:  # logged there
                    abandoned = True
                    return False  # the worker is stopping
                lengths_in_tokens = [answer.tokens for answer in answers]
                # The previous label counts only if the same model gave it: a state
                # written by another model (a model change, a shared changelog) gets
                # label_changed false, and its label is replaced by this model's below.
                previous = (state.label if state is not None
                            and state.model_id == classifier.name else None)
                if state is not None and state.label is not None and previous is None:
                    log.info("state of %r holds model %r's label; %s replaces it",
                             edit.doc_id, state.model_id, classifier.name)
                for i, answer in enumerate(answers):
                    label_changes[i] = (previous is not None and answer.label is not None
                                        and answer.label != previous)
                    previous = answer.label
                decision.state = decision.state.evolve(
                    tokens=lengths_in_tokens[-1], label=answers[-1].label,
                    model_id=classifier.name)
                encoded = encode_or_size(decision.state)
                if isinstance(encoded, int):  # the label pushed it over
                    await reject_too_large(key, encoded, message.value)
                    return True
            if fail_before_publish is not None and "fail" not in faults_fired and any(
                (edit.doc_id, r.rev) == fail_before_publish for r in decision.applied
            ):
                faults_fired.add("fail")
                raise RuntimeError("injected fault (INCSTREAM_TEST_FAIL_BEFORE_PUBLISH)")

            if rebalanced_since(app, message):
                left_for_seek = True
                return True

            # 4. Publish what happened, and wait for Kafka to have it.
            for revision, length_tokens, answer, changed in zip(
                decision.applied, lengths_in_tokens, answers, label_changes, strict=True
            ):
                record = update_record(
                    edit.doc_id,
                    revision,
                    length_tokens=length_tokens,
                    sha1=sha1_hex(revision.text),
                    latency_s=time.perf_counter() - started,
                    inference=answer if isinstance(answer, Inference) else None,
                    model=classifier.name if classifier is not None else None,
                    label_changed=changed,
                )
                await publish(classes, key, record)
                if changed:
                    metrics.label_changes.inc()
                metrics.outputs.inc()
                if message.message.timestamp:
                    metrics.end_to_end_seconds.observe(
                        max(0.0, time.time() - message.message.timestamp)
                    )
            for revision, answer in zip(decision.applied, answers, strict=True):
                if isinstance(answer, DocumentTooLarge):  # applied, not classified
                    await publish_dead_letter(key, "document_too_large",
                                              answer.message(revision.rev), message.value)
            for rejection in decision.rejected:
                await publish_dead_letter(
                    key, rejection.reason, rejection.message,
                    message.value if rejection.incoming else rejection.event,
                )
            if crash_after_publish is not None and any(
                (edit.doc_id, r.rev) == crash_after_publish for r in decision.applied
            ):
                log.critical("test fault injection: SIGKILL after publishing %s rev %s, "
                             "before the table write", *crash_after_publish)
                os.kill(os.getpid(), signal.SIGKILL)

            # 5. Remember: the chunk records first, then the state that points past them
            #    (a crash between the two only costs a fresh build of the touched chunk).
            #    Not once a rebalance has begun (the publish awaited): see left_for_seek.
            if rebalanced_since(app, message):
                left_for_seek = True
                return True
            if keeps_records:
                for answer in answers:
                    if answer is not None and answer.record_writes:
                        metrics.chunk_record_bytes.inc(
                            classifier.records.apply(answer.record_writes))
            if encoded is not None:
                write_state(key, encoded, message.message.partition,
                            held=len(decision.state.held))
            metrics.events.labels(decision.outcome).inc()
        except Exception:  # never let one event kill the agent (Faust restarts it forever)
            log.exception("unexpected error on %r; sent to the dead-letter topic",
                          dead_letter_key(key))
            await publish_dead_letter(
                key, "internal_error", "unexpected worker error", message.value
            )
            metrics.events.labels("dlq").inc()
        except BaseException:  # cancelled: the worker is stopping
            abandoned = True
            raise
        finally:
            classify.leave()  # (if it did not ask): the others need not wait for it
            if abandoned or left_for_seek:  # handled again: never acknowledged
                changelog_writes.forget(message)
                if left_for_seek:
                    redeliveries.left([message])
            else:
                await acknowledge(stream, message, key)
            metrics.processing_seconds.observe(time.perf_counter() - started)
        return True

    async def acknowledge(stream: faust.StreamT, message: faust.EventT, key: bytes | None
                          ) -> None:
        """Acknowledge a handled event once Kafka has its table writes (pipeline.
        durable_writes). If the changelog refuses them, the event stays unacknowledged: its
        partition commits no further, and a restart handles it again."""
        try:
            await changelog_writes.delivered(message)
        except Exception:
            log.exception("the changelog did not take the state of %r; its event is not "
                          "acknowledged and is handled again after a restart",
                          dead_letter_key(key))
            return
        await stream.ack(message)

    lag_probe = ConsumerLagProbe(settings.bootstrap, settings.app_id)
    lag_partitions: set[int] = set()
    lag_failures = 0  # in a row, since the last measurement that worked
    lag_sampling: set[asyncio.Future] = set()  # measurements started at a rebalance

    async def sample_consumer_lag() -> None:
        """Lag per assigned partition of the edits topic, as the broker sees it
        (pipeline.consumer_lag); partitions this worker no longer holds lose their series."""
        nonlocal lag_failures
        assigned = {tp.partition for tp in app.consumer.assignment()
                    if tp.topic == settings.edits_topic}
        try:
            lag = await asyncio.to_thread(
                lag_probe.measure, [(settings.edits_topic, p) for p in sorted(assigned)])
        except Exception as exc:
            # Once per outage, not every 5 s: the series keep their last values meanwhile.
            (log.debug if lag_failures else log.warning)(
                "could not measure the consumer lag: %s", exc)
            lag_failures += 1
            return
        if lag_failures:
            log.info("consumer lag measured again after %d failed tries", lag_failures)
            lag_failures = 0
        for partition in lag_partitions - assigned:
            metrics.consumer_lag.remove(str(partition))
        for (_, partition), behind in lag.items():
            metrics.consumer_lag.labels(str(partition)).set(behind)
        lag_partitions.clear()
        lag_partitions.update(assigned)
        progress.events_waiting = any(lag.values())

    app.timer(interval=5.0)(sample_consumer_lag)  # (the decorator returns the timer's loop)

    @app.on_rebalance_complete.connect
    async def count_recovered_table(sender: Any, **kwargs: Any) -> None:
        """Tables are recovered, streams not resumed yet: count what this worker now holds."""
        totals.recount(documents.items())
        progress.became_ready()
        # The lag of the partitions it now holds, without waiting for the timer's next tick.
        lag_sampling.add(asyncio.ensure_future(sample_consumer_lag()))
        lag_sampling.difference_update([t for t in lag_sampling if t.done()])

    @app.on_before_shutdown.connect
    async def close_lag_probe(sender: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(lag_probe.close)

    broker_watch = BrokerWatch(settings.broker_lost_exit_s)
    # Faust names a table's changelog <app id>-<table>-changelog; only the worker creates it.
    watched_topics = {settings.edits_topic: settings.partitions,
                      f"{settings.app_id}-{settings.table_name}-changelog": settings.partitions}

    @app.timer(interval=settings.broker_probe_interval_s)
    async def watch_broker() -> None:
        """Probe the broker off the event loop; exit when it has been unusable too long."""
        timeout = max(1.0, settings.broker_probe_interval_s)
        try:
            problem = await asyncio.wait_for(asyncio.to_thread(
                probe_broker, settings.bootstrap, watched_topics, timeout), timeout * 3)
        except TimeoutError:
            problem = f"broker {settings.bootstrap}: no answer within {timeout * 3:.0f} s"
        broker_watch.observe(problem)
        metrics.broker_unreachable_seconds.set(broker_watch.seconds_unusable())
        if broker_watch.should_exit():
            log.critical("%s for %.0f s (INCSTREAM_BROKER_LOST_EXIT_S=%s); exiting with status "
                         "%d for a restart", broker_watch.problem,
                         broker_watch.seconds_unusable(), settings.broker_lost_exit_s,
                         EXIT_BROKER_LOST)
            logging.shutdown()
            os._exit(EXIT_BROKER_LOST)  # a clean stop would wait on the broker it lost

    add_routes(app, metrics, progress, broker_usable=lambda: broker_watch.healthy)

    stop_builds = getattr(classifier, "stop", None)  # DocumentClassifier's (the peers: none)
    if stop_builds is not None:
        @app.on_before_shutdown.connect
        async def abandon_build(app: faust.App, **kwargs: Any) -> None:
            """A build in progress stops within one matmul (pipeline.document_sessions)."""
            stop_builds.set()

    app.incstream_metrics = metrics  # type: ignore[attr-defined]
    app.incstream_classifier = classifier  # type: ignore[attr-defined]
    return app


def run_worker(settings: Settings) -> None:
    """Run one worker until SIGTERM/SIGINT (Faust's Worker handles the signals; SIGUSR1 logs
    every thread's stack, the inference thread's included, for a worker that looks stuck)."""
    from incstream.pipeline.log_format import logging_config
    from incstream.pipeline.topics import ensure_topics

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    app = build_app(settings)
    # JSON logs: no startup banner either (Faust prints it outside logging).
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=settings.log_format == "json",
                          logging_config=logging_config(settings.log_format, settings.log_level))
    worker.execute_from_commandline()
