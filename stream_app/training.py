"""The online trainer as a service: ``outcomes`` in, ``model-updates`` out (``nextaction trainer``).

One trainer is **active** per app (``app_id``): trainers join one consumer group on a one-partition
lease topic (``<app_id>.trainer-lease``), and the member holding its partition learns and publishes;
the others wait as hot standbys and take over when the active one leaves or dies (after the group's
session timeout). So a fleet runs one trainer per GPU/CPU node it can spare, and only one writes.

The active trainer (logic: :class:`online.trainer.OnlineTrainer`):

1. **resumes its lineage** from ``model-updates`` (:func:`full_records`): the
   newest full record names the checkpoint to continue from, and that checkpoint's metadata holds
   the ``outcomes`` offsets it learned up to (``online.offsets``) and how many examples the lineage
   learned (``online.examples``). Deltas published after it by a trainer that died are superseded
   by re-announcing that checkpoint (``reason: reset``), so the workers drop them and every example
   after the offsets is learned exactly once in the lineage they serve. Without any full record it
   announces ``settings.checkpoint`` and starts at the beginning of ``outcomes``
   (``trainer_start``);
2. reads ``outcomes`` (a group-less consumer assigned to every partition, so its offsets are the
   ones recorded with the versions, not a group's), learns in batches, and every
   ``trainer_delta_interval_s`` publishes the rows it changed as deltas (bytes on the topic);
3. every ``trainer_full_every_examples`` examples or ``trainer_full_every_s`` seconds saves a full
   checkpoint under ``models_dir`` (storage every worker can read: a shared volume in production)
   and announces it (``reason: online``); records are numbered (``n``) and the numbers only grow;
4. rolls the fleet back to the last good full version when the served models score worse than the
   frozen shadow by ``trainer_rollback_margin`` (``reason: rollback``);
5. drops a user's examples (read and not learned yet, and in the replay buffer) at a forget marker
   on ``outcomes`` (:func:`stream_app.records.forget_marker`; docs/privacy.md), counted in
   ``nextaction_online_forgotten_examples_total{where}``.

Metrics on ``/metrics`` at ``web_bind:trainer_port``; a summary line in the log every 10 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Callable

import orjson

from models.errors import ConfigError
from online.dedupe import RecentIds
from stream_app import monitoring
from stream_app.kafka_admin import ensure_topics_async, start_client
from stream_app.kafka_security import client_kwargs
from stream_app.records import DELTA, FULL, KIND_HEADER, ModelUpdate, forget_user_of, update_kind
from stream_app.settings import SettingsType
from stream_app.updates import SCAN_CHUNK, UpdateRejected, admit, checkpoint_roots, read_range

log = logging.getLogger(__name__)

#: ``Settings`` field → ``online.trainer.OnlineConfig`` field.
ONLINE_OPTIONS = {"trainer_dense_lr": "dense_lr", "trainer_sparse_lr": "sparse_lr",
                  "trainer_replay_ratio": "replay_ratio", "trainer_max_new_items": "max_new_items",
                  "trainer_user_per_minute": "user_per_minute", "trainer_rollback_window": "shadow_window",
                  "trainer_rollback_margin": "shadow_margin", "trainer_rollback_min": "shadow_min",
                  "text_items": "text_items"}


def online_config(settings: SettingsType):
    """The trainer's :class:`~online.trainer.OnlineConfig` from ``settings`` (:data:`ONLINE_OPTIONS`)."""
    from online.trainer import OnlineConfig  # noqa: PLC0415 - imports torch

    return OnlineConfig(**{field: getattr(settings, name) for name, field in ONLINE_OPTIONS.items()})


async def full_records(consumer: Any, tps: list, ends: dict) -> AsyncIterator[Any]:
    """The ``model-updates`` full records of ``tps`` newest first (by record time), read back from
    each partition's end in chunks of :data:`~stream_app.updates.SCAN_CHUNK`, lazily: a caller that
    stops at the first record it can use reads no further back."""
    hi = {tp: ends[tp] for tp in tps}
    found: dict[Any, list] = {tp: [] for tp in tps}  # per partition, oldest first (pop() gives the newest)
    while True:
        for tp in tps:
            while not found[tp] and hi[tp] > 0:
                lo = max(0, hi[tp] - SCAN_CHUNK)
                found[tp] = [r for r in await read_range(consumer, tp, lo, hi[tp]) if update_kind(r.headers) == FULL]
                hi[tp] = lo
        heads = [tp for tp in tps if found[tp]]
        if not heads:
            return
        yield found[max(heads, key=lambda tp: found[tp][-1].timestamp)].pop()


def load_full(rec: Any, roots: list[Path], device: str) -> tuple[Any, Any]:
    """``(update, checkpoint)`` for the full record ``rec`` if the trainer may continue from it: the
    workers' checks (:func:`stream_app.updates.admit`: a ``sha256``, a path under the checkpoint roots),
    then the checkpoint loaded (every file checked against its manifest) and its content hash equal to
    the announced one. Else :class:`~stream_app.updates.UpdateRejected`: ``admit``'s reasons,
    ``checkpoint_unreadable`` (missing or corrupt files) or ``hash_mismatch``."""
    from models.checkpoint import load_checkpoint  # noqa: PLC0415 - imports torch
    from models.errors import CheckpointError  # noqa: PLC0415

    update = admit(rec.value, roots)
    try:
        ck = load_checkpoint(update.path, device=device)
    except (CheckpointError, OSError) as exc:
        raise UpdateRejected("checkpoint_unreadable", f"{update.path!r}: {exc}") from None
    if ck.content_hash.lower() != update.sha256.lower():
        raise UpdateRejected("hash_mismatch", f"{update.path!r} has content hash {ck.content_hash}, the record "
                                              f"announced {update.sha256}")
    return update, ck


async def choose_full(candidates: AsyncIterable[Any], load: Callable[[Any], Any]
                      ) -> tuple[Any, Any, list[tuple[Any, UpdateRejected]]]:
    """``(record, load(record), rejected)``: the first of ``candidates`` (full records, newest first)
    that ``load`` accepts, and the ``(record, UpdateRejected)`` of those it refused before it; the
    record and its load are ``None`` when it refused every one (or there was none)."""
    rejected: list[tuple[Any, UpdateRejected]] = []
    async for rec in candidates:
        try:  # in a thread: a checkpoint load takes seconds, and the loop carries the lease's heartbeats
            return rec, await asyncio.to_thread(load, rec), rejected
        except UpdateRejected as exc:
            rejected.append((rec, exc))
    return None, None, rejected


@dataclass
class Lineage:
    """Where the trainer stands on ``model-updates``: the full version its model is, and the counters."""

    path: Path
    sha256: str
    n: int  # the number of the last record published (by anyone) on the topic
    next_seq: int  # the next delta number (above any on the topic)
    offsets: dict[int, int] | None  # outcomes offsets learned up to (None: not recorded)
    examples: int  # examples the lineage learned
    timestamp_ms: int  # the full record's time


class Lease:
    """Membership of the trainers' group on the one-partition lease topic; ``active`` while this
    member holds the partition.

    The group uses the sticky assignor, so a standby joining (a rebalance) leaves the partition with
    the member that holds it. Kafka's rebalance still revokes it for a moment: the holder pauses
    (:meth:`hold`) and goes on when it gets it back; it is ``lost`` only when the partition went to
    another member (then that member resumes from the topic, and this one must stop)."""

    def __init__(self, settings: SettingsType) -> None:
        self.settings = settings
        self.topic = f"{settings.app_id}.trainer-lease"
        self.active = asyncio.Event()
        self.held = False  # this member has held the lease
        self.lost = False
        self.consumer = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer  # noqa: PLC0415
        from aiokafka.abc import ConsumerRebalanceListener  # noqa: PLC0415
        from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor  # noqa: PLC0415

        lease = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                lease.active.clear()

            async def on_partitions_assigned(self, assigned):
                if assigned:
                    lease.held = True
                    lease.active.set()
                elif lease.held:
                    lease.lost = True

        await ensure_topics_async(self.settings, [self.topic], partitions=1)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers, **client_kwargs(self.settings),
                                         group_id=f"{self.settings.app_id}-trainer", enable_auto_commit=False,
                                         session_timeout_ms=int(self.settings.trainer_lease_timeout_s * 1000),
                                         heartbeat_interval_ms=int(self.settings.trainer_lease_timeout_s * 1000 / 3),
                                         partition_assignment_strategy=(StickyPartitionAssignor,),
                                         client_id=f"{self.settings.app_id}-trainer")
        await start_client(self.settings, self.consumer.start, self.consumer.stop)
        self.consumer.subscribe([self.topic], listener=Listener())

    async def wait(self) -> None:
        """Until this member holds the lease (polling keeps the membership alive)."""
        while not self.active.is_set():
            await self.poll()
            await asyncio.sleep(0.2)

    async def hold(self) -> None:
        """Keep the membership alive; return while this member holds the lease (waiting out a
        rebalance); raise when it went to another member."""
        await self.poll()
        while not self.active.is_set() and not self.lost:
            await asyncio.sleep(0.1)
            await self.poll()
        if self.lost:
            raise RuntimeError("the trainer lost its lease (another trainer is active now): stopping")

    async def poll(self) -> None:
        await self.consumer.getmany(timeout_ms=0)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


def _import_model_code() -> None:
    """Import torch and the model code (seconds on a busy CPU), off the event loop."""
    import models.checkpoint  # noqa: F401, PLC0415
    import online.trainer  # noqa: F401, PLC0415


class TrainingService:
    """See the module docstring. ``run()`` until cancelled."""

    def __init__(self, settings: SettingsType) -> None:
        self.settings = settings
        self.topic = settings.topic_model_updates
        self.models_dir = Path(settings.models_dir or Path(settings.data_dir) / "models").expanduser().absolute()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nextaction-learn")
        self.trainer = None
        self.lineage: Lineage | None = None
        self.last_good: tuple[Path, str] | None = None
        self.next_offsets: dict[int, int] = {}
        self.seen = RecentIds()  # outcomes already read, by their event (at-least-once can repeat one)
        self.producer = None
        self.since_full = 0
        self.published: list[dict] = []  # what this service published (tests, logs)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        s = self.settings
        # torch and the model code load in a thread before the lease is joined: an import of several seconds
        # on the event loop, which carries the lease's heartbeats, let a standby take the lease from a live
        # trainer (its session expired) and both trainers learned for a moment
        await asyncio.to_thread(_import_model_code)
        lease = Lease(s)
        await lease.start()
        try:
            log.info("trainer waiting for the lease on %r (one active trainer per app)", lease.topic)
            await lease.wait()
            log.info("trainer holds the lease: resuming the lineage from %r", self.topic)
            await self._serve(lease)
        finally:
            await lease.stop()
            if self.producer is not None:
                await self.producer.stop()
            self.pool.shutdown(wait=False)

    async def _serve(self, lease: Lease) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: PLC0415

        s = self.settings
        await ensure_topics_async(s, [s.topic_outcomes, self.topic])
        self.producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s), acks="all", enable_idempotence=True,
                                         client_id=f"{s.app_id}-trainer-publisher", max_request_size=4 << 20)
        await start_client(s, self.producer.start, self.producer.stop)
        await self._resume()
        outcomes = AIOKafkaConsumer(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s), group_id=None, enable_auto_commit=False,
                                    client_id=f"{s.app_id}-trainer-outcomes", max_partition_fetch_bytes=8 << 20)
        await start_client(s, outcomes.start, outcomes.stop)
        try:
            parts = sorted(await self.producer.partitions_for(s.topic_outcomes))
            tps = [TopicPartition(s.topic_outcomes, p) for p in parts]
            outcomes.assign(tps)
            await self._seek(outcomes, tps)
            await self._loop(outcomes, tps, lease)
        finally:
            await outcomes.stop()

    # ------------------------------------------------------------------ resume
    async def _resume(self) -> None:
        """Load the lineage's full version (or announce ``settings.checkpoint``) into a trainer.

        The lineage's full version is the newest full record the trainer may continue from
        (:func:`load_full`: the workers' checks, then the checkpoint and its content hash). A newer one
        it refuses (a bad record, a checkpoint missing, corrupt or not the announced one) is one the
        workers refuse too: each is logged at CRITICAL and counted
        (``nextaction_online_rejected_full_records_total{reason}``), and the version the trainer falls
        back to — the newest admissible full record, else ``settings.checkpoint`` — is announced again
        (``reason: reset``), so the fleet serves exactly the weights the trainer learns on (docs/online.md,
        "A rejected full record")."""
        from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: PLC0415

        from models.checkpoint import load_checkpoint, read_manifest  # noqa: PLC0415
        from models.devices import resolve_device  # noqa: PLC0415
        from online.trainer import OnlineTrainer  # noqa: PLC0415

        s = self.settings
        device = resolve_device(s.device)
        roots = checkpoint_roots(s)
        consumer = AIOKafkaConsumer(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s), group_id=None, enable_auto_commit=False)
        await start_client(s, consumer.start, consumer.stop)
        try:
            parts = sorted(await self.producer.partitions_for(self.topic))
            tps = [TopicPartition(self.topic, p) for p in parts]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            chosen, loaded, rejected = await choose_full(full_records(consumer, tps, ends),
                                                         lambda rec: load_full(rec, roots, device))
            after = []  # the records after the chosen full record (deltas, rejected full records)
            if chosen is not None:
                tp = TopicPartition(self.topic, chosen.partition)
                after = await read_range(consumer, tp, chosen.offset + 1, ends[tp])
            n = seq = 0
            for tp in tps:  # the highest record number and delta number on the topic
                for rec in await read_range(consumer, tp, max(0, ends[tp] - 2000), ends[tp]):
                    n, seq = self._counters(rec, n, seq)
        finally:
            await consumer.stop()
        for rec, exc in rejected:
            monitoring.ONLINE_REJECTED.labels(exc.reason).inc()
            log.critical("!!! the full record %s[%d]@%d is rejected (%s), as every worker rejects it: %s",
                         self.topic, rec.partition, rec.offset, exc.reason, exc.detail)
        if chosen is not None:
            full, ck = loaded
            online = ck.metadata.get("online") or {}
            self.lineage = Lineage(Path(full.path), ck.content_hash, n, seq + 1,
                                   {int(p): int(o) for p, o in online.get("offsets", {}).items()} or None,
                                   int(online.get("examples", 0)), chosen.timestamp)
            stale = sum(update_kind(r.headers) == DELTA for r in after)
            if rejected:
                log.critical("!!! resuming from the newest admissible full record %s[%d]@%d (%s) instead, and "
                             "announcing it again so the workers serve it", self.topic, chosen.partition,
                             chosen.offset, full.path)
            log.info("resuming from %s (%s): %d examples learned, offsets %s; %d deltas after it are superseded",
                     full.path, ck.version, self.lineage.examples, self.lineage.offsets, stale)
            if stale or rejected:
                await self._announce(self.lineage.path, ck.content_hash, "reset")
        else:
            where = (f"every full record on {self.topic!r} is rejected ({len(rejected)}, newest "
                     f"{self.topic}[{rejected[0][0].partition}]@{rejected[0][0].offset}: {rejected[0][1]})"
                     if rejected else f"no full version on {self.topic!r} yet")
            if s.checkpoint is None:
                raise ConfigError("checkpoint", None, f"the trainer needs a Transformer checkpoint to start a lineage "
                                                      f"({where})")
            path = Path(s.checkpoint).expanduser().absolute()
            ck = await asyncio.to_thread(load_checkpoint, path, device=device)
            if rejected:
                log.critical("!!! %s: starting a new lineage from the checkpoint setting %s", where, path)
            self.lineage = Lineage(path, read_manifest(path)["content_hash"], n, seq + 1, None, 0, 0)
            await self._announce(path, ck.content_hash, "reset" if rejected else "online")
        catalogue = None
        # the workers' catalogue, for the same text rows (without a projection it would go unused: not read)
        if s.item_text_catalogue is not None and s.text_items and ck.text_projection is not None:
            from models.text import read_catalogue  # noqa: PLC0415

            catalogue = await asyncio.to_thread(read_catalogue, s.item_text_catalogue)
        self.trainer = OnlineTrainer(ck.model, ck.vocab, ck.version, online_config(s), device=device,
                                     text_projection=ck.text_projection, text_catalogue=catalogue)
        self.trainer.next_seq = self.lineage.next_seq
        self.last_good = (self.lineage.path, ck.content_hash)
        monitoring.ONLINE_VOCAB.set(len(ck.vocab))

    @staticmethod
    def _counters(rec: Any, n: int, seq: int) -> tuple[int, int]:
        try:
            if update_kind(rec.headers) == FULL:
                return max(n, ModelUpdate.decode(rec.value).n or 0), seq
            from models.delta import ModelDelta  # noqa: PLC0415

            return n, max(seq, ModelDelta.decode(rec.value).seq)
        except ValueError:
            return n, seq

    async def _seek(self, consumer: Any, tps: list) -> None:
        lin = self.lineage
        if lin.offsets is not None:
            for tp in tps:
                consumer.seek(tp, lin.offsets.get(tp.partition, 0))
        elif lin.timestamp_ms and self.settings.trainer_start == "earliest":
            # a version announced without offsets (a deploy): the outcomes since it was announced
            found = await consumer.offsets_for_times({tp: lin.timestamp_ms for tp in tps})
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, found[tp].offset if found.get(tp) is not None else ends[tp])
        elif self.settings.trainer_start == "earliest":
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        for tp in tps:
            self.next_offsets[tp.partition] = await consumer.position(tp)
        log.info("trainer reading %r from offsets %s", self.settings.topic_outcomes, self.next_offsets)

    # ------------------------------------------------------------------ the loop
    async def _loop(self, consumer: Any, tps: list, lease: Lease) -> None:
        from online.examples import example_from_outcome  # noqa: PLC0415

        s = self.settings
        loop = asyncio.get_running_loop()
        last_delta = last_full = last_log = time.monotonic()
        learned_since_log = 0
        # examples read and not learned yet: a step takes trainer_batch of them, or those that waited
        # trainer_max_wait_s; the offsets recorded with updates (next_offsets) move only past learned ones
        pending: list = []
        read_to: dict[int, int] = {}
        oldest = 0.0
        while True:
            await lease.hold()
            got = await consumer.getmany(timeout_ms=100, max_records=max(1, s.trainer_batch - len(pending)))
            for tp, recs in got.items():
                for rec in recs:
                    try:
                        value = orjson.loads(rec.value)
                        forget = forget_user_of(value)
                        example = None if forget is not None else example_from_outcome(value)
                    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:  # counted; a line each is noise
                        monitoring.ONLINE_EXAMPLES.labels("bad_record").inc()
                        log.debug("outcomes %s[%d]@%d is not an example: %s", tp.topic, tp.partition, rec.offset, exc)
                    else:
                        event_id = (value.get("partition"), value.get("offset"))
                        if forget is None and None not in event_id and not self.seen.add(event_id):
                            monitoring.ONLINE_EXAMPLES.labels("duplicate").inc()  # at-least-once: learned once
                            read_to[tp.partition] = rec.offset + 1
                            continue
                        if forget is not None:  # a privacy deletion: the user's examples not learned yet, and replayed
                            pending = self._forget(forget, pending)
                            read_to[tp.partition] = rec.offset + 1
                            continue
                        if not pending:
                            oldest = time.monotonic()
                        pending.append(example)
                    read_to[tp.partition] = rec.offset + 1
            monitoring.ONLINE_PENDING.set(len(pending))
            if pending and (len(pending) >= s.trainer_batch or time.monotonic() - oldest >= s.trainer_max_wait_s):
                examples, pending = pending, []
                rep = await loop.run_in_executor(self.pool, self.trainer.learn, examples)
                self._observe(rep)
                self.since_full += len(examples)
                self.lineage.examples += len(examples)
                learned_since_log += len(examples)
            if not pending:
                self.next_offsets.update(read_to)
            now = time.monotonic()
            if now - last_delta >= s.trainer_delta_interval_s:
                last_delta = now
                await self._publish_deltas()
            if self.trainer.should_rollback():
                await self._rollback()
                last_full = time.monotonic()
            elif self.since_full >= s.trainer_full_every_examples or now - last_full >= s.trainer_full_every_s:
                if self.since_full:
                    await self._publish_full()
                last_full = time.monotonic()
            if now - last_log >= 10.0:
                self._log(learned_since_log / (now - last_log))
                ends = await consumer.end_offsets(tps)
                monitoring.ONLINE_LAG.set(sum(ends[tp] - self.next_offsets.get(tp.partition, 0) for tp in tps))
                last_log, learned_since_log = now, 0

    def _forget(self, user: str, pending: list) -> list:
        """A forget marker: ``pending`` without ``user``'s examples, and the user gone from the trainer
        (replay buffer, rate limit). Counted and logged without the user id (docs/privacy.md)."""
        kept = [ex for ex in pending if ex.user_id != user]
        replayed = self.trainer.forget_user(user)
        monitoring.ONLINE_EXAMPLES.labels("forget").inc()
        monitoring.ONLINE_FORGOTTEN.labels("pending").inc(len(pending) - len(kept))
        monitoring.ONLINE_FORGOTTEN.labels("replay").inc(replayed)
        log.info("forget marker: dropped %d pending and %d replayed examples", len(pending) - len(kept), replayed)
        log.debug("forget marker for %r", user)
        return kept

    def _observe(self, rep) -> None:
        monitoring.ONLINE_EXAMPLES.labels("learned").inc(rep.learned)
        monitoring.ONLINE_NEW_ITEMS.labels("text").inc(rep.text_rows)
        monitoring.ONLINE_NEW_ITEMS.labels("context").inc(rep.new_items - rep.text_rows)
        for why, n in rep.skipped.items():
            monitoring.ONLINE_EXAMPLES.labels(why).inc(n)
        monitoring.ONLINE_STEPS.labels(rep.step_refused or "ok").inc()
        monitoring.ONLINE_STEP_SECONDS.observe(rep.seconds)
        if rep.drift:
            monitoring.ONLINE_DRIFTS.inc()
        monitoring.ONLINE_VOCAB.set(len(self.trainer.vocab))
        for version, m in self.trainer.prequential.snapshot().items():
            for metric in ("hr10", "ndcg10", "log_loss"):
                monitoring.ONLINE_PREQUENTIAL.labels(version, metric).set(m[metric])
        monitoring.ONLINE_SHADOW.labels("served").set(self.trainer.comparator.online_mean)
        monitoring.ONLINE_SHADOW.labels("shadow").set(self.trainer.comparator.shadow_mean)

    def _log(self, rate: float) -> None:
        t = self.trainer
        overall = t.prequential.overall()
        log.info("trainer %s: %.0f examples/s, lineage %d examples; prequential (served) HR@10 %.4f NDCG@10 %.4f "
                 "log loss %.4f over %d; shadow NDCG@10 %.4f; vocabulary %d (+%d online); drifts %d; steps refused %d",
                 t.version, rate, self.lineage.examples, overall["hr10"], overall["ndcg10"], overall["log_loss"],
                 overall["n"], t.comparator.shadow_mean, len(t.vocab), len(t.vocab) - t.trained_items,
                 t.stats["drifts"], t.stats["refused_steps"])

    # ------------------------------------------------------------------ publishing
    async def _send(self, kind: str, value: bytes) -> None:
        await self.producer.send_and_wait(self.topic, value, key=ModelUpdate.KEY, headers=[(KIND_HEADER, kind.encode())])

    async def _publish_deltas(self) -> None:
        meta = {"offsets": dict(self.next_offsets), "examples": self.lineage.examples}
        deltas = await asyncio.get_running_loop().run_in_executor(self.pool, self.trainer.deltas, meta)
        for d in deltas:
            await self._send(DELTA, d.encode())
            monitoring.ONLINE_PUBLISHED.labels("delta").inc()
            self.published.append({"kind": DELTA, "label": d.label, "rows": d.n_rows, "meta": d.meta})

    async def _announce(self, path: Path, sha256: str, reason: str) -> None:
        self.lineage.n += 1  # records are numbered, and the numbers only grow
        update = ModelUpdate(sha256[:12], str(path), sha256, self.lineage.n, reason)
        await self._send(FULL, update.encode())
        monitoring.ONLINE_PUBLISHED.labels(reason).inc()
        self.published.append({"kind": FULL, "reason": reason, "label": sha256[:12], "n": update.n, "path": str(path)})
        log.info("announced %s (%s, n=%d)", path, reason, update.n)

    async def _publish_full(self, reason: str = "online") -> None:
        """Save the trainer's model as a new checkpoint (with the offsets and the example count it has
        learned) and announce it; the next deltas follow it."""
        from models.checkpoint import read_manifest, save_checkpoint  # noqa: PLC0415

        await self._publish_deltas()  # the workers' chain stays whole up to the full version
        t, n = self.trainer, self.lineage.n + 1
        meta = {"online": {"n": n, "reason": reason, "parent": t.version, "offsets": dict(self.next_offsets),
                           "examples": self.lineage.examples, "created_ms": int(time.time() * 1000)}}
        path = await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: save_checkpoint(self.models_dir / f"v{n:06d}", t.model, t.vocab, None, meta,
                                               text_projection=t.text_projection))  # cold-start items keep it
        sha = read_manifest(path)["content_hash"]
        healthy = reason == "rollback" or not t.should_rollback()
        await self._announce(path, sha, reason)
        t.rebase(sha[:12])
        self.lineage.path, self.lineage.sha256 = path, sha
        self.since_full = 0
        if healthy:
            self.last_good = (path, sha)

    async def _rollback(self) -> None:
        """Back to the last good full version: its weights, saved again with the current offsets (so a
        restart resumes here, not before the outcomes learned since) and announced to the fleet."""
        from models.checkpoint import load_checkpoint  # noqa: PLC0415
        from models.devices import resolve_device  # noqa: PLC0415

        path, _ = self.last_good
        t = self.trainer
        log.error("!!! the served model (%s) scores worse than the frozen shadow (NDCG@10 %.4f vs %.4f over %d "
                  "outcomes): rolling the fleet back to %s", t.version, t.comparator.online_mean,
                  t.comparator.shadow_mean, t.comparator.n, path)
        ck = await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: load_checkpoint(path, device=resolve_device(self.settings.device)))
        t.restore(ck.model, ck.vocab, ck.version, ck.text_projection)
        await self._publish_full("rollback")
