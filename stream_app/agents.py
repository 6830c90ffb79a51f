"""The agents: validate → state → (batch → predict) → outcome + prediction → publish → ack.

One agent, ``process_events`` (concurrency 1), reads ``events`` with manual acks. Per message:

1. :func:`~stream_app.events.parse_event`; a bad message goes to ``events.dlq`` (original bytes,
   reason, source topic/partition/offset) and is acked. Nothing raised by one message stops the
   worker: an unexpected error while updating state dead-letters that message with reason
   ``processing_failed``.
2. State, per event in the agent (never inside ``take()``, Faust issue #497): the user's history
   and the activity count of the current event-time window (``activity``).
   An event already in the history (same time, item and action: a redelivery after a restart, or
   a producer retry) is not added or counted again, so replays are idempotent for state.
3. A :class:`~stream_app.batcher.Request` with the history *as of that event* goes to the
   micro-batcher; the agent awaits while its queue is full (backpressure).

The batcher's deliverer (:meth:`Pipeline.deliver`, on the event loop, in event order per user):

4. if the user has a previous prediction, publishes an ``outcomes`` record:
   that prediction's summary and version, what happened next (action, item, gap, the rank the
   item had, the probability the action had) and a compact history tail for the online trainer;
5. publishes the prediction (or dead-letters the event with reason ``predict_failed``);
6. writes the user's ``histories`` entry — the window *and* this prediction's summary, one
   :class:`~stream_app.history.UserState` value, one changelog record — and only then acks the event.

Between 2 and 6 the user's state lives in :attr:`Pipeline.pending` (with a count of the user's
events in flight), so the next event of the same user sees it before it is written; the entry is
dropped when the last of them is delivered. Writing once per event at delivery, instead of the
history at 2 and the prediction in a table of its own at 6, saves a table read, a RocksDB write and
a changelog record per event.

Every worker also follows ``model-updates`` itself (:class:`~stream_app.updates.ModelUpdateListener`,
no consumer group, so each record reaches every worker; at start it applies the newest record, so a
restarted worker serves the fleet's current version). A record is ``{"version", "path", "sha256"}``
(``sha256`` = the checkpoint manifest's ``content_hash``; the served ``version`` is its first 12
hex digits; ``nextaction deploy <checkpoint>`` writes one) and hot-swaps the predictor: the new model is
loaded, verified and warmed up off the event loop (in the inference process, see
:mod:`stream_app.remote`, or the batcher's inference thread), then swapped in between batches,
so every prediction carries exactly one version. A bad update is logged (``!!!``), counted
(``nextaction_model_updates_total{result="rejected"}``) and the current model keeps serving.

Delivery guarantee: at-least-once. An offset is committed only after its event is acked, and Faust
flushes the producer before it commits, so every event's prediction or DLQ record is written
before its offset is. After a crash, events after the last commit are processed again: their
state updates are skipped (see 2), their outcome is not emitted again when the stored prediction
already covers them, but their prediction is published again (a duplicate with the same
``partition``/``offset``, which consumers can drop). A graceful stop (SIGTERM) waits until every
in-flight event is delivered and acked (``stream_wait_empty``), then commits: no duplicates.
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

import numpy as np
import orjson

from models.predictor import Predictor
from models.schema import ACTION_INDEX, ACTIONS, EventSeq
from stream_app import metrics
from stream_app.batcher import PREDICT_FAILED, Batcher, Request, Result
from stream_app.errors import CheckpointError, EventRejected
from stream_app.events import Event, dlq_record, parse_event
from stream_app.history import UserState, add_event, decode_value, encode_value
from stream_app.settings import SettingsType
from stream_app.updates import ModelUpdateListener

log = logging.getLogger(__name__)

#: DLQ reason of a message whose state update raised unexpectedly (a bug or a storage error).
PROCESSING_FAILED = "processing_failed"
#: Events of history sent with each outcome record (the trainer's context).
OUTCOME_TAIL = 32
#: Attribute set on each validated Faust event: its event time in seconds, read by
#: :func:`stream_app.app.event_time_s` (the activity window's time, on every table access).
EVENT_TS_ATTR = "nextaction_ts_s"


class Publisher(Protocol):
    """Where the pipeline's outputs go: ``kind`` is ``predictions``, ``outcomes`` or ``dlq``."""

    async def send(self, kind: str, key: bytes | None, value: bytes) -> None: ...


class KafkaPublisher:
    """Publishes through the Faust app's producer (flushed by Faust before every offset commit)."""

    def __init__(self, app: Any, topics: dict[str, str]) -> None:
        self.app, self.topics = app, topics

    async def send(self, kind: str, key: bytes | None, value: bytes) -> None:
        await self.app.producer.send(self.topics[kind], key, value, partition=None, timestamp=None, headers=None)


def default_predictor(settings: SettingsType) -> Predictor:
    """The predictor served at start: :func:`models.serving.load_predictor`.

    That is the checkpoint's Transformer (hash-verified, warmed up) when ``settings.checkpoint``
    loads; a missing, unset or bad checkpoint never stops the worker: ``load_predictor`` logs a loud
    ``!!!`` warning and serves the baseline :class:`~online.baseline.PopularityMarkovPredictor`
    (which learns from the stream). A wrong *setting* (``device=cuda`` without a GPU) raises
    :class:`~stream_app.errors.ConfigError`.
    """
    from online.baseline import PopularityMarkovPredictor  # noqa: PLC0415

    if settings.checkpoint is not None and settings.serve_process:
        from stream_app.remote import RemotePredictor  # noqa: PLC0415

        return RemotePredictor.start(settings)  # the child runs this function with serve_process off
    if settings.checkpoint is None:  # load_predictor's own answer, without importing torch (start-up -5 s)
        log.warning("!!! no model checkpoint configured (setting 'checkpoint' / NEXTACTION_CHECKPOINT is unset): "
                    "serving the BASELINE predictor (popularity + Markov), not the Transformer")
        return PopularityMarkovPredictor()
    try:
        from models.serving import load_predictor  # noqa: PLC0415 - imports torch
    except ImportError as exc:  # a worker without torch still serves the baseline
        log.warning("!!! models.serving cannot be imported (%s): FALLING BACK to the BASELINE predictor", exc)
        return PopularityMarkovPredictor()
    return load_predictor(settings)


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
    activity: int
    duplicate: bool


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


def history_contains(history: EventSeq, ev: Event) -> bool:
    """Is this exact event (time, item, action) already in the history?

    >>> h = EventSeq.from_columns(["a", "b"], ["view", "cart"], [1, 2])
    >>> history_contains(h, Event("u", "b", "cart", 2)), history_contains(h, Event("u", "b", "view", 2))
    (True, False)
    """
    lo = int(np.searchsorted(history.ts, ev.ts, side="left"))
    hi = int(np.searchsorted(history.ts, ev.ts, side="right"))
    a = ACTION_INDEX[ev.action]
    return any(history.items[i] == ev.item_id and int(history.actions[i]) == a for i in range(lo, hi))


def history_as_of(history: EventSeq, ts: int) -> EventSeq:
    """The events up to and including time ``ts`` (the context a prediction for that event sees)."""
    end = int(np.searchsorted(history.ts, ts, side="right"))
    return history if end == len(history) else history[:end]


def reset_root_log_level(level_name: str) -> None:
    """Undo Faust's root logger at DEBUG when the worker runs with ``-l warn``/``error``/``crit``.

    With a level of WARN or above, Faust keeps its terminal spinner and sets the *root* logger to
    DEBUG, so every ``log.debug`` in aiokafka/faust builds a LogRecord: measured +28 % worker CPU
    per event. Unless the configured level is ``debug``, the root logger is raised to at least INFO.
    """
    root = logging.getLogger()
    if str(level_name).lower() != "debug" and root.level < logging.INFO:
        root.setLevel(logging.INFO)


def freeze_heap() -> None:
    """Move everything allocated during start-up (Faust, aiokafka, the model, torch) out of the
    garbage collector's reach (``gc.freeze``): the per-event garbage is young and short-lived, but
    every full collection would otherwise traverse the whole start-up heap again."""
    gc.collect()
    gc.freeze()


def _same_version(predictor: Any, sha256: str) -> bool:
    version = str(getattr(predictor, "version", ""))
    return len(version) >= 8 and sha256.lower().startswith(version.lower())


def build_successor(current: Any, path: str, sha256: str | None, settings: SettingsType) -> Predictor:
    """Load, verify and warm up the checkpoint at ``path`` (runs in the inference thread).

    A Transformer already serving builds its successor with the same serving options
    (:meth:`~models.serving.TransformerPredictor.successor`, empty KV cache); the baseline builds a
    Transformer from the settings' serving options. Raises on any problem; the caller keeps
    ``current``.
    """
    from models.checkpoint import read_manifest  # noqa: PLC0415 - torch only when a model is used
    from models.serving import TransformerPredictor, serving_options  # noqa: PLC0415

    if sha256 is not None:
        actual = str(read_manifest(path)["content_hash"])  # files are hash-checked by the load below
        if actual.lower() != sha256.lower():
            raise CheckpointError(f"checkpoint {path!r} has content hash {actual}, the update announced {sha256}")
    if hasattr(current, "successor"):
        new = current.successor(path)
    elif settings.serve_process:  # the baseline served in-process so far: start the inference process
        from stream_app.remote import RemotePredictor  # noqa: PLC0415

        new = RemotePredictor.start(settings.model_copy(update={"checkpoint": Path(path)}))
    else:
        new = TransformerPredictor.from_checkpoint(path, **serving_options(settings))
    if sha256 is not None and not sha256.lower().startswith(str(new.version).lower()):  # changed while loading
        raise CheckpointError(f"checkpoint {path!r} loaded as version {new.version}, the update announced {sha256}")
    new.warm_up()
    return new


class Pipeline:
    """Per-event processing and batched delivery for one app (see the module docstring)."""

    def __init__(self, app: Any, topology: Any, predictor_factory: Callable[[SettingsType], Predictor],
                 publisher: Publisher | None) -> None:
        self.app, self.t, self.settings = app, topology, topology.settings
        s = self.settings
        self.predictor_factory = predictor_factory
        self.publisher = publisher or KafkaPublisher(app, {"predictions": s.topic_predictions,
                                                            "outcomes": s.topic_outcomes, "dlq": s.topic_dlq})
        self.batcher: Batcher | None = None
        #: user → state of the users with events in flight (see the module docstring)
        self.pending: dict[str, Pending] = {}
        self._verified_topics: set[str] = set()
        self._watch: asyncio.Task | None = None
        self.ttl_ms = s.window_ttl_s * 1000
        self.parse_kw = dict(max_bytes=s.max_event_bytes, max_future_skew_ms=s.max_future_skew_s * 1000,
                             max_age_ms=s.max_event_age_s * 1000)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start_batcher(self) -> Batcher:
        if self.batcher is None:
            s = self.settings
            reset_root_log_level(s.log_level)
            metrics.watch_gc()
            sys.setswitchinterval(s.gil_switch_interval_ms / 1000.0)
            self.app.producer.buffer.max_messages = s.producer_buffer_max_messages  # before Faust pauses the stream
            predictor = self.predictor_factory(s)
            log.info("serving predictor %s (max_batch=%d, max_wait_ms=%s, queue=%d)", predictor.version,
                     s.max_batch, s.max_wait_ms, s.predict_queue)
            self.batcher = Batcher(predictor, self.deliver, k=s.top_k, max_batch=s.max_batch,
                                   max_wait_ms=s.max_wait_ms, max_queue=s.predict_queue)
            await self.batcher.start()
            if s.gc_freeze:
                freeze_heap()
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
            close = getattr(batcher.predictor, "close", None)
            if close is not None:  # the inference process (stream_app.remote)
                close()

    # --- model updates (called by stream_app.updates.ModelUpdateListener) ---------------------------------
    async def handle_model_update(self, value: bytes | None) -> str:
        """Hot-swap to the checkpoint a ``model-updates`` record names; returns what happened.

        The record is ``{"version", "path", "sha256"}`` (orjson). The new predictor is loaded,
        hash-verified and warmed up **in the batcher's inference thread** (never on the event loop,
        and never concurrently with a batch: one thread owns the model), then
        :meth:`Batcher.swap` serves it from the next batch on. Any problem (malformed record,
        missing or corrupt checkpoint, a content hash other than the record's ``sha256``, a model
        that produces non-finite outputs) is logged and counted, and the current predictor keeps
        serving. A record for the version already served is skipped (a redelivery).
        """
        try:
            rec = orjson.loads(value) if value is not None else None
            if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not rec["path"]:
                raise ValueError("expected a JSON object with a non-empty string 'path'")
            version = None if rec.get("version") is None else str(rec["version"])
            sha = rec.get("sha256")
            if sha is not None and (not isinstance(sha, str) or not sha):
                raise ValueError(f"'sha256' must be a hex string (got {sha!r})")
        except (orjson.JSONDecodeError, ValueError) as exc:
            log.error("model update rejected: bad record %r: %s", (value or b"")[:200], exc)
            metrics.MODEL_UPDATES.labels("rejected").inc()
            return "rejected:bad_record"
        batcher = await self.start_batcher()
        current = batcher.predictor
        if sha is not None and _same_version(current, sha):
            log.info("model update %s (%s): already serving %s, skipped", version, rec["path"], current.version)
            metrics.MODEL_UPDATES.labels("skipped").inc()
            return "skipped"
        t0 = time.perf_counter()
        try:
            new = await batcher.run_in_executor(build_successor, current, rec["path"], sha, self.settings)
        except Exception as exc:  # noqa: BLE001 - a bad update must never stop the worker
            log.error("!!! model update %s (%s) rejected, still serving %s: %s: %s", version, rec["path"],
                      current.version, type(exc).__name__, exc)
            metrics.MODEL_UPDATES.labels("rejected").inc()
            return "rejected:" + type(exc).__name__
        batcher.swap(new)
        metrics.MODEL_UPDATES.labels("applied").inc()
        log.info("model update %s applied: %s -> %s from %s (loaded in %.2f s)", version, current.version,
                 new.version, rec["path"], time.perf_counter() - t0)
        return f"swapped:{new.version}"

    # --- per event (agent) --------------------------------------------------------------------------
    async def handle(self, event: Any, stream: Any) -> str:
        """Process one message; returns what happened (``queued``, ``duplicate``, ``rejected:<reason>``)."""
        arrival = time.time()
        metrics.EVENTS_IN.inc()
        msg = event.message
        raw, key = event.value, event.key
        try:
            ev = parse_event(raw, now_ms=int(arrival * 1000), key=key if key is not None else b"", **self.parse_kw)
        except EventRejected as exc:
            await self.dead_letter(raw, key, exc.reason, str(exc), msg)
            await stream.ack(event)
            return f"rejected:{exc.reason}"
        setattr(event, EVENT_TS_ATTR, ev.ts / 1000.0)  # the activity window's event time, parsed once
        if msg.topic not in self._verified_topics:
            await self._wait_for_changelogs(msg.topic)
        try:
            history, activity, duplicate = self.update_state(ev)
        except Exception as exc:  # noqa: BLE001 - dead-letter, keep the worker alive
            log.exception("state update failed for %s[%s]@%s", msg.topic, msg.partition, msg.offset)
            await self.dead_letter(raw, key, PROCESSING_FAILED, f"{type(exc).__name__}: {exc}", msg)
            await stream.ack(event)
            return f"rejected:{PROCESSING_FAILED}"
        src = Source(event, stream, msg.topic, msg.partition, msg.offset, raw, key, ev.item_id, ev.action,
                     activity, duplicate)
        try:
            await self.batcher.submit(Request(ev.user_id, history, ev.ts, arrival, observe=not duplicate, ref=src))
        except BaseException:  # never delivered: the user's pending entry must not wait for it
            self._delivered(ev.user_id)
            raise
        return "duplicate" if duplicate else "queued"

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
        for table in tables:
            name = table.changelog_topic_name
            n = len(await asyncio.wait_for(producer.partitions_for(name), timeout))
            if n != source_n:
                raise PartitionsMismatch(f"table {table.name!r}: changelog topic {name!r} has {n} partitions, "
                                         f"source topic {source_topic!r} has {source_n}; they must be equal")
            table._verified_source_topics_for_partitions.add(source_topic)
        # Also fetch the output topics' metadata now: otherwise the first outcome / DLQ record waits
        # for a metadata round trip inside the deliverer, and every delivery behind it waits too.
        for kind in ("predictions", "outcomes", "dlq"):
            topic = getattr(self.publisher, "topics", {}).get(kind)
            if topic is not None:
                await asyncio.wait_for(producer.partitions_for(topic), timeout)
        self._verified_topics.add(source_topic)

    def update_state(self, ev: Event) -> tuple[EventSeq, int, bool]:
        """Add the event to the user's history and activity count; return (history as of it, count, dup).

        The history goes to :attr:`pending` (written to ``histories`` at delivery, with the prediction).
        """
        s = self.settings
        p = self.pending.get(ev.user_id)
        if p is None:
            p = Pending(decode_value(self.t.histories.get(ev.user_id)))
        history = p.state.history
        duplicate = history_contains(history, ev)
        window = self.t.activity[ev.user_id]
        if duplicate:
            metrics.EVENTS_DUPLICATE.inc()
        else:
            history = add_event(history, ev.item_id, ev.action, ev.ts, max_events=s.window_events,
                                ttl_ms=self.ttl_ms, device=ev.device, location=ev.location, category=ev.category)
            window += 1
            p.state.history, p.dirty = history, True
        out = history_as_of(history, ev.ts), int(window.value()), duplicate
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
        metrics.EVENTS_REJECTED.labels(reason).inc()
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
                        p = self.pending[user] = Pending(decode_value(self.t.histories.get(user)), inflight=1)
                    await self._deliver_one(r, src, p)
                    if p.dirty:  # the window and the latest prediction: one write, one changelog record
                        self.t.histories[user] = encode_value(p.state)
                        p.dirty = False
            finally:
                self._delivered(user)
            await src.stream.ack(src.event)

    async def _deliver_one(self, r: Result, src: Source, pend: Pending) -> None:
        req, user = r.request, r.request.user_id
        key = user.encode()
        last = pend.state.last
        # A redelivered event that the stored prediction already covers: no outcome, no state change.
        replay = last is not None and last["partition"] == src.partition and last["offset"] >= src.offset
        if last is not None and not replay:
            await self.publisher.send("outcomes", key, self.outcome_record(last, req, src))
            metrics.OUTCOMES_OUT.inc()
        p = r.prediction
        if p is None:
            await self.dead_letter(src.raw, src.key, PREDICT_FAILED, r.error or "prediction failed",
                                   src.event.message)
            if not replay and last is not None:  # the next outcome must not pair with an older one
                pend.state.last, pend.dirty = None, True
            return
        now = time.time()
        latency = now - req.arrival
        record = {
            "user_id": user, "event_ts": req.event_ts, "model_version": r.version,
            "action_probs": p.action_dict(), "top_items": [[i, s] for i, s in p.top_items],
            "next_gap_s": p.next_gap_s, "latency_ms": round(latency * 1000.0, 3),
            "history_len": len(req.history), "activity": src.activity,
            "partition": src.partition, "offset": src.offset, "duplicate": src.duplicate,
            "published_ms": int(now * 1000),
        }
        if p.explanation:
            record["explanation"] = p.explanation
        await self.publisher.send("predictions", key, orjson.dumps(record))
        metrics.PREDICTIONS_OUT.labels(r.version).inc()
        metrics.EVENT_TO_PREDICTION.observe(latency)
        if not replay:
            pend.state.last = {"v": r.version, "event_ts": req.event_ts, "partition": src.partition,
                               "offset": src.offset, "p": p.action_probs, "top": [[i, s] for i, s in p.top_items],
                               "gap": p.next_gap_s}
            pend.dirty = True

    @staticmethod
    def outcome_record(last: dict, req: Request, src: Source) -> bytes:
        """The previous prediction (context) and what the user did next (target)."""
        ranks = {item: n for n, (item, _) in enumerate(last["top"], start=1)}
        action_i = ACTION_INDEX[src.action]
        return orjson.dumps({
            "user_id": req.user_id,
            "context": {"model_version": last["v"], "event_ts": last["event_ts"],
                        "action_probs": dict(zip(ACTIONS, last["p"])), "top_items": last["top"],
                        "next_gap_s": last["gap"], "partition": last["partition"], "offset": last["offset"]},
            "happened": {"action": src.action, "item_id": src.item_id, "ts": req.event_ts,
                         "gap_s": (req.event_ts - last["event_ts"]) / 1000.0,
                         "item_rank": ranks.get(src.item_id), "action_prob": last["p"][action_i]},
            "history_len": len(req.history),
            "history_tail": req.history.tail(OUTCOME_TAIL).to_json(),
            "partition": src.partition, "offset": src.offset,
        })


def install(app: Any, topology: Any, *, predictor_factory: Callable[[SettingsType], Predictor] | None = None,
             publisher: Publisher | None = None) -> Pipeline:
    """Register the agent, the ``/metrics`` page and the shutdown hook on ``app``."""
    pipeline = Pipeline(app, topology, predictor_factory or default_predictor, publisher)
    app.pipeline = pipeline

    @app.agent(topology.events, name="process_events", concurrency=1)
    async def process_events(stream):
        """Validate, update state, queue for prediction. Yields what happened to each message."""
        await pipeline.start_batcher()
        manual = stream.noack()
        async for event in manual.events():
            yield await pipeline.handle(event, manual)

    listener = ModelUpdateListener(topology.settings, pipeline.handle_model_update,
                                   catch_up=topology.settings.model_updates_catch_up)
    pipeline.model_updates = listener

    @app.task
    async def follow_model_updates():
        """Every worker follows ``model-updates`` itself (no consumer group): see stream_app.updates."""
        await listener.run()

    @app.page("/metrics")
    async def prometheus_metrics(web, request):
        body, content_type = metrics.render()
        return web.bytes(body, content_type=content_type)

    @app.on_before_shutdown.connect
    async def _stop_batcher(app_, **kwargs):  # after Faust waited for in-flight events (stream_wait_empty)
        await pipeline.stop_batcher()

    pipeline.agent = process_events
    return pipeline
