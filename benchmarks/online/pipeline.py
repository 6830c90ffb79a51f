"""The online-learning benchmark through the real pipeline: broker, ``faust worker``, ``nextaction trainer``.

One run, on the embedded broker (or ``broker_url``):

1. **warm-up**: the offline tail of every streamed user (the window the harness starts from) is
   produced as a backlog and served, so each user's window holds what it would in production; the
   trainer is not running yet (it starts at the end of ``outcomes``: ``trainer_start=latest``);
2. the trainer starts, holds the lease, announces the offline checkpoint and reads ``outcomes``;
3. the **stream** is produced at a fixed rate (events/s), event times shifted by one constant so the
   stream's gaps are the log's own; the worker predicts, writes ``outcomes``; the trainer learns and
   publishes deltas every ``trainer_delta_interval_s``, which the worker applies between batches;
4. everything is read back from the topics and scored:

   - **prequential** NDCG@10 / HR@10 / action log loss of the served (online) model, from the
     ``outcomes`` records of the stream (the rank of what happened in the prediction served before it,
     as the harness scores it; an outcome whose prediction was made during the warm-up is not scored);
   - **freshness**: per outcome, the seconds from its record reaching ``outcomes`` (CreateTime) to the
     first prediction published by weights that learned from it — the first update on
     ``model-updates`` whose recorded offsets cover it (deltas carry ``meta.offsets``), then the first
     prediction labelled with that update or a later one (labels ordered as the topic orders them);
   - the trainer's examples/s from its own ``/metrics`` (learned examples over the time in ``learn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from benchmarks.common import ROOT, BenchError
from benchmarks.e2e.measure import read_topic
from benchmarks.e2e.worker import Worker, settings_env, tail_file
from benchmarks.online.harness import EPS, Stream
from models.schema import ACTIONS
from stream_app.kafka_security import client_kwargs
from stream_app.ports import local_url
from stream_app.settings import Settings


@dataclass
class PipelineRun:
    """What :func:`run_pipeline` measured."""

    events: int  # streamed events (after the warm-up)
    rate: float
    ndcg: list[float] = field(default_factory=list)  # per scored outcome, in outcomes order
    hit: list[float] = field(default_factory=list)
    log_loss: list[float] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)  # per covered outcome
    uncovered: int = 0  # outcomes no update covered before the end
    deltas: int = 0
    full_versions: int = 0
    predictions: int = 0
    labels: int = 0  # distinct weight labels the predictions name
    examples_per_s: float = float("nan")
    learned: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        fr = np.asarray(self.freshness_s)
        return {"n": len(self.ndcg), "ndcg10": float(np.mean(self.ndcg)) if self.ndcg else float("nan"),
                "hr10": float(np.mean(self.hit)) if self.hit else float("nan"),
                "log_loss": float(np.mean(self.log_loss)) if self.log_loss else float("nan"),
                "freshness_median_s": float(np.median(fr)) if fr.size else float("nan"),
                "freshness_p95_s": float(np.percentile(fr, 95)) if fr.size else float("nan"),
                "covered": int(fr.size), "uncovered": self.uncovered}


def stream_events(stream: Stream, n: int | None = None) -> tuple[list[dict], list[dict]]:
    """(warm-up, stream) event dicts: the offline tail of each user streamed in the first ``n`` events,
    then those events; times shifted so the last is now (gaps kept)."""
    evs = stream.events[:n] if n else stream.events
    users = dict.fromkeys(u for u, *_ in evs)
    warm = []
    for u in users:
        seq = stream.offline.get(u)
        if seq is None:
            continue
        t = seq.tail(50)
        for j in range(len(t)):
            warm.append({"user_id": u, "item_id": t.items[j], "action": ACTIONS[int(t.actions[j])], "ts": int(t.ts[j]),
                         "device": t.devices[j], "location": t.locations[j], "category": t.categories[j]})
    warm.sort(key=lambda e: e["ts"])
    live = [{"user_id": u, "item_id": i, "action": ACTIONS[a], "ts": int(ts), "device": d, "location": loc,
             "category": c} for u, i, a, ts, d, loc, c in evs]
    shift = int(time.time() * 1000) - 60_000 - live[-1]["ts"]
    for e in warm + live:
        e["ts"] += shift
    return warm, live


class Trainer:
    """``nextaction trainer`` in a subprocess (its own process group), log in a file."""

    def __init__(self, settings, log_path: Path) -> None:
        self.settings, self.log_path = settings, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = Path(sys.executable).parent / "nextaction"
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen([str(exe), "trainer", "-l", "info"], cwd=ROOT, env=settings_env(self.settings),
                                         stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_log(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the trainer exited ({self.proc.returncode}):\n{tail_file(self.log_path)}")
            if re.search(pattern, self.log_path.read_text(errors="replace")):
                return
            time.sleep(0.3)
        raise BenchError(f"the trainer did not log {pattern!r} within {timeout:.0f} s:\n{tail_file(self.log_path)}")

    def metrics(self) -> str:
        url = local_url(self.settings.web_bind, self.settings.trainer_port, "/metrics")
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0.0 if absent)."""
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _count(bootstrap: str, topic: str) -> int:
    from benchmarks.e2e.measure import end_offsets_sum_once

    return await end_offsets_sum_once(bootstrap, [topic])


async def _wait_count(bootstrap: str, topic: str, n: int, timeout: float, check) -> None:
    deadline = time.monotonic() + timeout
    while (have := await _count(bootstrap, topic)) < n:
        check()
        if time.monotonic() > deadline:
            raise BenchError(f"{topic!r} has {have} records, expected {n}, after {timeout:.0f} s")
        await asyncio.sleep(0.5)


def score(run: PipelineRun, outcomes: list, updates: list, predictions: list, stream_start_ms: int) -> None:
    """Fill ``run`` from the records read back (module docstring, step 4)."""
    from models.delta import ModelDelta
    from stream_app.records import DELTA, ModelUpdate, update_kind

    # the updates in topic order: rank of each label, and which outcome offsets each delta covers
    rank: dict[str, int] = {}
    cover: list[tuple[int, dict[int, int]]] = []  # (rank, offsets) of each delta, in order
    for r in sorted(updates, key=lambda r: (r.partition, r.offset)):
        if update_kind(r.headers) == DELTA:
            d = ModelDelta.decode(r.value)
            rank[d.label] = len(rank)
            cover.append((rank[d.label], {int(p): int(o) for p, o in (d.meta.get("offsets") or {}).items()}))
            run.deltas += 1
        else:
            rank.setdefault(ModelUpdate.decode(r.value).version, len(rank))
            run.full_versions += 1
    # the first publication time of a label of each rank or later
    first = np.full(len(rank) + 1, np.inf)
    labels = set()
    for r in predictions:
        p = orjson.loads(r.value)
        labels.add(p["model_version"])
        k = rank.get(p["model_version"])
        if k is not None:
            first[k] = min(first[k], p["published_ms"])
    run.predictions, run.labels = len(predictions), len(labels)
    first = np.minimum.accumulate(first[::-1])[::-1]  # a later label also learned it
    for r in sorted(outcomes, key=lambda r: (r.ts, r.partition, r.offset)):
        o = orjson.loads(r.value)
        if o["context"]["event_ts"] < stream_start_ms:
            continue  # predicted during the warm-up: the harness does not score it either
        rank_hit = o["happened"]["item_rank"]
        run.ndcg.append(1.0 / math.log2(rank_hit + 1) if rank_hit is not None and rank_hit <= 10 else 0.0)
        run.hit.append(1.0 if rank_hit is not None and rank_hit <= 10 else 0.0)
        run.log_loss.append(-math.log(max(o["happened"]["action_prob"], EPS)))
        k = next((k for k, offs in cover if offs.get(r.partition, 0) > r.offset), None)
        if k is None or not math.isfinite(first[k]):
            run.uncovered += 1
        else:
            run.freshness_s.append(max(0.0, (first[k] - r.ts) / 1000.0))


async def run_pipeline(stream: Stream, checkpoint: Path, *, n_events: int | None, rate: float,
                       delta_interval_s: float = 2.0, broker_url: str | None = None, workdir: Path | None = None,
                       online_env: dict[str, str] | None = None, timeout: float = 1800.0) -> PipelineRun:
    """Module docstring. ``online_env``: extra ``NEXTACTION_*`` variables for the trainer."""
    from stream_app import broker, kafka_admin
    from stream_app.ports import free_port
    from stream_app.replay import produce
    from stream_app.settings import Settings

    work = Path(workdir or tempfile.mkdtemp(prefix="online-pipeline-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    own = broker_url is None
    if own:
        port, cport = free_port(), free_port()
        b = Settings(broker_url=f"kafka://127.0.0.1:{port}", kafka_port=port, kafka_controller_port=cport,
                     data_dir=work / "broker")
        broker.start(b, timeout=180)
    else:
        b = Settings(broker_url=broker_url)
        kafka_admin.require_broker(b)
    tag = f"online-{uuid.uuid4().hex[:8]}"
    s = Settings(broker_url=b.broker_url, kafka_port=b.kafka_port, kafka_controller_port=b.kafka_controller_port,
                 app_id=f"nx-{tag}", topic_events=f"{tag}.events", topic_dlq=f"{tag}.dlq",
                 topic_predictions=f"{tag}.predictions", topic_outcomes=f"{tag}.outcomes",
                 topic_model_updates=f"{tag}.model-updates", data_dir=work / "worker", models_dir=work / "models",
                 checkpoint=str(checkpoint), web_port=free_port(), trainer_port=free_port(), log_level="info",
                 trainer_start="latest", trainer_delta_interval_s=delta_interval_s,
                 **{k: v for k, v in (online_env or {}).items()})
    bs = s.bootstrap_servers
    warm, live = stream_events(stream, n_events)
    run = PipelineRun(len(live), rate)
    worker = Worker(s, work / "worker.log", extra_env={}, cwd=ROOT)
    trainer = Trainer(s, work / "trainer.log")
    t0 = time.monotonic()
    try:
        await kafka_admin.ensure_topics_async(s, [s.topic_events, s.topic_dlq, s.topic_predictions, s.topic_outcomes,
                                                  s.topic_model_updates])
        worker.start()
        await produce(s, warm, rate=None, progress=False)
        await _wait_count(bs, s.topic_predictions, len(warm), timeout, worker.check)
        trainer.start()
        trainer.wait_log(r"trainer reading", 300)
        await produce(s, live, rate=rate, progress=False)
        await _wait_count(bs, s.topic_predictions, len(warm) + len(live), timeout, worker.check)
        n_out = await _count(bs, s.topic_outcomes)
        # until the trainer has published a delta covering every outcome (or nothing more to learn)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            learned = metric(trainer.metrics(), "nextaction_online_examples_total", '{result="learned"}')
            if metric(trainer.metrics(), "nextaction_online_lag_records") == 0 and learned > 0:
                await asyncio.sleep(delta_interval_s * 2 + 1)
                break
            await asyncio.sleep(1.0)
        text = trainer.metrics()
        run.learned = int(metric(text, "nextaction_online_examples_total", '{result="learned"}'))
        learn_s = metric(text, "nextaction_online_step_seconds_sum")
        run.examples_per_s = run.learned / learn_s if learn_s else float("nan")
        trainer.stop()
        worker.stop()
        outcomes = await read_topic(bs, s.topic_outcomes)
        updates = await _read_with_headers(bs, s.topic_model_updates)
        predictions = await read_topic(bs, s.topic_predictions)
        if len(outcomes) < n_out:
            raise BenchError(f"read {len(outcomes)} outcomes back, the topic had {n_out}")
        score(run, outcomes, updates, predictions, live[0]["ts"])
    finally:
        trainer.stop()
        worker.stop()
        if own:
            with contextlib.suppress(Exception):
                broker.stop(b)
    run.seconds = time.monotonic() - t0
    return run


@dataclass
class _HRec:
    partition: int
    offset: int
    ts: int
    headers: list
    value: bytes


async def _read_with_headers(bootstrap: str, topic: str) -> list[_HRec]:
    """Every record of ``topic`` with its headers (``model-updates`` kinds)."""
    from aiokafka import AIOKafkaConsumer

    from stream_app.updates import read_range

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **client_kwargs(Settings()), enable_auto_commit=False, group_id=None,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        from benchmarks.e2e.measure import topic_partitions

        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        out = []
        for tp in tps:
            for r in await read_range(consumer, tp, 0, ends[tp], timeout_s=60):
                out.append(_HRec(r.partition, r.offset, r.timestamp, list(r.headers or []), r.value))
        return out
    finally:
        await consumer.stop()
