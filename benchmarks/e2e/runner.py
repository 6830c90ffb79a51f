"""The runner of the end-to-end benchmark: broker, input topics, the phases in order.

:class:`Bench` starts the embedded broker (or uses ``--broker``), produces the input events once,
and runs the phases against the same broker and data: the aiokafka pass-through (the ceiling), the
Faust pipeline per variant (baseline predictor, ``--checkpoint`` Transformer, ``--compare-cwd`` copy)
from a backlog, and with ``--rate`` each variant again at a fixed input rate, warm. Each phase
ends as a :class:`~benchmarks.e2e.measure.Phase` (see :mod:`benchmarks.e2e.measure`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import orjson

from benchmarks.common import ROOT, TAOBAO_SLICE, BenchError, loadavg
from benchmarks.e2e.measure import (Phase, dlq_outputs, dlq_reasons, end_offsets_sum, end_offsets_sum_once,
                                    group_summary, passthrough_outputs, pipeline_outputs, proc_cpu_s, read_topic,
                                    scrape_metrics, write_load,
                                    spy_summary, stage_summary, summarise, tree_cpu_s)
from benchmarks.e2e.worker import Worker, tail_file
from stream_app import broker, kafka_admin
from stream_app.kafka_security import client_kwargs
from stream_app.ports import free_port
from stream_app.settings import Settings, SettingsType

log = logging.getLogger("e2e")


# ------------------------------------------------------------------------------------------------ #
# inputs and topics
# ------------------------------------------------------------------------------------------------ #

def load_events(source: str, n: int, users: int, seed: int) -> list[dict]:
    """``n`` input events: synthetic (``users``, ``seed``) or the first rows of the Taobao time slice
    (times rebased)."""
    from stream_app import replay

    if source == "synthetic":  # one item per 8 events (50..100k), as in the runs recorded in RESULTS.md
        return list(replay.synthetic(n, users, seed, n_items=max(50, min(100_000, n // 8))))
    if source == "taobao-slice":
        if not TAOBAO_SLICE.is_file():
            raise BenchError(f"--source taobao-slice: {TAOBAO_SLICE} not found")
        evs = list(itertools.islice(replay.taobao_csv(TAOBAO_SLICE, rebase_time=True), n))
        if len(evs) < n:
            log.warning("taobao slice has only %d usable rows (asked for %d)", len(evs), n)
        return evs
    raise BenchError(f"unknown --source {source!r}")


def rebase_to_now(events: list[dict]) -> list[dict]:
    """Shift event times so the newest is 'now' (keeps the worker's clock-skew check happy)."""
    from stream_app import replay

    return replay.rebase(events)


async def produce_events(settings: SettingsType, events: Iterable[dict], rate: float | None) -> int:
    """Produce ``events`` to ``settings.topic_events`` (at ``rate`` events/s, or as fast as it goes)."""
    from stream_app import replay

    return await replay.produce(settings, events, rate=rate, progress=False)


#: The Faust tables of the app (stream_app/app.py): their changelog topics are ``<app_id>-<table>-changelog``.
#: (``activity``: the table of the code before 2026-12-06, for ``--compare-cwd`` runs against such a tree;
#: today's app does not use it.)
TABLES = ("histories", "activity")


async def precreate_changelogs(settings: SettingsType) -> None:
    """Create the app's changelog topics (compacted) before the worker starts.

    Works around a start-up race seen on a fresh app id: Faust creates the changelogs itself, but
    when a new topic is not yet in the consumer's metadata it is dropped from the subscription
    ("Ignoring missing topic") and the first table write then fails with PartitionsMismatch (0 partitions).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings))
    await admin.start()
    try:
        names = [f"{settings.app_id}-{t}-changelog" for t in TABLES]
        existing = set(await admin.list_topics())
        new = [NewTopic(n, settings.partitions, 1, topic_configs={"cleanup.policy": "compact"})
               for n in names if n not in existing]
        if new:
            await admin.create_topics(new)
        for _ in range(100):  # until the broker reports their partitions
            descs = await admin.describe_topics(names)
            if all(d.get("error_code", 0) == 0 and len(d.get("partitions") or []) == settings.partitions
                   for d in descs):
                return
            await asyncio.sleep(0.1)
        raise BenchError(f"changelog topics {names} did not get {settings.partitions} partitions")
    finally:
        await admin.close()


# ------------------------------------------------------------------------------------------------ #
# pass-through (the ceiling)
# ------------------------------------------------------------------------------------------------ #

async def passthrough(bootstrap: str, in_topic: str, out_topic: str, n_expected: int, group: str,
                      timeout: float, rate_feed: Any = None) -> None:
    """Read every event of ``in_topic`` (from the start), parse it, write a small JSON record to ``out_topic``.

    Stops after ``n_expected`` records. ``rate_feed`` (a coroutine) runs concurrently when given
    (used by the rate mode to produce while consuming).
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, **client_kwargs(Settings()), group_id=group, enable_auto_commit=True,
                                auto_commit_interval_ms=1000, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=1 << 20)
    # Same producer batching as the Faust app (producer_linger=0.005, acks=all).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_kwargs(Settings()), linger_ms=5, acks="all",
                                max_batch_size=256 * 1024, client_id="e2e-passthrough")
    await asyncio.wait_for(consumer.start(), 30)
    await asyncio.wait_for(producer.start(), 30)
    feeder = asyncio.ensure_future(rate_feed) if rate_feed is not None else None
    done = 0
    pending: list[asyncio.Future] = []
    deadline = time.monotonic() + timeout
    try:
        while done < n_expected:
            if time.monotonic() > deadline:
                raise BenchError(f"pass-through processed {done:,}/{n_expected:,} events within {timeout:.0f} s")
            if feeder is not None and feeder.done() and feeder.exception():
                raise feeder.exception()
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for recs in batches.values():
                for r in recs:
                    read_ms = int(time.time() * 1000)
                    ev = orjson.loads(r.value)
                    body = orjson.dumps({"user_id": ev.get("user_id") if isinstance(ev, dict) else None,
                                         "p": r.partition, "o": r.offset, "read_ms": read_ms})
                    pending.append(await producer.send(out_topic, body, key=r.key))
                    done += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        if feeder is not None:
            await feeder
    finally:
        if feeder is not None and not feeder.done():
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
        await producer.stop()
        await consumer.stop()


# ------------------------------------------------------------------------------------------------ #
# the benchmark
# ------------------------------------------------------------------------------------------------ #

#: ``--faust-floor`` variants: tag → table writes per event (benchmarks/e2e/faust_floor.py).
FLOOR_VARIANTS = {"floor0": 0, "floor1": 1}
FLOOR_APP = "benchmarks.e2e.faust_floor:app"


class Bench:
    """One run: its broker, work dir, workers, the load average at each step and the phases measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = f"e2e-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix=f"{self.run_id}-")).absolute()
        self.work.mkdir(parents=True, exist_ok=True)
        self.broker: SettingsType | None = None
        self.own_broker = False
        self.workers: list[Worker] = []
        self.phases: list[Phase] = []
        self.loads: list[tuple[str, str]] = []
        self.extra_env = dict(kv.split("=", 1) for kv in args.worker_env)
        self.n_inputs = 0

    # --- broker ---------------------------------------------------------------------------------
    def start_broker(self) -> SettingsType:
        if self.args.broker:
            s = Settings(broker_url=self.args.broker)
            kafka_admin.require_broker(s)
            self.broker = s
            return s
        port, cport = free_port(), free_port()
        s = Settings(broker_url=f"kafka://127.0.0.1:{port}", kafka_port=port, kafka_controller_port=cport,
                     data_dir=self.work / "broker", partitions=self.args.partitions)
        log.info("starting the embedded broker on 127.0.0.1:%d (data %s)", port, s.data_dir)
        broker.start(s, timeout=180)
        self.broker, self.own_broker = s, True
        return s

    def stop_broker(self) -> None:
        if self.own_broker and self.broker is not None:
            with contextlib.suppress(Exception):
                broker.stop(self.broker)

    def app_settings(self, tag: str, events_topic: str) -> SettingsType:
        b = self.broker
        base = f"{self.run_id}.{tag}"
        return Settings(broker_url=b.broker_url, kafka_port=b.kafka_port, kafka_controller_port=b.kafka_controller_port,
                        app_id=f"nx-{base}", topic_events=events_topic, topic_dlq=f"{base}.dlq",
                        topic_predictions=f"{base}.predictions", topic_outcomes=f"{base}.outcomes",
                        topic_model_updates=f"{base}.model-updates", data_dir=self.work / f"worker-{tag}",
                        web_port=free_port(), partitions=self.args.partitions, log_level="warning")

    def broker_pid(self) -> int | None:
        if not self.own_broker:
            return None
        with contextlib.suppress(OSError, ValueError):
            return int(broker.BrokerPaths.of(self.broker).pid_file.read_text().strip())
        return None

    def note_load(self, when: str) -> None:
        self.loads.append((when, loadavg()))

    # --- inputs ------------------------------------------------------------------------------------
    async def create_events_topic(self, name: str) -> None:
        s = self.broker.model_copy(update={"topic_events": name})
        await kafka_admin.ensure_topics_async(s, [name], partitions=self.args.partitions)

    async def index_inputs(self, topic: str) -> dict[tuple[int, int], int]:
        """(partition, offset) → CreateTime of every event in ``topic``."""
        recs = await read_topic(self.broker.bootstrap_servers, topic)
        return {(r.partition, r.offset): r.ts for r in recs}

    # --- phases ----------------------------------------------------------------------------------
    async def run_passthrough(self, in_topic: str, inputs: dict, mode: str = "backlog",
                              feed: Any = None, n: int | None = None) -> Phase:
        out_topic = f"{in_topic}.passthrough"
        await kafka_admin.ensure_topics_async(self.broker, [out_topic], partitions=self.args.partitions)
        n = n if n is not None else len(inputs)
        log.info("pass-through (%s): %d events %s -> %s", mode, n, in_topic, out_topic)
        t0 = time.monotonic()
        cpu0, bcpu0 = time.process_time(), proc_cpu_s(self.broker_pid())
        await passthrough(self.broker.bootstrap_servers, in_topic, out_topic, n, f"{out_topic}-group",
                          self.args.timeout, feed)
        cpu_ms = (time.process_time() - cpu0) * 1000.0 / n
        bcpu_ms = (proc_cpu_s(self.broker_pid()) - bcpu0) * 1000.0 / n
        if feed is not None:  # the rate feed wrote its events while we consumed: index them now
            inputs.update(await self.index_inputs(in_topic))
        recs = await read_topic(self.broker.bootstrap_servers, out_topic)
        ph = summarise(Phase("pass-through (aiokafka)", mode, len(inputs)), inputs, passthrough_outputs(recs), [])
        ph.startup_s = 0.0
        ph.cpu_ms, ph.broker_cpu_ms = cpu_ms, bcpu_ms
        if feed is not None:
            ph.notes.append("CPU includes producing the input at the fixed rate (same process)")
        log.info("pass-through done in %.1f s: %.0f ev/s", time.monotonic() - t0, ph.eps)
        return ph

    async def run_pipeline(self, tag: str, label: str, in_topic: str, inputs: dict, *,
                           checkpoint: Path | None, mode: str = "backlog", rate: float | None = None,
                           rate_events: list[dict] | None = None, profile: Path | None = None) -> Phase:
        s = self.app_settings(tag, in_topic)
        await kafka_admin.ensure_topics_async(s, [s.topic_dlq, s.topic_predictions, s.topic_outcomes,
                                                  s.topic_model_updates], partitions=self.args.partitions)
        if not self.args.no_precreate_changelogs:
            await precreate_changelogs(s)
        env = dict(self.extra_env)
        floor = FLOOR_VARIANTS.get(tag.removeprefix("rate-"))
        if floor is not None:
            env["NX_FLOOR_TABLE_WRITES"] = str(floor)
        if checkpoint is not None:
            env["NEXTACTION_CHECKPOINT"] = str(checkpoint)
            env.setdefault("NEXTACTION_DEVICE", "cpu")
        cwd = Path((self.args.compare_cwd or self.args.worker_cwd or ROOT) if tag.endswith("cmp")
                   else (self.args.worker_cwd or ROOT)).absolute()
        if tag.endswith("cmp"):
            env.update(dict(kv.split("=", 1) for kv in self.args.compare_env))
        loglevel = ((self.args.compare_loglevel or self.args.worker_loglevel) if tag.endswith("cmp")
                    else self.args.worker_loglevel)
        group: list[Worker] = []  # --workers: one consumer group; the first is profiled and warmed up
        for i in range(self.args.workers):
            si = s if i == 0 else s.model_copy(update={"web_port": free_port(),
                                                       "data_dir": self.work / f"worker-{tag}-{i}"})
            group.append(Worker(si, self.work / (f"worker-{tag}.log" if i == 0 else f"worker-{tag}-{i}.log"),
                                extra_env=env, cwd=cwd, profile=profile if i == 0 else None,
                                profiler=self.args.profiler, loglevel=loglevel,
                                app=FLOOR_APP if floor is not None else None))
        w = group[0]
        self.workers.extend(group)
        log.info("pipeline %s (%s)%s: %s", label, mode, f", {len(group)} workers" if len(group) > 1 else "",
                 " ".join(shlex.quote(a) for a in w.argv))
        for x in group:
            x.start()
        from aiokafka import AIOKafkaConsumer

        mon = AIOKafkaConsumer(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s), group_id=None)
        await asyncio.wait_for(mon.start(), 30)
        out_topics = [s.topic_predictions, s.topic_dlq]
        expected = len(inputs)
        warm_keys: set[tuple[int, int]] = set()
        try:
            if rate is not None:
                # Warm up: one probe event at a time until the worker answers (assigned, model loaded).
                warm_keys = await self._warm_up(s, w, mon, out_topics)
                expected = len(warm_keys) + len(rate_events)
                log.info("worker warm after %.1f s; producing %d events at %.0f ev/s", time.monotonic() - w.started,
                         len(rate_events), rate)
                feed = asyncio.ensure_future(produce_events(s, rate_events, rate))
            else:
                feed = None
            first_seen = None
            cpu0 = bcpu0 = float("nan")
            n0 = 0
            last_n, last_change = -1, time.monotonic()
            deadline = time.monotonic() + self.args.timeout
            while True:
                for x in group:
                    x.check()
                if feed is not None and feed.done() and feed.exception():
                    raise BenchError(f"producing the rate-mode events failed: {feed.exception()!r}")
                n = await end_offsets_sum(mon, out_topics)
                now = time.monotonic()
                if n and first_seen is None:
                    first_seen, n0 = now, n
                    cpu0, bcpu0 = sum(tree_cpu_s(x.proc.pid) for x in group), proc_cpu_s(self.broker_pid())
                    w.attach_profiler()
                if n != last_n:
                    last_n, last_change = n, now
                if n >= expected and (feed is None or feed.done()):
                    break
                if now > deadline:
                    raise BenchError(f"{label}: {n:,}/{expected:,} outputs after {self.args.timeout:.0f} s; "
                                     f"worker log {w.log_path}:\n{tail_file(w.log_path)}")
                if first_seen is not None and now - last_change > self.args.stall:
                    log.error("%s: no new output for %.0f s at %d/%d; stopping the wait", label, self.args.stall,
                              n, expected)
                    break
                await asyncio.sleep(0.5)
            startup = (first_seen - w.started) if first_seen else float("nan")
            cpu1, bcpu1 = sum(tree_cpu_s(x.proc.pid) for x in group), proc_cpu_s(self.broker_pid())
            metrics_text = await scrape_metrics(s.web_port) if rate is not None else None
            shares = [await scrape_metrics(x.settings.web_port) for x in group] if len(group) > 1 else []
            w.detach_profiler()
            if feed is not None:
                await feed
        finally:
            await mon.stop()
            for x in group:
                rc = x.stop()
                log.info("worker stopped (exit %s)", rc)
        if rate is not None:
            inputs = await self.index_inputs(in_topic)
            for k in warm_keys:
                inputs.pop(k, None)
        preds = await read_topic(s.bootstrap_servers, s.topic_predictions)
        dlq = await read_topic(s.bootstrap_servers, s.topic_dlq)
        outs, versions = pipeline_outputs(preds, warm_keys)
        ph = summarise(Phase(label, mode, len(inputs)), inputs, outs, dlq_outputs(dlq, warm_keys))
        ph.startup_s = startup
        ph.versions = versions
        if metrics_text:
            ph.notes.append(stage_summary(metrics_text))
        if shares:
            ph.notes.append(group_summary(shares, s.topic_events))
        if profile is not None and self.args.profiler == "py-spy":
            raw = Path(str(profile) + ".raw")
            if raw.is_file():
                profile.write_text(spy_summary(raw, header=f"{label} ({mode}), {ph.inputs:,} events, "
                                                           f"{ph.eps:,.0f} ev/s while profiled, load {loadavg()}"))
                raw.unlink()
        if n > n0:
            ph.cpu_ms = (cpu1 - cpu0) * 1000.0 / (n - n0)
            ph.broker_cpu_ms = (bcpu1 - bcpu0) * 1000.0 / (n - n0)
        outcome_recs = await end_offsets_sum_once(s.bootstrap_servers, [s.topic_outcomes])
        ph.outcomes = outcome_recs
        if mode == "backlog":  # every input was processed once (missing/dup are reported): the write load
            written = {"predictions": preds, "dlq": dlq, "outcomes": await read_topic(s.bootstrap_servers,
                                                                                       s.topic_outcomes)}
            for table in ("histories", "activity"):
                written[f"{table}-changelog"] = await read_topic(s.bootstrap_servers, f"{s.app_id}-{table}-changelog")
            ph.notes.append(write_load({k: (len(v), sum(len(r.key or b"") + len(r.value or b"") for r in v))
                                        for k, v in written.items()}, len(inputs)))
        if dlq:
            ph.notes.append(dlq_reasons(dlq))
        if floor is not None:
            ph.notes.append("Faust floor: JSON parse + one produce per event" + (f" + {floor} table write(s)"
                                                                                if floor else "")
                            + "; no validation, state logic, model or outcomes (benchmarks/e2e/faust_floor.py)")
        if checkpoint is not None and versions and all(str(v).startswith("baseline") for v in versions):
            ph.notes.append("!!! the worker served the baseline, not the checkpoint (see its log)")
        log.info("%s done: %.0f ev/s, %d outputs, %d DLQ, %d missing, %d duplicates", label, ph.eps, ph.outputs,
                 ph.dlq, ph.missing, ph.duplicates)
        return ph

    async def _warm_up(self, s: SettingsType, w: Worker, mon: Any, out_topics: list[str]) -> set[tuple[int, int]]:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s), acks="all")
        await producer.start()
        keys: set[tuple[int, int]] = set()
        deadline = time.monotonic() + self.args.timeout
        try:
            i = 0
            while True:
                w.check()
                n = await end_offsets_sum(mon, out_topics)
                if n >= 1:
                    # A couple more probes so every partition's first fetch is done too.
                    if i >= 3 and n >= len(keys):
                        return keys
                if time.monotonic() > deadline:
                    raise BenchError(f"worker gave no output within {self.args.timeout:.0f} s of start; "
                                     f"log {w.log_path}:\n{tail_file(w.log_path)}")
                uid = f"warmup-{i}"
                ev = {"user_id": uid, "item_id": "warm", "action": "view", "ts": int(time.time() * 1000)}
                md = await producer.send_and_wait(s.topic_events, orjson.dumps(ev), key=uid.encode())
                keys.add((md.partition, md.offset))
                i += 1
                await asyncio.sleep(0.5)
        finally:
            await producer.stop()

    # --- the whole run ---------------------------------------------------------------------------------
    async def main(self) -> list[Phase]:
        a = self.args
        self.note_load("start")
        events = load_events(a.source, a.events, a.users, a.seed)
        if a.source == "synthetic":
            events = rebase_to_now(events)  # fixed 2023 timestamps -> now (same gaps)
        topic = f"{self.run_id}.events"
        await self.create_events_topic(topic)
        log.info("producing %d %s events to %s", len(events), a.source, topic)
        t0 = time.monotonic()
        sent = await produce_events(self.broker.model_copy(update={"topic_events": topic}), events, None)
        log.info("produced %d events in %.1f s (%.0f ev/s)", sent, time.monotonic() - t0,
                 sent / max(1e-9, time.monotonic() - t0))
        inputs = await self.index_inputs(topic)
        if len(inputs) != sent:
            raise BenchError(f"{topic!r} holds {len(inputs)} records after producing {sent}")
        self.n_inputs = sent

        variants: list[tuple[str, str, Path | None]] = []
        if not a.skip_baseline:
            variants.append(("base", "pipeline, baseline predictor", None))
        if a.checkpoint:
            variants.append(("tf", "pipeline, Transformer (CPU)", Path(a.checkpoint).absolute()))
        if a.compare_cwd or a.compare_env or a.compare_loglevel:
            what = ", ".join(x for x in (f"code from {a.compare_cwd}" if a.compare_cwd else "",
                                         " ".join(a.compare_env),
                                         f"-l {a.compare_loglevel}" if a.compare_loglevel else "") if x)
            variants.append(("cmp", f"pipeline, baseline predictor, {what}", None))

        if a.faust_floor:
            variants += [("floor0", "Faust floor: consume → produce", None),
                         ("floor1", "Faust floor: + 1 table write", None)]
        if not a.skip_passthrough:
            self.note_load("before pass-through")
            self.phases.append(await self.run_passthrough(topic, dict(inputs)))
        max_eps: dict[str, float] = {}
        for tag, label, ckpt in variants:
            self.note_load(f"before {label}")
            profile = Path(a.profile).absolute() if (a.profile and tag == a.profile_run) else None
            ph = await self.run_pipeline(tag, label + (" [profiled]" if profile else ""), topic, dict(inputs),
                                         checkpoint=ckpt, profile=profile)
            self.phases.append(ph)
            max_eps[tag] = ph.eps
        if a.rate:
            for tag, label, ckpt in variants:
                r = (max_eps[tag] / 2.0) if a.rate == "half" else float(a.rate)
                if not r > 0:
                    log.error("no rate for %s (max %.0f ev/s)", label, max_eps.get(tag, float("nan")))
                    continue
                m = a.rate_events or int(min(a.events, max(2_000, r * a.rate_seconds)))
                rtopic = f"{self.run_id}.rate-{tag}.events"
                await self.create_events_topic(rtopic)
                # Same events per user as the backlog data (so histories and outcomes look alike).
                rate_users = max(1, round(a.users * m / a.events))
                rate_evs = rebase_to_now(load_events(a.source, m, rate_users, a.seed + 1))
                self.note_load(f"before {label} @ {r:.0f}/s")
                profile = Path(a.profile).absolute() if (a.profile and f"rate-{tag}" == a.profile_run) else None
                ph = await self.run_pipeline(f"rate-{tag}", label + (" [profiled]" if profile else ""), rtopic, {},
                                             checkpoint=ckpt, mode=f"rate {r:.0f}/s", rate=r, rate_events=rate_evs,
                                             profile=profile)
                self.phases.append(ph)
                if not a.skip_passthrough:
                    ptopic = f"{self.run_id}.rate-pt-{tag}.events"
                    await self.create_events_topic(ptopic)
                    feed = produce_events(self.broker.model_copy(update={"topic_events": ptopic}), rate_evs, r)
                    self.phases.append(await self.run_passthrough(ptopic, {}, mode=f"rate {r:.0f}/s", feed=feed,
                                                                  n=len(rate_evs)))
        self.note_load("end")
        return self.phases

    def cleanup(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.stop(timeout=20)
        self.stop_broker()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
