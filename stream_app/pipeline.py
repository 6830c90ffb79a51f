"""The pipeline behind the agent: validate → state → (batch → predict) → outcome + prediction → publish → ack.

Per message, in the agent (:meth:`Pipeline.handle`, concurrency 1, manual acks):

1. :func:`~stream_app.events.parse_event`; a bad message goes to ``events.dlq`` with its reason and
   is acked. An unexpected error while updating state dead-letters that one message
   (``processing_failed``): nothing raised by one message stops the worker.
   A valid event whose key belongs to another partition (:mod:`stream_app.partitioning`) is forwarded
   there through the repartition topic instead, and acked once the broker has it
   (:meth:`Pipeline.reroute`); it comes back through ``process_rerouted`` and continues here, its
   records naming its original topic, partition and offset (:class:`Origin`).
2. State, per event (never inside ``take()``, Faust issue #497): the user's window. An event already
   in the window (a redelivery) is not added again, nor counted in the user's activity at delivery.
3. A :class:`~stream_app.batcher.Request` with the window *as of that event* goes to the
   micro-batcher; the agent awaits while its queue is full (backpressure).

Per batch, in the batcher's deliverer (:meth:`Pipeline.deliver`, in event order per user): the
``outcomes`` record for the user's previous prediction, the prediction (or a ``predict_failed``
dead letter), then one write of the user's state (window + this prediction: one changelog record),
then the ack. Between 2 and the write the user's state waits in :attr:`Pipeline.pending`, where
the user's next event in flight finds it.

A control record on ``events`` (header ``nextaction-control: forget``, key = a user id; written by
``nextaction forget`` and by the idle sweep) is never validated, dead-lettered or predicted:
:meth:`Pipeline.forget` deletes the user (docs/privacy.md), in order with the user's events.

Delivery is at-least-once (an offset is committed only after its event is acked, and Faust
flushes the producer first); a redelivered event gets no second state change or outcome and its
prediction is re-published with ``duplicate: true``. Model updates hot-swap the predictor between
batches (:meth:`Pipeline.handle_model_update`). The design and its measurements: docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import orjson

import orjson

from models.delta import ModelDelta, label_parts
from models.predictor import Predictor
from models.schema import EventSeq
from stream_app import history as window
from stream_app import monitoring, partitioning, predictors, runtime
from stream_app.ackorder import AckOrder
from stream_app.batcher import PREDICT_FAILED, Batcher, Request, Result
from stream_app.errors import EventRejected
from stream_app.events import Event, parse_event
from stream_app.records import (CONTROL_HEADER, DELTA, FORGET, IDLE, REQUEST, ForgetRequest, ModelUpdate,
                                StoredPrediction, UserState, control_kind, count_activity, decode_state, dlq_key,
                                dlq_record, encode_state, forget_marker, last_seen, outcome_record, prediction_record)
from stream_app.remote import RemotePredictor
from stream_app.settings import SettingsType
from stream_app.updates import UpdateRejected, admit, checkpoint_roots

log = logging.getLogger(__name__)

#: DLQ reason of a message whose state update raised unexpectedly (a bug or a storage error).
PROCESSING_FAILED = "processing_failed"
#: DLQ reason of a user's stored state that could not be decoded: the record carries the stored bytes
#: (key: the user id; source: the event that found it), the state is reset to empty, and that event
#: is processed on the empty state (it still gets its prediction).
STATE_RESET = "state_reset"

#: First and longest wait between two tries of the changelog check (:meth:`Pipeline._wait_for_changelogs`).
METADATA_BACKOFF_S, METADATA_BACKOFF_MAX_S = 0.5, 10.0

#: Header of a repartition-topic record: where the event first arrived, and when (:class:`Origin`).
ORIGIN_HEADER = "nextaction-origin"


def start_predictor(settings: SettingsType) -> Predictor:
    """The predictor a worker serves at start: the checkpoint's Transformer in the inference process
    (``serve_process``), else :func:`stream_app.predictors.load_local` in this process."""
    if settings.checkpoint is not None and settings.serve_process:
        return RemotePredictor.start(settings)  # the child runs load_local itself
    return predictors.load_local(settings)


def next_predictor(current: Predictor, path: str, sha256: str | None, settings: SettingsType) -> Predictor:
    """The predictor for a model update (:func:`stream_app.predictors.load_successor`): built like
    ``current``; for one that serves no checkpoint (the baseline), in a new inference process
    (``serve_process``) or in this one."""
    def build(p: Path) -> Predictor:
        if settings.serve_process:
            return RemotePredictor.start(settings.model_copy(update={"checkpoint": p}))
        return predictors.load_transformer(settings, p)

    return predictors.load_successor(current, path, sha256, build)


class Publisher(Protocol):
    """Where the pipeline's outputs go: ``kind`` is ``predictions``, ``outcomes`` or ``dlq``.

    ``send`` returns once the record is queued, with an awaitable that resolves when the broker
    has it (and raises if it never will), or ``None`` when the record is already delivered (tests).
    """

    async def send(self, kind: str, key: bytes | None, value: bytes) -> Awaitable[Any] | None: ...


class KafkaPublisher:
    """Publishes through the Faust app's producer. ``topics`` maps each kind to its topic name.

    The returned future is the only report of a failed produce: aiokafka's ``flush()`` (which Faust
    awaits before committing offsets) waits for failed batches without raising, so the pipeline
    acks an event only once every future of its outputs resolved (:meth:`Pipeline._ack_when_sent`).
    """

    def __init__(self, app: Any, topics: dict[str, str], *, transactional: bool = False) -> None:
        self.app, self.topics, self.transactional = app, topics, transactional

    async def send(self, kind: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        tid = self._transactional_id() if self.transactional else None
        return await self.app.producer.send(self.topics[kind], key, value, partition=None, timestamp=None,
                                            headers=None, transactional_id=tid)

    def _transactional_id(self) -> str:
        """The transaction of the current event's input partition (``exactly_once``): Faust's own,
        which also carries that partition's changelog records and commits its offsets."""
        from faust.streams import current_event as faust_current_event

        msg = faust_current_event().message
        group = self.app.assignor.group_for_topic(msg.topic)
        return f"{self.app.conf.id}-{group}-{msg.partition}"


@dataclass(slots=True, eq=False)
class Pending:
    """A user's state between an event's state update and the table write after its delivery
    (:attr:`Pipeline.pending`)."""

    state: UserState
    inflight: int = 0  # the user's events submitted and not yet written to the tables
    dirty: bool = False  # changed since the last snapshot for the table


@dataclass(slots=True, eq=False)
class Write:
    """What one delivered event leaves for the tables, written once its outputs are safe
    (:meth:`Pipeline._write`)."""

    user: str
    src: "Source"
    pending: Pending
    state: bytes | None  # the user's encoded state after this event (None: unchanged)


@dataclass(slots=True, eq=False)
class Source:
    """What the deliverer needs about the event behind a request (``Request.ref``)."""

    event: Any  # the Faust event (acked after delivery; its partition routes table writes)
    stream: Any
    topic: str
    partition: int
    offset: int
    raw: bytes
    key: bytes | None
    item_id: str
    action: str
    category: str
    duplicate: bool
    before: EventSeq  # the user's window before this event joined it: the previous prediction's context
    after: EventSeq  # the user's whole window once this event joined it: what the table gets with this
    # event's outputs (the pending window may already hold events read after it)
    item_text: str = ""  # the event's (its outcome carries it to the trainer)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a re-routed event first arrived (the ``events`` topic, partition, offset) and when (epoch s).
    Its records (prediction, outcome, dead letter) name these, as if it had arrived on the right partition."""

    topic: str
    partition: int
    offset: int
    arrival: float

    def header(self) -> tuple[str, bytes]:
        return ORIGIN_HEADER, orjson.dumps([self.topic, self.partition, self.offset, self.arrival])

    @classmethod
    def of(cls, msg: Any) -> "Origin | None":
        """The origin a repartition-topic message carries (``None``: no or a bad header)."""
        headers = msg.headers or ()
        for name, value in (headers.items() if isinstance(headers, dict) else headers):
            if name == ORIGIN_HEADER:
                try:
                    topic, partition, offset, arrival = orjson.loads(value)
                    return cls(str(topic), int(partition), int(offset), float(arrival))
                except (ValueError, TypeError):
                    return None
        return None


@contextlib.contextmanager
def current_event(event: Any):
    """Make ``event`` Faust's current event, so table writes go to that event's partition.

    The deliverer writes ``histories`` outside the agent's iteration (after inference), where
    Faust would otherwise refuse ("Cannot modify table outside of agent/stream") or pick the wrong
    partition. This restores exactly the per-event context Faust's own stream iterator sets.
    """
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class Pipeline:
    """Per-event processing and batched delivery for one app (see the module docstring)."""

    def __init__(self, app: Any, topology: Any, predictor_factory: Callable[[SettingsType], Predictor] | None = None,
                 publisher: Publisher | None = None) -> None:
        self.app, self.t, self.settings = app, topology, topology.settings
        s = self.settings
        self.predictor_factory = predictor_factory or start_predictor
        self.topics = {"predictions": s.topic_predictions, "outcomes": s.topic_outcomes, "dlq": s.topic_dlq}
        self.exactly_once = s.processing_guarantee == "exactly_once"
        self.publisher = publisher or KafkaPublisher(app, self.topics, transactional=self.exactly_once)
        #: exactly_once: held while a batch's outputs are sent and its events acked, and by every
        #: offset commit, so a transaction never holds outputs of events whose offsets it does not commit
        self._txn_gate = asyncio.Lock()
        self.batcher: Batcher | None = None
        #: user → state of the users with events in flight (see the module docstring)
        self.pending: dict[str, Pending] = {}
        #: messages read and not yet acked, per partition: acks go out in read order (stream_app.ackorder)
        self.ack_order = AckOrder()
        self._verified_topics: set[str] = set()
        self._partition_counts: dict[str, int] = {}  # source topic → its partition count
        self._forwards: set[asyncio.Task] = set()  # re-routed events whose forward is not yet confirmed
        self._starting = asyncio.Lock()  # two agents start the one batcher
        self.rerouted_agent: Any = None  # the agent of the repartition topic (stream_app.agents)
        self._update_n: int | None = None  # the number of the last trainer record applied (monotonic)
        self._watch: asyncio.Task | None = None
        self._ack_tasks: set[asyncio.Task] = set()  # writes + acks waiting for their outputs' produce futures
        self._last_ack: asyncio.Task | None = None
        self.ttl_ms = s.window_ttl_s * 1000
        self.parse_kw = dict(max_bytes=s.max_event_bytes, max_future_skew_ms=s.max_future_skew_s * 1000,
                             max_age_ms=s.max_event_age_s * 1000)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start_batcher(self) -> Batcher:
        async with self._starting:
            return await self._start_batcher()

    async def _start_batcher(self) -> Batcher:
        if self.batcher is None:
            s = self.settings
            runtime.reset_root_log_level(s.log_level)
            monitoring.watch_gc()
            sys.setswitchinterval(s.gil_switch_interval_ms / 1000.0)
            self.app.producer.buffer.max_messages = s.producer_buffer_max_messages  # before Faust pauses the stream
            predictor = self.predictor_factory(s)
            log.info("serving %r (max_batch=%d, max_wait_ms=%s, queue=%d)", predictor, s.max_batch, s.max_wait_ms,
                     s.predict_queue)
            self.batcher = Batcher(predictor, self.deliver, k=s.top_k, max_batch=s.max_batch,
                                   max_wait_ms=s.max_wait_ms, max_queue=s.predict_queue)
            await self.batcher.start()
            if self.exactly_once and getattr(self.app.consumer, "transactions", None) is not None:
                self._gate_commits(self.app.consumer)
            if s.gc_freeze:
                runtime.freeze_heap()
            self._watch = asyncio.ensure_future(self._watch_batcher(self.batcher))
        return self.batcher

    def _gate_commits(self, consumer: Any) -> None:
        """``exactly_once``: make Faust's offset commit (which commits each input partition's
        transaction) wait for :attr:`_txn_gate`, and first hand Faust's buffered changelog records to
        their transactions.

        Faust's transactional commit assumes an event's outputs are sent before it is acked and that
        nothing is sent between the offsets being chosen and the transaction committing. Here outputs
        are sent by the deliverer, a task of its own, so without the gate a commit could fall between
        a batch's outcome and its prediction (the outcome committed with an offset that does not cover
        its event: a duplicate after a crash). And Faust's commit in this mode does not flush its
        producer buffer, where table writes wait: a state write for a committed offset could miss the
        transaction and be lost in a crash.
        """
        force_commit = consumer.force_commit
        gate, buffer = self._txn_gate, self.app.producer.buffer

        async def gated_force_commit(*args: Any, **kwargs: Any) -> bool:
            async with gate:
                await buffer.flush()
                return await force_commit(*args, **kwargs)

        consumer.force_commit = gated_force_commit

    async def _watch_batcher(self, batcher: Batcher) -> None:
        try:
            await batcher.wait_closed()
        except asyncio.CancelledError:
            return
        except BaseException as exc:  # publishing failed: crash, restart from committed offsets
            log.critical("batcher failed, crashing the worker (events since the last commit will be "
                         "processed again): %r", exc)
            await self.app.crash(exc)

    async def stop_batcher(self) -> None:
        gc.unfreeze()  # let shutdown free the start-up heap again (rocksdict/nanobind objects included)
        if self.batcher is not None:
            batcher, self.batcher = self.batcher, None
            if self._watch is not None:
                self._watch.cancel()
            await batcher.stop(drain=True)
            if self._ack_tasks:  # the last batches' outputs: acked (so committed) once the broker has them
                await asyncio.gather(*self._ack_tasks, return_exceptions=True)
            batcher.predictor.close()

    # --- model updates (called by stream_app.updates.ModelUpdateListener) ---------------------------------
    async def handle_model_update(self, kind: str, value: bytes | None) -> str:
        """Apply one ``model-updates`` record (``kind`` ``full`` or ``delta``); returns what happened."""
        if kind == DELTA:
            return await self._apply_delta(value)
        return await self._swap(value)

    async def _apply_delta(self, value: bytes | None) -> str:
        """Apply an online delta in place, in the inference thread between two batches.

        Returns ``delta:<label>`` when applied; ``gap`` when it belongs to the served lineage but its
        predecessor was never applied here (the listener then replays the lineage); ``ignored`` when it
        belongs to another version (an older lineage, or a predictor without a model).
        """
        try:
            delta = ModelDelta.decode(value or b"")
        except ValueError as exc:
            log.error("model delta rejected: %s", exc)
            monitoring.MODEL_UPDATES.labels("rejected").inc()
            return "rejected:bad_delta"
        batcher = await self.start_batcher()
        current = batcher.predictor
        try:
            applied = await batcher.run_in_executor(current.apply_delta, delta)
        except ValueError as exc:  # it follows the served version but does not fit the model: nothing changed
            log.error("!!! model delta %s rejected, still serving %s: %s", delta.label, current.version, exc)
            monitoring.MODEL_UPDATES.labels("rejected").inc()
            return "rejected:" + type(exc).__name__
        if applied:
            monitoring.MODEL_UPDATES.labels("delta").inc()
            return f"delta:{delta.label}"
        base, seq = label_parts(str(current.version))
        if base == delta.base and delta.prev > seq:
            monitoring.MODEL_UPDATES.labels("gap").inc()
            return "gap"
        monitoring.MODEL_UPDATES.labels("ignored").inc()
        return "ignored"

    async def _swap(self, value: bytes | None) -> str:
        """Hot-swap to the checkpoint a full record names; returns what happened.

        The new predictor is loaded, hash-verified and warmed up **in the batcher's inference
        thread** (never on the event loop, never concurrently with a batch), then
        :meth:`Batcher.swap` serves it from the next batch on. Any problem (a malformed record, a
        missing or corrupt checkpoint, a content hash other than the announced one, non-finite
        outputs) is logged and counted, and the current predictor keeps serving. Before anything is
        read, :func:`stream_app.updates.admit` refuses a record without a ``sha256`` or whose path
        lies outside the checkpoint roots (docs/security.md). An update naming
        the version already served is skipped (a redelivery).
        """
        try:
            update = admit(value, checkpoint_roots(self.settings))
        except UpdateRejected as exc:
            log.error("!!! model update rejected (%s): %s", exc.reason, exc.detail)
            monitoring.MODEL_UPDATES.labels("rejected").inc()
            return f"rejected:{exc.reason}"
        batcher = await self.start_batcher()
        current = batcher.predictor
        if update.n is not None and self._update_n is not None and update.n < self._update_n:
            log.warning("model update %s (%s) numbered %d after %d: an older record, ignored", update.version,
                        update.path, update.n, self._update_n)
            monitoring.MODEL_UPDATES.labels("ignored").inc()
            return "ignored"
        if update.names(str(current.version)):
            log.info("model update %s (%s): already serving %s, skipped", update.version, update.path,
                     current.version)
            monitoring.MODEL_UPDATES.labels("skipped").inc()
            return "skipped"
        t0 = time.perf_counter()
        try:
            new = await batcher.run_in_executor(next_predictor, current, update.path, update.sha256, self.settings)
        except Exception as exc:  # noqa: BLE001 - a bad update must never stop the worker
            log.error("!!! model update %s (%s) rejected, still serving %s: %s: %s", update.version, update.path,
                      current.version, type(exc).__name__, exc)
            monitoring.MODEL_UPDATES.labels("rejected").inc()
            return "rejected:" + type(exc).__name__
        batcher.swap(new)
        if update.n is not None:
            self._update_n = update.n
        monitoring.MODEL_UPDATES.labels("applied").inc()
        log.info("model update %s applied: %s -> %s from %s (loaded in %.2f s)", update.version, current.version,
                 new.version, update.path, time.perf_counter() - t0)
        return f"swapped:{new.version}"

    # --- per event (agent) --------------------------------------------------------------------------
    async def handle(self, event: Any, stream: Any) -> str:
        """Process one message; returns what happened (``queued``, ``duplicate``, ``rejected:<reason>``)."""
        msg = event.message
        self.ack_order.read((msg.topic, msg.partition, msg.offset), (stream, event))  # acked in read order
        rerouted = self.t.repartition is not None and msg.topic == self.settings.topic_repartition
        origin = Origin.of(msg) if rerouted else None
        # A re-routed event counts, validates and measures latency from its first arrival; its records
        # name where it first arrived (``at``).
        arrival = origin.arrival if origin is not None else time.time()
        at = origin if origin is not None else msg
        raw, key = event.value, event.key
        kind = control_kind(msg.headers)
        if kind is not None:  # before validation: a control record is never an event
            return await self.handle_control(kind, event, stream)
        if not rerouted:  # counted once, at first arrival
            monitoring.EVENTS_IN.inc()
        try:
            ev = parse_event(raw, now_ms=int(arrival * 1000), key=key if key is not None else b"", **self.parse_kw)
        except EventRejected as exc:
            await self._reject(raw, key, exc.reason, str(exc), at, stream, event)
            return f"rejected:{exc.reason}"
        if msg.topic not in self._verified_topics:
            await self._wait_for_changelogs(msg.topic)
        if self.t.repartition is not None and not rerouted:
            owner = partitioning.owner(key, self._partition_counts.get(msg.topic, self.settings.partitions))
            if owner != msg.partition:
                await self.reroute(event, stream, owner, Origin(msg.topic, msg.partition, msg.offset, arrival))
                return "rerouted"
        try:
            stored = None if ev.user_id in self.pending else await self._stored_state(ev.user_id, msg)
            history, before, duplicate = self.update_state(ev, stored)
        except Exception as exc:  # noqa: BLE001 - dead-letter, keep the worker alive
            log.exception("state update failed for %s[%s]@%s", msg.topic, msg.partition, msg.offset)
            await self._reject(raw, key, PROCESSING_FAILED, f"{type(exc).__name__}: {exc}", at, stream, event)
            return f"rejected:{PROCESSING_FAILED}"
        src = Source(event, stream, at.topic, at.partition, at.offset, raw, key, ev.item_id, ev.action,
                     ev.category, duplicate, before, self.pending[ev.user_id].state.history, ev.item_text)
        try:
            await self.batcher.submit(Request(ev.user_id, history, ev.ts, arrival, observe=not duplicate, ref=src,
                                              item_text=(ev.item_id, ev.item_text) if ev.item_text else None))
        except BaseException:  # never delivered: the user's pending entry must not wait for it
            self._delivered(ev.user_id)
            raise
        return "duplicate" if duplicate else "queued"

    async def reroute(self, event: Any, stream: Any, partition: int, origin: Origin) -> None:
        """Forward a valid event (its bytes, key, headers and timestamp, plus :data:`ORIGIN_HEADER`) to
        ``partition`` of the repartition topic; ack it only once the broker confirmed the forward (a
        failed forward crashes the worker, which then reads the event again: never acked, never lost).
        The agent goes on meanwhile; Faust commits an offset only below the first unacked one."""
        msg = event.message
        headers = msg.headers or []
        headers = [*(headers.items() if isinstance(headers, dict) else headers), origin.header()]
        sent = await self.forward(self.settings.topic_repartition, event.key, event.value, partition,
                                  msg.timestamp or None, headers)
        task = asyncio.ensure_future(self._ack_forward(sent, event, stream))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def forward(self, topic: str, key: bytes | None, value: bytes | None, partition: int,
                      timestamp: float | None, headers: list) -> Any:
        """Queue one record on the app's producer; returns the awaitable of its delivery."""
        return await self.app.producer.send(topic, key, value, partition=partition, timestamp=timestamp,
                                            headers=headers)

    async def _ack_forward(self, sent: Any, event: Any, stream: Any) -> None:
        try:
            await sent
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the event stays unacked: crash, read it again
            log.critical("forwarding %s[%s]@%s to the repartition topic failed, crashing the worker: %r",
                         event.message.topic, event.message.partition, event.message.offset, exc)
            await self.app.crash(exc)
            return
        monitoring.EVENTS_REROUTED.inc()
        await self._ack(stream, event)

    async def _wait_for_changelogs(self, source_topic: str, timeout: float = 30.0) -> None:
        """Check once per source topic that every table's changelog has the source's partition count.

        Faust does this check itself on a table's first write, but reads the partition counts from
        the consumer's subscription snapshot, which can keep a changelog topic that Faust created a
        moment earlier at 0 partitions for the whole run ("Ignoring missing topic" at start). The
        first write then raises ``PartitionsMismatch``, which would dead-letter valid events or stop
        the batcher. So the counts are read here from the producer's cluster metadata (refreshed
        on demand) and the tables marked as verified; a real mismatch (topics not co-partitioned)
        crashes the worker with a CRITICAL log that names the topics and counts. The output
        topics' metadata is fetched here too, before the first delivery needs it.

        A metadata request that times out or fails (the broker is restarting, a topic is still being
        created) is retried with a backoff (:data:`METADATA_BACKOFF_S`, doubling up to
        :data:`METADATA_BACKOFF_MAX_S`) and logged, never raised: raising here would crash the agent,
        and a crashed agent stops acknowledging, so nothing would be committed any more.
        """
        from aiokafka.errors import KafkaError
        from faust.exceptions import PartitionsMismatch

        if self.app.consumer.topic_partitions(source_topic) is None:  # no broker (agent.test_context())
            self._verified_topics.add(source_topic)
            return
        delay, attempt = METADATA_BACKOFF_S, 1
        while True:
            try:
                await self._check_changelogs(source_topic, timeout)
                break
            except PartitionsMismatch as exc:  # not co-partitioned: one user would get several histories
                # Crash the worker (exit non-zero) rather than the agent: Faust's supervisor would restart
                # a crashed agent, which would stall on the same check forever without a word on exit.
                log.critical("%s; fix the topics (e.g. recreate the changelog or repartition topic with "
                             "that partition count) and restart. Crashing the worker.", exc)
                await self.app.crash(exc)
                raise
            except (asyncio.TimeoutError, KafkaError) as exc:
                log.warning("waiting for the metadata of %r and its changelogs (attempt %d, %s); retrying in "
                            "%.1f s", source_topic, attempt, type(exc).__name__ if not str(exc) else exc, delay)
                monitoring.METADATA_RETRIES.inc()
                await asyncio.sleep(delay)
                delay, attempt = min(delay * 2, METADATA_BACKOFF_MAX_S), attempt + 1
        self._verified_topics.add(source_topic)

    async def _check_changelogs(self, source_topic: str, timeout: float) -> None:
        """One try of :meth:`_wait_for_changelogs`: each metadata request within ``timeout`` seconds."""
        from faust.exceptions import PartitionsMismatch

        tables = (self.t.histories,)
        producer = self.app.producer._ensure_producer()  # the aiokafka producer: public partitions_for()
        source_n = len(await asyncio.wait_for(producer.partitions_for(source_topic), timeout))
        self._partition_counts[source_topic] = source_n  # the modulus of the partition rule
        for table in tables:
            name = table.changelog_topic_name
            n = len(await asyncio.wait_for(producer.partitions_for(name), timeout))
            if n != source_n:
                raise PartitionsMismatch(f"table {table.name!r}: changelog topic {name!r} has {n} partitions, "
                                         f"source topic {source_topic!r} has {source_n}; they must be equal")
            table._verified_source_topics_for_partitions.add(source_topic)
        if self.t.repartition is not None:  # a forward must land on the partition the tables use
            name = self.settings.topic_repartition
            n = len(await asyncio.wait_for(producer.partitions_for(name), timeout))
            if n != source_n:
                raise PartitionsMismatch(f"repartition topic {name!r} has {n} partitions, source topic "
                                         f"{source_topic!r} has {source_n}; they must be equal")
        # Also fetch the output topics' metadata now: otherwise the first outcome / DLQ record waits
        # for a metadata round trip inside the deliverer, and every delivery behind it waits too.
        for topic in self.topics.values():
            await asyncio.wait_for(producer.partitions_for(topic), timeout)

    async def _stored_state(self, user: str, msg: Any) -> UserState:
        """The user's state from ``histories``. One that does not decode is dead-lettered once
        (``state_reset``) and replaced by the empty state (overwritten at delivery), so it cannot
        poison every later event of the user."""
        stored = self.t.histories.get(user)
        try:
            return decode_state(stored)
        except ValueError as exc:
            log.error("user %r: stored state unreadable (%s), reset to empty", user[:80], exc)
            await self.dead_letter(stored, user.encode(), STATE_RESET, str(exc), msg)
            return UserState(EventSeq.empty())

    def update_state(self, ev: Event, stored: UserState | None = None) -> tuple[EventSeq, EventSeq, bool]:
        """Add the event to the user's window; return (window as of the event, the window before it
        joined, duplicate). ``stored``: the user's state as read from the table (:meth:`_stored_state`),
        used when the user has no pending state.

        The window goes to :attr:`pending` and is written to ``histories`` at delivery, together with
        the prediction and the activity count (:meth:`deliver`): one synchronous step, so a crash
        leaves either all three or none of them for a redelivered event to find.
        """
        s = self.settings
        p = self.pending.get(ev.user_id)
        if p is None:
            p = Pending(stored if stored is not None else decode_state(self.t.histories.get(ev.user_id)))
        history = before = p.state.history
        duplicate = window.contains(history, ev.item_id, ev.action, ev.ts)
        p.state.seen = int(time.time() * 1000)  # the idle sweep's clock (written with the state at delivery)
        if duplicate:
            monitoring.EVENTS_DUPLICATE.inc()
        else:
            history = window.add_event(history, ev.item_id, ev.action, ev.ts, max_events=s.window_events,
                                       ttl_ms=self.ttl_ms, device=ev.device, location=ev.location,
                                       category=ev.category)
            p.state.history, p.dirty = history, True
        out = window.as_of(history, ev.ts), before, duplicate
        p.inflight += 1  # last: from here on, the request is submitted (or _delivered undoes this)
        self.pending[ev.user_id] = p
        return out

    # --- privacy: forget a user (docs/privacy.md) -------------------------------------------------------
    async def handle_control(self, kind: str, event: Any, stream: Any) -> str:
        """A control record (:func:`stream_app.records.control_kind`): a forget request for the user
        named by the key. A malformed one is logged (without the user id) and skipped, never
        dead-lettered: it is not an event."""
        msg = event.message
        try:
            if kind != FORGET:
                raise ValueError(f"unknown control kind {kind!r}")
            if not event.key:
                raise ValueError("no key (the key is the user id)")
            user = bytes(event.key).decode("utf-8")
            request = ForgetRequest.decode(event.value)
        except ValueError as exc:
            log.warning("control record %s[%s]@%s skipped: %s", msg.topic, msg.partition, msg.offset, exc)
            monitoring.FORGETS.labels("?", "invalid").inc()
            await self._ack(stream, event)
            return "control:invalid"
        if msg.topic not in self._verified_topics:
            await self._wait_for_changelogs(msg.topic)
        result = await self.forget(user, request.reason, request.idle_before_ms)
        await self._ack(stream, event)
        return f"forget:{result}"

    async def forget(self, user: str, reason: str = REQUEST, idle_before_ms: int | None = None) -> str:
        """Delete ``user`` from this worker; must run in the agent, with the control record as the
        current event (table deletes go to its partition). Returns ``forgotten``, ``absent`` (no state
        here) or ``kept`` (an idle request for a user seen since ``idle_before_ms``).

        1. The user's events in flight are delivered first (:meth:`Batcher.drain`: their outcome, their
           prediction) and their state written (after the broker acknowledged those outputs:
           :meth:`_ack_after`), so nothing recreates what is deleted below; the agent waits meanwhile,
           so no later event of the user overtakes the request.
        2. ``histories``: ``del`` writes a tombstone to the changelog (the window, the latest
           prediction and the activity counts are all in that one record).
        3. The predictor's per-user state (the KV cache, in the inference process or in this one).
        4. A forget marker on ``outcomes`` (key: the user): the trainer drops the user's pending and
           replayed examples. Sent for every request (idempotent), since a trainer may hold examples
           of a user whose state is already gone.
        """
        if self.batcher is not None and user in self.pending:
            await self.batcher.drain()
        while user in self.pending and self._last_ack is not None:  # delivered; its state write waits for
            await asyncio.wait([self._last_ack])  # the broker's acks (:meth:`_ack_after`, in delivery order)
        value = self.t.histories.get(user)  # this partition's store only (the current event's)
        if idle_before_ms is not None and (value is None or last_seen(decode_state(value)) >= idle_before_ms):
            monitoring.FORGETS.labels(reason, "kept" if value is not None else "absent").inc()
            return "kept" if value is not None else "absent"
        if value is not None:
            del self.t.histories[user]
        self.pending.pop(user, None)
        if self.batcher is not None:
            predictor = self.batcher.predictor
            if predictor.runs_elsewhere:
                await predictor.forget_users_async([user])
            else:  # the inference thread owns the model's cache: run it there, between batches
                await self.batcher.run_in_executor(predictor.forget_users, [user])
        result = "forgotten" if value is not None else "absent"
        if result == "forgotten" or reason == REQUEST:
            await self.publisher.send("outcomes", user.encode(), forget_marker(user, reason))
        monitoring.FORGETS.labels(reason, result).inc()
        log.debug("forget %r (%s): %s", user, reason, result)
        return result

    async def idle_users(self, now_ms: int | None = None) -> tuple[int, list[tuple[int, str]]]:
        """The users of this worker's active ``histories`` partitions not seen for ``state_idle_ttl_s``:
        ``(cutoff_ms, [(partition, user)])``. Read from the partitions' RocksDB stores directly (the
        sweep runs outside any event), yielding to the event loop every 1000 users; users with events
        in flight are skipped."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - self.settings.state_idle_ttl_s * 1000
        store = self.t.histories.data
        dbs = getattr(store, "_dbs", None)
        out: list[tuple[int, str]] = []
        if dbs is None:
            return cutoff, out
        actives = {tp.partition for tp in self.app.assignor.assigned_actives()
                   if tp.topic == self.t.histories.changelog_topic_name}
        if not actives:  # agent.test_context(): no assignment, every local partition
            actives = set(dbs)
        n = 0
        for partition in sorted(actives):
            db = dbs.get(partition)
            if db is None:
                continue
            for raw_key, value in store._visible_items(db):
                n += 1
                if n % 1000 == 0:
                    await asyncio.sleep(0)
                user = raw_key.decode("utf-8", "replace")
                if user in self.pending:
                    continue
                if last_seen(decode_state(value)) < cutoff:
                    out.append((partition, user))
        return cutoff, out

    async def sweep(self) -> int:
        """One idle sweep (``state_idle_ttl_s``): a conditional forget request (:class:`ForgetRequest`
        with ``idle_before_ms``) on ``events`` for each idle user, to the partition holding the user, so
        the deletion itself runs in the agent, in order with the user's events, by :meth:`forget`
        (an event that arrives meanwhile keeps the user). Returns the number of requests sent."""
        cutoff, users = await self.idle_users()
        for partition, user in users:
            await self.request_forget(user, ForgetRequest(IDLE, cutoff), partition)
        monitoring.SWEEPS.inc()
        if users:
            log.info("idle sweep: %d users not seen for %d s, forget requested", len(users),
                     self.settings.state_idle_ttl_s)
        return len(users)

    async def request_forget(self, user: str, request: ForgetRequest, partition: int) -> None:
        """Produce one forget control record on ``events`` (to ``partition``) with the app's producer."""
        await self.app.producer.send(self.settings.topic_events, user.encode(), request.encode(),
                                     partition=partition, timestamp=None, headers=[(CONTROL_HEADER, FORGET.encode())])

    def _delivered(self, user: str) -> None:
        p = self.pending.get(user)
        if p is not None:
            p.inflight -= 1
            if p.inflight <= 0:
                del self.pending[user]

    async def dead_letter(self, raw: bytes | None, key: bytes | None, reason: str, detail: str,
                          msg: Any) -> Awaitable[Any] | None:
        monitoring.EVENTS_REJECTED.labels(reason).inc()
        return await self.publisher.send("dlq", dlq_key(key), dlq_record(raw, reason, detail, topic=msg.topic,
                                                                partition=msg.partition, offset=msg.offset, key=key))

    async def _reject(self, raw: bytes | None, key: bytes | None, reason: str, detail: str, msg: Any, stream: Any,
                      event: Any) -> None:
        """Dead-letter one message and ack it (once the DLQ record is safe: :meth:`_ack_when_sent`)."""
        async with self._transaction():
            sent = await self.dead_letter(raw, key, reason, detail, msg)
            await self._ack_when_sent([sent], [(stream, event)])

    async def _ack(self, stream: Any, event: Any) -> None:
        """Ack ``event`` once every message read before it on its partition is acked
        (:mod:`stream_app.ackorder`: Faust would otherwise commit past an earlier message that is
        still in a prediction batch)."""
        msg = event.message
        for item in self.ack_order.done((msg.topic, msg.partition, msg.offset)):
            s, e = item if item is not None else (stream, event)
            await s.ack(e)

    def _transaction(self) -> Any:
        """``exactly_once``: the gate a commit waits for (:meth:`_gate_commits`); else nothing."""
        return self._txn_gate if self.exactly_once else contextlib.nullcontext()

    async def _ack_when_sent(self, sent: list, acks: list[tuple[Any, Any]], writes: list[Write] = ()) -> None:
        """Write ``writes`` to the tables and ack ``acks`` (``(stream, event)`` pairs) once every
        produce in ``sent`` reached the broker.

        An offset is committed only after its event is acked, and the tables learn that an event was
        handled only here: so a lost output can never sit behind a committed offset, nor behind a
        stored state that would make the redelivered event look done. The wait runs in a task of its
        own, so the deliverer goes on with the next batch meanwhile; these tasks write and ack in
        delivery order (each waits for the one before). A produce that failed (after the producer's
        own retries) leaves its events unwritten and unacked and crashes the worker loudly: commits
        stop before the lost output, and the restarted worker processes those events again.
        ``exactly_once``: written and acked at once, since the transaction commits the outputs, the
        changelog records and the offsets together, or none of them.
        """
        futures = [f for f in sent if f is not None]
        if self.exactly_once or (not futures and self._last_ack is None):
            self._write(writes)
            for stream, event in acks:
                await self._ack(stream, event)
            return
        task = asyncio.ensure_future(self._ack_after(futures, acks, writes, self._last_ack))
        self._last_ack = task
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Task) -> None:
        self._ack_tasks.discard(task)
        if self._last_ack is task:
            self._last_ack = None

    async def _ack_after(self, futures: list, acks: list[tuple[Any, Any]], writes: list[Write],
                         before: asyncio.Task | None) -> None:
        results = await asyncio.gather(*futures, return_exceptions=True)
        if before is not None:
            await asyncio.wait([before])  # write and ack in delivery order
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            monitoring.PRODUCE_FAILED.inc()
            event = acks[0][1] if acks else None
            where = (f"{event.message.topic}[{event.message.partition}]@{event.message.offset}"
                     if event is not None else "?")
            log.critical("!!! a produce failed (%s: %s) for the outputs of %d events from %s on: their "
                         "offsets stay uncommitted; crashing the worker, which processes them again on "
                         "restart", type(failed).__name__, failed, len(acks), where)
            await self.app.crash(failed)
            return
        self._write(writes)
        for stream, event in acks:
            await self._ack(stream, event)

    def _write(self, writes: list[Write]) -> None:
        """The table's part of delivered events: per user, the newest state (window, prediction and
        activity counts: one ``histories`` write, one changelog record per user and batch).
        Synchronous: a crash leaves all of it or none of it in the local store."""
        last = {w.user: n for n, w in enumerate(writes) if w.state is not None}
        for n, w in enumerate(writes):
            if last.get(w.user) == n:
                with current_event(w.src.event):  # the event's partition: the store and changelog partition
                    self.t.histories[w.user] = w.state
            self._delivered(w.user)

    # --- per batch (batcher's deliverer) --------------------------------------------------------------
    async def deliver(self, results: list[Result]) -> None:
        async with self._transaction():
            await self._deliver(results)

    async def _deliver(self, results: list[Result]) -> None:
        sent: list = []
        acks: list[tuple[Any, Any]] = []
        writes: list[Write] = []
        size = self.settings.activity_window_s
        for r in results:
            src: Source = r.request.ref
            user = r.request.user_id
            with current_event(src.event):
                p = self.pending.get(user)
                if p is None:  # not from handle() (tests, or a bug): the table has the state
                    p = self.pending[user] = Pending(decode_state(self.t.histories.get(user)), inflight=1)
                win = int(r.request.event_ts // 1000) // size  # the tumbling window of the event time
                if src.duplicate:  # a redelivery is not counted again
                    activity = p.state.activity.get(win, 0)
                else:
                    activity, p.dirty = count_activity(p.state.activity, win), True
                await self._deliver_one(r, src, p, activity, sent)
            state = None
            if p.dirty:  # the window as of this event (not of events read since), its prediction, the counts
                state = encode_state(UserState(src.after, p.state.last, p.state.seen, p.state.activity))
                p.dirty = src.after is not p.state.history  # events read since still to be written
            writes.append(Write(user, src, p, state))
            acks.append((src.stream, src.event))
        await self._ack_when_sent(sent, acks, writes)

    async def _deliver_one(self, r: Result, src: Source, pend: Pending, activity: int, sent: list) -> None:
        req, user = r.request, r.request.user_id
        key = user.encode()
        last = pend.state.last
        # A redelivered event that the stored prediction already covers: no outcome, no state change.
        replay = last is not None and last.covers(src.partition, src.offset)
        # An event older than the prediction the user last got did not happen *after* it: no outcome
        # (its gap would be negative, a wrong label for the trainer), and that prediction stays the one
        # the user's next event answers.
        late = last is not None and not replay and req.event_ts < last.event_ts
        if late:
            monitoring.EVENTS_LATE.inc()
        elif last is not None and not replay:
            sent.append(await self.publisher.send("outcomes", key, outcome_record(
                user, last, served=window.as_of(src.before, last.event_ts), action=src.action, item_id=src.item_id,
                category=src.category, event_ts=req.event_ts, partition=src.partition, offset=src.offset,
                item_text=src.item_text)))
            monitoring.OUTCOMES_OUT.inc()
        if r.prediction is None:
            sent.append(await self.dead_letter(src.raw, src.key, PREDICT_FAILED, r.error or "prediction failed",
                                               src))
            if not replay and not late and last is not None:  # the next outcome must not pair with an older one
                pend.state.last, pend.dirty = None, True
            return
        now = time.time()
        latency = now - req.arrival
        stored = StoredPrediction(r.version, req.event_ts, src.partition, src.offset, r.prediction)
        sent.append(await self.publisher.send("predictions", key, prediction_record(
            user, stored, latency_ms=latency * 1000.0, history_len=len(req.history), activity=activity,
            duplicate=src.duplicate, published_ms=int(now * 1000))))
        monitoring.PREDICTIONS_OUT.labels(label_parts(r.version)[0]).inc()  # the full version: bounded labels
        monitoring.EVENT_TO_PREDICTION.observe(latency)
        if not replay and not late:
            pend.state.last, pend.dirty = stored, True
