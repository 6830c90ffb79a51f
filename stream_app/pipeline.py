"""The pipeline behind the agent: validate → state → (batch → predict) → outcome + prediction → publish → ack.

Per message, in the agent (:meth:`Pipeline.handle`, concurrency 1, manual acks):

1. :func:`~stream_app.events.parse_event`; a bad message goes to ``events.dlq`` with its reason and
   is acked. An unexpected error while updating state dead-letters that one message
   (``processing_failed``): nothing raised by one message stops the worker.
   A valid event whose key belongs to another partition (:mod:`stream_app.partitioning`) is forwarded
   there through the repartition topic instead, and acked once the broker has it
   (:meth:`Pipeline.reroute`); it comes back through ``process_rerouted`` and continues here, its
   records naming its original topic, partition and offset (:class:`Origin`).
2. State, per event (never inside ``take()``, Faust issue #497): the user's window and the activity
   count of the event-time window. An event already in the window (a redelivery) is not added or
   counted again.
3. A :class:`~stream_app.batcher.Request` with the window *as of that event* goes to the
   micro-batcher; the agent awaits while its queue is full (backpressure).

Per batch, in the batcher's deliverer (:meth:`Pipeline.deliver`, in event order per user): the
``outcomes`` record for the user's previous prediction, the prediction (or a ``predict_failed``
dead letter), then one write of the user's state (window + this prediction: one changelog record),
then the ack. Between 2 and the write the user's state waits in :attr:`Pipeline.pending`, where
the user's next event in flight finds it.

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
from typing import Any, Callable, Protocol

import orjson

from models.delta import ModelDelta, label_parts
from models.predictor import Predictor
from models.schema import EventSeq
from stream_app import history as window
from stream_app import monitoring, partitioning, predictors, runtime
from stream_app.batcher import PREDICT_FAILED, Batcher, Request, Result
from stream_app.errors import EventRejected
from stream_app.events import EVENT_TS_ATTR, Event, parse_event
from stream_app.records import (DELTA, ModelUpdate, StoredPrediction, UserState, decode_state, dlq_record, encode_state,
                                outcome_record, prediction_record)
from stream_app.remote import RemotePredictor
from stream_app.settings import SettingsType

log = logging.getLogger(__name__)

#: DLQ reason of a message whose state update raised unexpectedly (a bug or a storage error).
PROCESSING_FAILED = "processing_failed"
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
    """Where the pipeline's outputs go: ``kind`` is ``predictions``, ``outcomes`` or ``dlq``."""

    async def send(self, kind: str, key: bytes | None, value: bytes) -> None: ...


class KafkaPublisher:
    """Publishes through the Faust app's producer (flushed by Faust before every offset commit).
    ``topics`` maps each kind to its topic name."""

    def __init__(self, app: Any, topics: dict[str, str]) -> None:
        self.app, self.topics = app, topics

    async def send(self, kind: str, key: bytes | None, value: bytes) -> None:
        await self.app.producer.send(self.topics[kind], key, value, partition=None, timestamp=None, headers=None)


@dataclass(slots=True, eq=False)
class Pending:
    """A user's state between an event's state update and its delivery (:attr:`Pipeline.pending`)."""

    state: UserState
    inflight: int = 0  # the user's events submitted and not yet delivered
    dirty: bool = False  # changed since the table last got it


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
    activity: int
    duplicate: bool
    before: EventSeq  # the user's window before this event joined it: the previous prediction's context


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
        self.publisher = publisher or KafkaPublisher(app, self.topics)
        self.batcher: Batcher | None = None
        #: user → state of the users with events in flight (see the module docstring)
        self.pending: dict[str, Pending] = {}
        self._verified_topics: set[str] = set()
        self._partition_counts: dict[str, int] = {}  # source topic → its partition count
        self._forwards: set[asyncio.Task] = set()  # re-routed events whose forward is not yet confirmed
        self._starting = asyncio.Lock()  # two agents start the one batcher
        self.rerouted_agent: Any = None  # the agent of the repartition topic (stream_app.agents)
        self._update_n: int | None = None  # the number of the last trainer record applied (monotonic)
        self._watch: asyncio.Task | None = None
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
            if s.gc_freeze:
                runtime.freeze_heap()
            self._watch = asyncio.ensure_future(self._watch_batcher(self.batcher))
        return self.batcher

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
        outputs) is logged and counted, and the current predictor keeps serving. An update naming
        the version already served is skipped (a redelivery).
        """
        try:
            update = ModelUpdate.decode(value)
        except ValueError as exc:
            log.error("model update rejected: bad record %r: %s", (value or b"")[:200], exc)
            monitoring.MODEL_UPDATES.labels("rejected").inc()
            return "rejected:bad_record"
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
        rerouted = self.t.repartition is not None and msg.topic == self.settings.topic_repartition
        origin = Origin.of(msg) if rerouted else None
        # A re-routed event counts, validates and measures latency from its first arrival; its records
        # name where it first arrived (``at``).
        arrival = origin.arrival if origin is not None else time.time()
        at = origin if origin is not None else msg
        if not rerouted:
            monitoring.EVENTS_IN.inc()
        raw, key = event.value, event.key
        try:
            ev = parse_event(raw, now_ms=int(arrival * 1000), key=key if key is not None else b"", **self.parse_kw)
        except EventRejected as exc:
            await self.dead_letter(raw, key, exc.reason, str(exc), at)
            await stream.ack(event)
            return f"rejected:{exc.reason}"
        setattr(event, EVENT_TS_ATTR, ev.ts / 1000.0)  # the activity window's event time, parsed once
        if msg.topic not in self._verified_topics:
            await self._wait_for_changelogs(msg.topic)
        if self.t.repartition is not None and not rerouted:
            owner = partitioning.owner(key, self._partition_counts.get(msg.topic, self.settings.partitions))
            if owner != msg.partition:
                await self.reroute(event, stream, owner, Origin(msg.topic, msg.partition, msg.offset, arrival))
                return "rerouted"
        try:
            history, before, activity, duplicate = self.update_state(ev)
        except Exception as exc:  # noqa: BLE001 - dead-letter, keep the worker alive
            log.exception("state update failed for %s[%s]@%s", msg.topic, msg.partition, msg.offset)
            await self.dead_letter(raw, key, PROCESSING_FAILED, f"{type(exc).__name__}: {exc}", at)
            await stream.ack(event)
            return f"rejected:{PROCESSING_FAILED}"
        src = Source(event, stream, at.topic, at.partition, at.offset, raw, key, ev.item_id, ev.action,
                     ev.category, activity, duplicate, before)
        try:
            await self.batcher.submit(Request(ev.user_id, history, ev.ts, arrival, observe=not duplicate, ref=src))
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
        task = asyncio.ensure_future(self._ack_when_sent(sent, event, stream))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def forward(self, topic: str, key: bytes | None, value: bytes | None, partition: int,
                      timestamp: float | None, headers: list) -> Any:
        """Queue one record on the app's producer; returns the awaitable of its delivery."""
        return await self.app.producer.send(topic, key, value, partition=partition, timestamp=timestamp,
                                            headers=headers)

    async def _ack_when_sent(self, sent: Any, event: Any, stream: Any) -> None:
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
        await stream.ack(event)

    async def _wait_for_changelogs(self, source_topic: str, timeout: float = 60.0) -> None:
        """Check once per source topic that every table's changelog has the source's partition count.

        Faust does this check itself on a table's first write, but reads the partition counts from
        the consumer's subscription snapshot, which can keep a changelog topic that Faust created a
        moment earlier at 0 partitions for the whole run ("Ignoring missing topic" at start). The
        first write then raises ``PartitionsMismatch``, which would dead-letter valid events or stop
        the batcher. So the counts are read here from the producer's cluster metadata (refreshed
        on demand) and the tables marked as verified; a real mismatch still raises. The output
        topics' metadata is fetched here too, before the first delivery needs it.
        """
        from faust.exceptions import PartitionsMismatch

        tables = (self.t.histories, self.t.activity.table)
        if self.app.consumer.topic_partitions(source_topic) is None:  # no broker (agent.test_context())
            self._verified_topics.add(source_topic)
            return
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
        self._verified_topics.add(source_topic)

    def update_state(self, ev: Event) -> tuple[EventSeq, EventSeq, int, bool]:
        """Add the event to the user's window and activity count; return (window as of the event, the
        window before it joined, count, duplicate).

        The window goes to :attr:`pending` (written to ``histories`` at delivery, with the prediction).
        """
        s = self.settings
        p = self.pending.get(ev.user_id)
        if p is None:
            p = Pending(decode_state(self.t.histories.get(ev.user_id)))
        history = before = p.state.history
        duplicate = window.contains(history, ev.item_id, ev.action, ev.ts)
        activity = self.t.activity[ev.user_id]
        if duplicate:
            monitoring.EVENTS_DUPLICATE.inc()
        else:
            history = window.add_event(history, ev.item_id, ev.action, ev.ts, max_events=s.window_events,
                                ttl_ms=self.ttl_ms, device=ev.device, location=ev.location, category=ev.category)
            activity += 1
            p.state.history, p.dirty = history, True
        out = window.as_of(history, ev.ts), before, int(activity.value()), duplicate
        p.inflight += 1  # last: from here on, the request is submitted (or _delivered undoes this)
        self.pending[ev.user_id] = p
        return out

    def _delivered(self, user: str) -> None:
        p = self.pending.get(user)
        if p is not None:
            p.inflight -= 1
            if p.inflight <= 0:
                del self.pending[user]

    async def dead_letter(self, raw: bytes | None, key: bytes | None, reason: str, detail: str, msg: Any) -> None:
        monitoring.EVENTS_REJECTED.labels(reason).inc()
        await self.publisher.send("dlq", key, dlq_record(raw, reason, detail, topic=msg.topic,
                                                         partition=msg.partition, offset=msg.offset, key=key))

    # --- per batch (batcher's deliverer) --------------------------------------------------------------
    async def deliver(self, results: list[Result]) -> None:
        for r in results:
            src: Source = r.request.ref
            user = r.request.user_id
            try:
                with current_event(src.event):
                    p = self.pending.get(user)
                    if p is None:  # not from handle() (tests, or a bug): the table has the state
                        p = self.pending[user] = Pending(decode_state(self.t.histories.get(user)), inflight=1)
                    await self._deliver_one(r, src, p)
                    if p.dirty:  # the window and the latest prediction: one write, one changelog record
                        self.t.histories[user] = encode_state(p.state)
                        p.dirty = False
            finally:
                self._delivered(user)
            await src.stream.ack(src.event)

    async def _deliver_one(self, r: Result, src: Source, pend: Pending) -> None:
        req, user = r.request, r.request.user_id
        key = user.encode()
        last = pend.state.last
        # A redelivered event that the stored prediction already covers: no outcome, no state change.
        replay = last is not None and last.covers(src.partition, src.offset)
        if last is not None and not replay:
            await self.publisher.send("outcomes", key, outcome_record(
                user, last, served=window.as_of(src.before, last.event_ts), action=src.action, item_id=src.item_id,
                category=src.category, event_ts=req.event_ts, partition=src.partition, offset=src.offset))
            monitoring.OUTCOMES_OUT.inc()
        if r.prediction is None:
            await self.dead_letter(src.raw, src.key, PREDICT_FAILED, r.error or "prediction failed", src)
            if not replay and last is not None:  # the next outcome must not pair with an older one
                pend.state.last, pend.dirty = None, True
            return
        now = time.time()
        latency = now - req.arrival
        stored = StoredPrediction(r.version, req.event_ts, src.partition, src.offset, r.prediction)
        await self.publisher.send("predictions", key, prediction_record(
            user, stored, latency_ms=latency * 1000.0, history_len=len(req.history), activity=src.activity,
            duplicate=src.duplicate, published_ms=int(now * 1000)))
        monitoring.PREDICTIONS_OUT.labels(label_parts(r.version)[0]).inc()  # the full version: bounded labels
        monitoring.EVENT_TO_PREDICTION.observe(latency)
        if not replay:
            pend.state.last, pend.dirty = stored, True
