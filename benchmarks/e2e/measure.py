"""Measurements of the end-to-end benchmark: what came out, how fast, at what CPU cost, where the time went.

* reading a topic back (:func:`read_topic`) and the sum of end offsets (how many outputs so far);
* CPU seconds of a process and of its children (``/proc``);
* :class:`Phase`, the results of one measured run, and :func:`summarise`, which fills it from the
  input events and the outputs (throughput, e2e and processing latency percentiles, the exact
  account of missing / duplicated / unexpected outputs);
* parsing the pass-through's, the pipeline's and the DLQ's records into ``(partition, offset, time, latency)``;
* the worker's ``/metrics`` (:func:`scrape_metrics`, :func:`stage_summary`) and py-spy's stacks
  (:func:`spy_summary`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import orjson

from benchmarks.common import BenchError
from stream_app.kafka_security import client_kwargs
from stream_app.settings import Settings

log = logging.getLogger("e2e")


# ------------------------------------------------------------------------------------------------ #
# CPU and percentiles
# ------------------------------------------------------------------------------------------------ #

def pct(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile of ``values``; NaN when there are none."""
    a = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    return float(np.percentile(a, q)) if a.size else float("nan")


def proc_cpu_s(pid: int | None) -> float:
    """User+system CPU seconds of process ``pid`` (all its threads) so far; NaN if unknown."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def tree_cpu_s(pid: int | None) -> float:
    """:func:`proc_cpu_s` of ``pid`` plus its live descendants (the worker's inference process)."""
    if pid is None:
        return float("nan")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += proc_cpu_s(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
    return total


# ------------------------------------------------------------------------------------------------ #
# reading topics back
# ------------------------------------------------------------------------------------------------ #

@dataclass
class Rec:
    partition: int
    offset: int
    ts: int  # CreateTime, ms
    key: bytes | None
    value: bytes


async def topic_partitions(consumer: Any, topic: str) -> list[Any]:
    """The partitions (``TopicPartition``) of ``topic`` as ``consumer`` knows them, its metadata refreshed
    once if it knows none (a fresh topic); empty if the topic has none."""
    from aiokafka import TopicPartition

    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topic
        parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def read_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> list[Rec]:
    """Every record of ``topic`` from the beginning up to its current end offsets."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **client_kwargs(Settings()), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                                fetch_max_bytes=64 << 20)
    await asyncio.wait_for(consumer.start(), 30)
    out: list[Rec] = []
    try:
        tps = await topic_partitions(consumer, topic)
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise BenchError(f"reading {topic!r} back took more than {timeout:.0f} s")
            batches = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for tp, recs in batches.items():
                for r in recs:
                    out.append(Rec(r.partition, r.offset, r.timestamp, r.key, r.value))
                if recs and recs[-1].offset + 1 >= end[tp]:
                    todo.discard(tp)
            for tp in list(todo):
                if await consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
    finally:
        await consumer.stop()
    return out


async def end_offsets_sum(consumer: Any, topics: list[str]) -> int:
    """The sum of the end offsets of ``topics`` (records written so far, on fresh topics)."""
    tps = []
    for t in topics:
        tps += await topic_partitions(consumer, t)
    if not tps:
        return 0
    return sum((await consumer.end_offsets(tps)).values())


async def end_offsets_sum_once(bootstrap: str, topics: list[str]) -> int:
    """:func:`end_offsets_sum` with a consumer of its own."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, **client_kwargs(Settings()), group_id=None)
    await c.start()
    try:
        return await end_offsets_sum(c, topics)
    finally:
        await c.stop()


# ------------------------------------------------------------------------------------------------ #
# one measured phase
# ------------------------------------------------------------------------------------------------ #

@dataclass
class Phase:
    name: str
    mode: str  # backlog | rate R
    inputs: int
    outputs: int = 0
    dlq: int = 0
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0
    eps: float = float("nan")
    e2e_p50: float = float("nan")
    e2e_p99: float = float("nan")
    e2e_max: float = float("nan")
    e2e_p99_steady: float = float("nan")  # rate runs: events from STEADY_AFTER_S after the first one on
    worst_second: str = ""  # rate runs: the second (from the first event) with the highest p99
    proc_p50: float = float("nan")
    proc_p99: float = float("nan")
    span_s: float = float("nan")
    startup_s: float = float("nan")
    outcomes: int = 0
    cpu_ms: float = float("nan")  # worker (or pass-through loop) CPU ms per event, steady state
    broker_cpu_ms: float = float("nan")  # broker JVM CPU ms per event over the same interval
    versions: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def stage_summary(metrics_text: str) -> str:
    """One line from a worker's ``/metrics`` text: where an event's time in the worker went
    (``nextaction_stage_latency_seconds``: mean and the p99 bucket bound per stage) and the batches.

    >>> txt = "\\n".join([
    ...     'nextaction_stage_latency_seconds_bucket{le="0.005",stage="queue"} 9.0',
    ...     'nextaction_stage_latency_seconds_bucket{le="0.01",stage="queue"} 10.0',
    ...     'nextaction_stage_latency_seconds_bucket{le="+Inf",stage="queue"} 10.0',
    ...     'nextaction_stage_latency_seconds_count{stage="queue"} 10.0',
    ...     'nextaction_stage_latency_seconds_sum{stage="queue"} 0.03',
    ...     'nextaction_batch_size_count 4.0', 'nextaction_batch_size_sum 10.0',
    ...     'nextaction_inference_process_seconds_bucket{clock="cpu",le="0.005"} 4.0',
    ...     'nextaction_inference_process_seconds_bucket{clock="cpu",le="+Inf"} 4.0',
    ...     'nextaction_inference_process_seconds_count{clock="cpu"} 4.0',
    ...     'nextaction_inference_process_seconds_sum{clock="cpu"} 0.012', ''])
    >>> stage_summary(txt)
    'worker stages (mean / p99 bucket bound, ms): queue 3.0 / ≤10, inference process per batch cpu 3.0 / ≤5; batches 4, mean size 2.5'
    """
    from prometheus_client.parser import text_string_to_metric_families

    stages: dict[str, dict] = {}
    batches = {}
    for fam in text_string_to_metric_families(metrics_text):
        for smp in fam.samples:
            if smp.name.startswith(("nextaction_stage_latency_seconds", "nextaction_inference_process_seconds",
                                    "nextaction_gc_pause_seconds")):
                if "generation" in smp.labels:
                    if smp.labels["generation"] != "2":
                        continue
                    name = "full GC pause"
                else:
                    name = smp.labels.get("stage") or "inference process per batch " + smp.labels.get("clock", "?")
                st = stages.setdefault(name, {"buckets": []})
                if smp.name.endswith("_bucket"):
                    st["buckets"].append((float(smp.labels["le"]), smp.value))
                elif smp.name.endswith(("_count", "_sum")):
                    st[smp.name.rsplit("_", 1)[1]] = smp.value
            elif smp.name in ("nextaction_batch_size_count", "nextaction_batch_size_sum"):
                batches[smp.name.rsplit("_", 1)[1]] = smp.value
    parts = []
    for name, st in stages.items():
        n = st.get("count", 0.0)
        if not n:
            continue
        bound = next((le for le, c in sorted(st["buckets"]) if c >= 0.99 * n), float("inf"))
        count = f" ×{n:.0f}" if name == "full GC pause" else ""
        parts.append(f"{name}{count} {1000 * st.get('sum', 0.0) / n:.1f} / ≤{1000 * bound:g}")
    out = "worker stages (mean / p99 bucket bound, ms): " + ", ".join(parts)
    if batches.get("count"):
        out += f"; batches {batches['count']:.0f}, mean size {batches['sum'] / batches['count']:.1f}"
    return out


def write_load(per_topic: dict[str, tuple[int, int]], events: int) -> str:
    """One line: records and bytes (key + value) written per input event, per topic and in all; the
    broker's write load per 1,000 events/s follows (docs/scaling.md).

    >>> write_load({"predictions": (1000, 300_000), "histories-changelog": (400, 200_000)}, 1000)
    'written per event: predictions 1.00 rec / 300 B, histories-changelog 0.40 rec / 200 B; all 1.40 rec / 500 B'
    """
    parts = [f"{name} {n / events:.2f} rec / {size / events:,.0f} B" for name, (n, size) in per_topic.items()]
    n_all = sum(n for n, _ in per_topic.values())
    b_all = sum(b for _, b in per_topic.values())
    return f"written per event: {', '.join(parts)}; all {n_all / events:.2f} rec / {b_all / events:,.0f} B"


def group_summary(metrics_texts: list[str | None], events_topic: str) -> str:
    """One line: how a group of workers shared the work (from each worker's ``/metrics``): predictions
    each published and partitions of the events topic each held at the end.

    >>> page = lambda preds, parts: (f'nextaction_predictions_out_total{{model_version="b"}} {preds}\\n'
    ...                              f'nextaction_assigned_partitions{{topic="ev"}} {parts}\\n')
    >>> group_summary([page(600.0, 2.0), page(400.0, 2.0), None], "ev")
    'workers: predictions 600 / 400 / ? ; events partitions held 2 / 2 / ?'
    """
    def total(text: str | None, prefix: str) -> str:
        if text is None:
            return "?"
        return f"{sum(float(line.rsplit(' ', 1)[1]) for line in text.splitlines() if line.startswith(prefix)):.0f}"

    preds = " / ".join(total(t, "nextaction_predictions_out_total") for t in metrics_texts)
    parts = " / ".join(total(t, f'nextaction_assigned_partitions{{topic="{events_topic}"}}') for t in metrics_texts)
    return f"workers: predictions {preds} ; events partitions held {parts}"


async def scrape_metrics(port: int, timeout: float = 10.0) -> str | None:
    """The worker's ``/metrics`` page, or None if it cannot be read."""
    import urllib.request

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:  # noqa: S310
            return r.read().decode()

    try:
        return await asyncio.get_running_loop().run_in_executor(None, get)
    except OSError as exc:
        log.warning("could not read the worker's /metrics on port %d: %s", port, exc)
        return None


#: Rate runs also report the e2e p99 of the events produced this long after the first one, apart from
#: start-up effects of a worker that just began taking traffic (its first seconds once had a stall:
#: the first outcome waited for topic metadata, RESULTS.md e2e-analysis; and a replay from the log's
#: beginning starts with only new users: empty windows and KV cache).
STEADY_AFTER_S = 5.0


def summarise(phase: Phase, inputs: dict[tuple[int, int], int], outs: list[tuple[int, int, int, float | None]],
              dlq: list[tuple[int, int, int]]) -> Phase:
    """Fill ``phase`` from outputs ``(src partition, src offset, out CreateTime, proc latency ms)`` and DLQ.

    >>> ins = {(0, i): 1000 * i for i in range(10)}  # one event per second, the first two slow
    >>> outs = [(0, i, 1000 * i + (500 if i < 2 else 10), 1.0) for i in range(10)]
    >>> ph = summarise(Phase("x", "rate 1/s", 10), ins, outs, [])
    >>> ph.e2e_p99 > 400, ph.e2e_p99_steady, ph.worst_second, ph.missing
    (True, 10.0, 'second 0 (p99 500 ms)', 0)
    """
    seen: dict[tuple[int, int], int] = {}
    lat, lat_in, proc, times = [], [], [], []
    # predictions carry a latency; DLQ records only count towards the exact account
    records = [(p, o, ts, pl, True) for p, o, ts, pl in outs] + [(p, o, ts, None, False) for p, o, ts in dlq]
    for p, o, ts, pl, is_prediction in records:
        k = (p, o)
        if k not in inputs:
            phase.unexpected += 1
            continue
        seen[k] = seen.get(k, 0) + 1
        if seen[k] > 1:
            phase.duplicates += 1
            continue
        times.append(ts)
        if is_prediction:
            lat.append(ts - inputs[k])
            lat_in.append(inputs[k])
            if pl is not None:
                proc.append(pl)
    phase.outputs = len(lat)
    phase.dlq = sum(1 for p, o, _ in dlq if (p, o) in inputs)
    phase.missing = sum(1 for k in inputs if k not in seen)
    if len(times) >= 2:
        t = np.asarray(times)
        phase.span_s = (t.max() - t.min()) / 1000.0
        phase.eps = (len(times) - 1) / phase.span_s if phase.span_s > 0 else float("nan")
    if lat:
        a = np.asarray(lat, dtype=float)
        phase.e2e_p50, phase.e2e_p99, phase.e2e_max = pct(a, 50), pct(a, 99), float(a.max())
        if phase.mode.startswith("rate"):
            t_in = np.asarray(lat_in, dtype=float)
            since = (t_in - t_in.min()) / 1000.0  # s from the first measured event
            phase.e2e_p99_steady = pct(a[since >= STEADY_AFTER_S], 99)
            sec = since.astype(int)
            worst = max(range(sec.max() + 1), key=lambda k: pct(a[sec == k], 99) if (sec == k).any() else -1.0)
            phase.worst_second = f"second {worst} (p99 {pct(a[sec == worst], 99):,.0f} ms)"
    if proc:
        b = np.asarray(proc, dtype=float)
        phase.proc_p50, phase.proc_p99 = pct(b, 50), pct(b, 99)
    return phase


def passthrough_outputs(recs: list[Rec]) -> list[tuple[int, int, int, float | None]]:
    out = []
    for r in recs:
        d = orjson.loads(r.value)
        out.append((d["p"], d["o"], r.ts, float(r.ts - d["read_ms"])))
    return out


def pipeline_outputs(recs: list[Rec], skip: set[tuple[int, int]]
                     ) -> tuple[list[tuple[int, int, int, float | None]], dict[Any, int]]:
    """The worker's predictions as ``(src partition, src offset, out CreateTime, latency_ms)``, and how
    many each model version served; predictions of the inputs in ``skip`` (warm-up probes) left out."""
    outs, versions = [], {}
    for r in recs:
        d = orjson.loads(r.value)
        if (d["partition"], d["offset"]) in skip:
            continue
        outs.append((d["partition"], d["offset"], r.ts, d.get("latency_ms")))
        versions[d.get("model_version")] = versions.get(d.get("model_version"), 0) + 1
    return outs, versions


def dlq_outputs(recs: list[Rec], skip: set[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The DLQ records as ``(src partition, src offset, out CreateTime)``, those of ``skip`` left out."""
    dl = []
    for r in recs:
        d = orjson.loads(r.value)
        src = d.get("source") or {}
        if (src.get("partition"), src.get("offset")) in skip:
            continue
        dl.append((src.get("partition"), src.get("offset"), r.ts))
    return dl


def dlq_reasons(recs: list[Rec]) -> str:
    """``DLQ reasons: <reason> <count>, ...`` over every DLQ record."""
    reasons: dict[str, int] = {}
    for r in recs:
        reason = orjson.loads(r.value).get("reason")
        reasons[reason] = reasons.get(reason, 0) + 1
    return "DLQ reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))


# ------------------------------------------------------------------------------------------------ #
# profiles
# ------------------------------------------------------------------------------------------------ #

def spy_summary(raw: Path, header: str, top: int = 40) -> str:
    """Hot spots from py-spy's raw (collapsed) stacks: per thread, self and inclusive % of samples."""
    from collections import Counter

    per_thread: dict[str, tuple[Counter, Counter, list]] = {}
    for line in raw.read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        if not stack or not n_s.isdigit():
            continue
        n = int(n_s)
        frames = stack.split(";")
        proc = ""
        if frames[0].startswith("process ") and len(frames) > 1:  # py-spy --subprocesses
            proc = ("inference process " if "multiprocessing" in frames[0] else "worker ")
            frames = frames[1:]
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0]).replace("process ", "")
        thread = proc + re.sub(r"_\d+$", "", thread)
        incl, own, tot = per_thread.setdefault(thread, (Counter(), Counter(), [0]))
        names = [re.sub(r" \((?:.*/)?([^/:]+)(?::\d+)?\)$", r" (\1)", f) for f in frames[1:]]
        for f in set(names):
            incl[f] += n
        if names:
            own[names[-1]] += n
        tot[0] += n
    lines = ["py-spy samples of non-idle threads (a thread blocked on a lock or queue may still count: "
             "the infer thread's `_worker (thread.py)` self time is its wait for work)",
             header, ""]
    grand = sum(t[0] for _, _, t in per_thread.values()) or 1
    for thread, (incl, own, tot) in sorted(per_thread.items(), key=lambda kv: -kv[1][2][0]):
        lines.append(f"=== thread {thread}: {tot[0]} samples ({tot[0] / grand:.0%} of all) ===")
        lines.append("-- self (top) --")
        lines += [f"{100 * c / tot[0]:6.1f}%  {f}" for f, c in own.most_common(top // 2)]
        lines.append("-- inclusive (top; frames above the event loop omitted) --")
        skip = ("<module>", "_run_code", "_run_module_as_main", "Command.", "Group.", "Context.invoke", "new_func",
                "_inner", "Worker.execute_from_commandline", "run_forever", "run_until_complete", "_run_once",
                "Handle._run", "_worker (thread.py)", "Thread.run", "Thread._bootstrap")
        shown = [(f, c) for f, c in incl.most_common(top * 2) if not any(f.startswith(k) or k in f for k in skip)]
        lines += [f"{100 * c / tot[0]:6.1f}%  {f}" for f, c in shown[:top]]
        lines.append("")
    return "\n".join(lines)
