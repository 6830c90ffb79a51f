#!/usr/bin/env python
"""End-to-end throughput and latency: the full Faust pipeline vs a raw aiokafka pass-through.

Question: how many events/s does one worker sustain through the real broker, and what is the
event→prediction latency, compared with the ceiling of a bare consume→produce loop over the same
broker and the same data?

One run (all measurements see the same machine load, broker and data):

1. starts the embedded Apache Kafka broker on two free ports in a fresh data dir (or uses
   ``--broker kafka://host:port``), and pre-produces N events (synthetic, seeded; or the Taobao
   time slice with rebased times) into a fresh ``<run>.events`` topic;
2. **pass-through** (the ceiling): an aiokafka consumer→producer loop in this process reads each
   event (parses its JSON) and writes a small JSON record to ``<run>.passthrough``;
3. **pipeline** with the baseline predictor: a real ``faust worker`` subprocess (own app id,
   output topics and data dir) consumes the pre-produced topic from the start;
4. with ``--checkpoint DIR``: the same pipeline serving the Transformer (``NEXTACTION_CHECKPOINT``,
   ``NEXTACTION_DEVICE=cpu``);
5. with ``--rate R`` (events/s, or ``half``: half of each variant's measured maximum): a latency run
   per variant on a fresh topic, the worker already running and warm, events produced at rate R.

Definitions (all times are Kafka record CreateTimes, stamped by the producing client, ms):
  events/s   = outputs / (last output time − first output time)  (worker start-up excluded)
  e2e lat.   = output record time − input event record time. In the backlog runs (2–4) this
               includes the time the event waited in the topic, so it mostly measures the backlog;
               the ``--rate`` runs give the meaningful event→prediction latency.
  proc. lat. = the pipeline's own ``latency_ms`` (worker read → publish; in the pass-through: the
               output time − the time the loop read the event).
Every input event must give exactly one prediction or one DLQ record: the run counts missing,
duplicated and unexpected outputs by source (partition, offset).

Results go to stdout and (unless ``--no-write``) into ``benchmarks/RESULTS.md`` between
``<!-- BEGIN e2e -->`` and ``<!-- END e2e -->`` (other sections are kept).

Examples::

    .venv/bin/python benchmarks/e2e_throughput.py                       # N=100,000 synthetic
    .venv/bin/python benchmarks/e2e_throughput.py --source taobao-slice
    .venv/bin/python benchmarks/e2e_throughput.py --checkpoint var/model --rate half
    .venv/bin/python benchmarks/e2e_throughput.py -n 20000 --profile benchmarks/profiles/e2e_baseline.txt --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.datasets.core import datasets_root  # noqa: E402
from stream_app import broker, kafka_admin  # noqa: E402
from stream_app.cli import worker_argv  # noqa: E402  (the one place that names the Faust app spec)
from models.errors import BrokerError  # noqa: E402
from stream_app.settings import Settings, SettingsType  # noqa: E402

log = logging.getLogger("e2e")
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- BEGIN e2e -->", "<!-- END e2e -->"
TAOBAO_SLICE = datasets_root() / "taobao-userbehavior-timeslice" / "UserBehavior.csv"


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


# ------------------------------------------------------------------------------------------------ #
# small helpers
# ------------------------------------------------------------------------------------------------ #

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "?"


def machine() -> str:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            model = m.group(1).strip()
    return f"{model}, {os.cpu_count()} cores"


def settings_env(settings: SettingsType, extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without NEXTACTION_*, plus the variables that reproduce ``settings`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTACTION_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"NEXTACTION_{name.upper()}"] = str(value)
    env.update(extra or {})
    return env


def pct(values: Iterable[float], q: float) -> float:
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


def tail_file(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no file {path})"


# ------------------------------------------------------------------------------------------------ #
# Kafka I/O
# ------------------------------------------------------------------------------------------------ #

@dataclass
class Rec:
    partition: int
    offset: int
    ts: int  # CreateTime, ms
    key: bytes | None
    value: bytes


async def read_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> list[Rec]:
    """Every record of ``topic`` from the beginning up to its current end offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                                fetch_max_bytes=64 << 20)
    await asyncio.wait_for(consumer.start(), 30)
    out: list[Rec] = []
    try:
        parts = consumer.partitions_for_topic(topic)
        if parts is None:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topic
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
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


#: The Faust tables of the app (stream_app/app.py): their changelog topics are ``<app_id>-<table>-changelog``.
TABLES = ("histories", "activity")


async def precreate_changelogs(settings: SettingsType) -> None:
    """Create the app's changelog topics (compacted) before the worker starts.

    Works around a start-up race seen on a fresh app id: Faust creates the changelogs itself, but
    when a new topic is not yet in the consumer's metadata it is dropped from the subscription
    ("Ignoring missing topic") and the first table write then fails with PartitionsMismatch (0 partitions).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
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


async def end_offsets_sum(consumer: Any, topics: list[str]) -> int:
    from aiokafka import TopicPartition

    tps = []
    for t in topics:
        parts = consumer.partitions_for_topic(t)
        if not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            parts = consumer.partitions_for_topic(t) or set()
        tps += [TopicPartition(t, p) for p in parts]
    if not tps:
        return 0
    return sum((await consumer.end_offsets(tps)).values())


async def produce_events(settings: SettingsType, events: Iterable[dict], rate: float | None) -> int:
    from stream_app import replay

    return await replay.produce(settings, events, rate=rate, progress=False)


# ------------------------------------------------------------------------------------------------ #
# event sources
# ------------------------------------------------------------------------------------------------ #

def load_events(source: str, n: int, users: int, seed: int) -> list[dict]:
    from stream_app import replay

    if source == "synthetic":
        return list(replay.synthetic(n, users, seed))
    if source == "taobao-slice":
        if not TAOBAO_SLICE.is_file():
            raise BenchError(f"--source taobao-slice: {TAOBAO_SLICE} not found")
        src = replay.taobao_csv(TAOBAO_SLICE, rebase_time=True)
        evs = []
        for ev in src:
            evs.append(ev)
            if len(evs) >= n:
                break
        if len(evs) < n:
            log.warning("taobao slice has only %d usable rows (asked for %d)", len(evs), n)
        return evs
    raise BenchError(f"unknown --source {source!r}")


def rebase_to_now(events: list[dict]) -> list[dict]:
    """Shift event times so the newest is 'now' (keeps the worker's clock-skew check happy)."""
    from stream_app import replay

    return replay.rebase(events)


# ------------------------------------------------------------------------------------------------ #
# results of one measured phase
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

    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=True,
                                auto_commit_interval_ms=1000, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=1 << 20)
    # Same producer batching as the Faust app (producer_linger=0.005, acks=all).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all",
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


def passthrough_outputs(recs: list[Rec]) -> list[tuple[int, int, int, float | None]]:
    out = []
    for r in recs:
        d = orjson.loads(r.value)
        out.append((d["p"], d["o"], r.ts, float(r.ts - d["read_ms"])))
    return out


# ------------------------------------------------------------------------------------------------ #
# the Faust worker
# ------------------------------------------------------------------------------------------------ #

class Worker:
    """A ``faust worker`` subprocess in its own process group, with its log in a file."""

    def __init__(self, settings: SettingsType, log_path: Path, *, extra_env: dict[str, str], cwd: Path,
                 profile: Path | None = None, profiler: str = "pyinstrument", loglevel: str = "info") -> None:
        self.settings, self.log_path, self.cwd = settings, log_path, cwd
        # NB: Faust's `-l warn`/`-l error` keep its terminal spinner, which sets the ROOT logger to DEBUG:
        # every log.debug() in aiokafka/faust/mode then builds a LogRecord (findCaller...). `info` does not.
        argv = worker_argv(settings, loglevel, settings.web_port)
        if profile is not None:
            if profiler == "pyinstrument":
                # python -m faust ... -> python -m pyinstrument -o FILE -r text -m faust ...
                assert argv[1:3] == ["-m", "faust"], argv
                argv = [argv[0], "-m", "pyinstrument", "-o", str(profile), "-r", "pyisession", "-i", "0.002",
                        *argv[1:]]
            # py-spy attaches later (see attach_profiler): steady state only, all threads.
        self.argv = argv
        self.env = settings_env(settings, extra_env)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.profile, self.profiler = profile, profiler
        self.spy: subprocess.Popen | None = None

    def attach_profiler(self) -> None:
        """py-spy: sample the running worker (all threads, on-CPU only) until :meth:`detach_profiler`."""
        if self.profile is None or self.profiler != "py-spy" or self.proc is None:
            return
        spy = shutil.which("py-spy") or os.environ.get("PY_SPY", "")
        if not spy or not Path(spy).exists():
            raise BenchError("--profiler py-spy: py-spy not found on PATH or in $PY_SPY")
        self.spy = subprocess.Popen([spy, "record", "--pid", str(self.proc.pid), "--threads", "--subprocesses", "-r", "100",
                                     "-f", "raw", "-o", str(self.profile) + ".raw"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def detach_profiler(self) -> None:
        if self.spy is None:
            return
        if self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(60)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait(10)
        self.spy = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the worker exited with status {self.proc.returncode}; last lines of "
                             f"{self.log_path}:\n{tail_file(self.log_path)}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the group (graceful: Faust drains and commits), SIGKILL after ``timeout``."""
        self.detach_profiler()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker did not stop within %.0f s after SIGTERM: SIGKILL", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        # Anything left in the group (e.g. a profiler's child) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


# ------------------------------------------------------------------------------------------------ #
# the benchmark
# ------------------------------------------------------------------------------------------------ #

class Bench:
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
        if checkpoint is not None:
            env["NEXTACTION_CHECKPOINT"] = str(checkpoint)
            env.setdefault("NEXTACTION_DEVICE", "cpu")
        cwd = Path((self.args.compare_cwd or self.args.worker_cwd or ROOT) if tag.endswith("cmp")
                   else (self.args.worker_cwd or ROOT)).absolute()
        if tag.endswith("cmp"):
            env.update(dict(kv.split("=", 1) for kv in self.args.compare_env))
        w = Worker(s, self.work / f"worker-{tag}.log", extra_env=env, cwd=cwd,
                   profile=profile, profiler=self.args.profiler,
                   loglevel=(self.args.compare_loglevel or self.args.worker_loglevel) if tag.endswith("cmp")
                   else self.args.worker_loglevel)
        self.workers.append(w)
        log.info("pipeline %s (%s): %s", label, mode, " ".join(shlex.quote(a) for a in w.argv))
        w.start()
        from aiokafka import AIOKafkaConsumer

        mon = AIOKafkaConsumer(bootstrap_servers=s.bootstrap_servers, group_id=None)
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
                w.check()
                if feed is not None and feed.done() and feed.exception():
                    raise BenchError(f"producing the rate-mode events failed: {feed.exception()!r}")
                n = await end_offsets_sum(mon, out_topics)
                now = time.monotonic()
                if n and first_seen is None:
                    first_seen, n0 = now, n
                    cpu0, bcpu0 = tree_cpu_s(w.proc.pid), proc_cpu_s(self.broker_pid())
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
            cpu1, bcpu1 = tree_cpu_s(w.proc.pid), proc_cpu_s(self.broker_pid())
            metrics_text = await scrape_metrics(s.web_port) if rate is not None else None
            w.detach_profiler()
            if feed is not None:
                await feed
        finally:
            await mon.stop()
            rc = w.stop()
            log.info("worker stopped (exit %s)", rc)
        if rate is not None:
            inputs = await self.index_inputs(in_topic)
            for k in warm_keys:
                inputs.pop(k, None)
        preds = await read_topic(s.bootstrap_servers, s.topic_predictions)
        dlq = await read_topic(s.bootstrap_servers, s.topic_dlq)
        outs, versions = [], {}
        for r in preds:
            d = orjson.loads(r.value)
            if (d["partition"], d["offset"]) in warm_keys:
                continue
            outs.append((d["partition"], d["offset"], r.ts, d.get("latency_ms")))
            versions[d.get("model_version")] = versions.get(d.get("model_version"), 0) + 1
        dl = []
        for r in dlq:
            d = orjson.loads(r.value)
            src = d.get("source") or {}
            if (src.get("partition"), src.get("offset")) in warm_keys:
                continue
            dl.append((src.get("partition"), src.get("offset"), r.ts))
        ph = summarise(Phase(label, mode, len(inputs)), inputs, outs, dl)
        ph.startup_s = startup
        ph.versions = versions
        if metrics_text:
            ph.notes.append(stage_summary(metrics_text))
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
        if dlq:
            reasons: dict[str, int] = {}
            for r in dlq:
                reason = orjson.loads(r.value).get("reason")
                reasons[reason] = reasons.get(reason, 0) + 1
            ph.notes.append("DLQ reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        if checkpoint is not None and versions and all(str(v).startswith("baseline") for v in versions):
            ph.notes.append("!!! the worker served the baseline, not the checkpoint (see its log)")
        log.info("%s done: %.0f ev/s, %d outputs, %d DLQ, %d missing, %d duplicates", label, ph.eps, ph.outputs,
                 ph.dlq, ph.missing, ph.duplicates)
        return ph

    async def _warm_up(self, s: SettingsType, w: Worker, mon: Any, out_topics: list[str]) -> set[tuple[int, int]]:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
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


async def end_offsets_sum_once(bootstrap: str, topics: list[str]) -> int:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await c.start()
    try:
        return await end_offsets_sum(c, topics)
    finally:
        await c.stop()


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
    lines = [f"py-spy samples of non-idle threads (a thread blocked on a lock or queue may still count: "
             f"the infer thread's `_worker (thread.py)` self time is its wait for work)",
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


# ------------------------------------------------------------------------------------------------ #
# report
# ------------------------------------------------------------------------------------------------ #

def fmt(x: float, spec: str = ",.0f") -> str:
    return "–" if x != x else format(x, spec)  # NaN -> dash


def report(bench: Bench, command: str) -> str:
    a = bench.args
    phases = bench.phases
    lines = [
        f"**End-to-end throughput** (`benchmarks/e2e_throughput.py`), {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        f"- machine: {machine()}; the broker (JVM), the worker and this script share these cores (and with "
        "anything else running on the box: see the load average)",
        "- load average (1/5/15 min): " + "; ".join(f"{w}: {l}" for w, l in bench.loads),
        f"- data: {bench.n_inputs:,} {a.source} events"
        + (f" ({a.users:,} users, seed {a.seed})" if a.source == "synthetic" else "")
        + f", {a.partitions} partitions, pre-produced to a fresh topic; broker "
        + ("embedded Apache Kafka " + bench.broker.kafka_version if bench.own_broker else a.broker),
        f"- command: `{command}`",
        "",
        f"| run | mode | events/s | e2e p50 ms | e2e p99 ms | e2e p99 after {STEADY_AFTER_S:g} s ms | proc p50 ms "
        "| proc p99 ms | CPU ms/ev | broker CPU ms/ev | outputs | DLQ | missing | dup | start-up s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        lines.append(f"| {p.name} | {p.mode} | {fmt(p.eps)} | {fmt(p.e2e_p50)} | {fmt(p.e2e_p99)} | "
                     f"{fmt(p.e2e_p99_steady) if p.mode.startswith('rate') else '—'} | "
                     f"{fmt(p.proc_p50, ',.1f')} | {fmt(p.proc_p99, ',.1f')} | {fmt(p.cpu_ms, '.2f')} | "
                     f"{fmt(p.broker_cpu_ms, '.2f')} | {p.outputs:,} | {p.dlq:,} | "
                     f"{p.missing:,} | {p.duplicates:,} | {fmt(p.startup_s, '.1f')} |")
    lines.append("")
    pt = next((p for p in phases if p.name.startswith("pass-through") and p.mode == "backlog"), None)
    base = next((p for p in phases if "baseline" in p.name and p.mode == "backlog"), None)
    for p in phases:
        if p.mode != "backlog" or p is pt:
            continue
        parts = []
        if pt and pt.eps == pt.eps:
            parts.append(f"{p.eps / pt.eps:.1%} of the pass-through")
        if base and p is not base and base.eps == base.eps:
            parts.append(f"{p.eps / base.eps:.1%} of the baseline pipeline")
        if parts:
            lines.append(f"- {p.name}: throughput {' and '.join(parts)}")
    for p in phases:
        if p.versions:
            lines.append(f"- {p.name} ({p.mode}): model versions {p.versions}; outcomes published {p.outcomes:,}")
        if p.worst_second:
            lines.append(f"- {p.name} ({p.mode}): worst {p.worst_second}")
        for n in p.notes:
            lines.append(f"- {p.name} ({p.mode}): {n}")
    lines += [
        "",
        "events/s = outputs / (last − first output CreateTime), so worker start-up is excluded. "
        "e2e latency = output CreateTime − input event CreateTime: in `backlog` runs (the whole input was "
        "produced before the consumer started) it is dominated by the wait in the topic; `rate` runs "
        "(worker warm, events produced at that rate) give the real event→prediction latency; "
        f"`after {STEADY_AFTER_S:g} s`: the events produced from {STEADY_AFTER_S:g} s after the first one on "
        "(apart from start-up effects of a worker that just began taking traffic). "
        "proc = the worker's own `latency_ms` (read → publish; pass-through: read → output CreateTime). "
        "missing/dup: inputs with no / more than one prediction-or-DLQ record, by source partition+offset. "
        "CPU ms/ev = CPU time of the worker process (all threads, and its inference process; pass-through: this process) per output "
        "between the first and the last output, so 1000 / CPU ms/ev is what one dedicated core would sustain; "
        "broker CPU = the embedded broker's JVM over the same interval.",
    ]
    return "\n".join(lines)


def write_results(text: str, path: Path = RESULTS) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    if path.exists():
        old = path.read_text()
        if BEGIN in old and END in old and old.index(BEGIN) < old.index(END):
            new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
        else:
            new = old.rstrip("\n") + "\n\n## End to end (issue 3, item 7)\n\n" + block + "\n"
    else:
        new = ("# Benchmark results\n\nEach section is written by its script (see `benchmarks/README.md`); "
               "edit the scripts, not the generated blocks.\n\n## End to end (issue 3, item 7)\n\n" + block + "\n")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ #
# CLI
# ------------------------------------------------------------------------------------------------ #

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--events", type=int, default=100_000, help="events to pre-produce (default 100,000)")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users (default 10,000)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--source", choices=("synthetic", "taobao-slice"), default="synthetic")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (default 4)")
    p.add_argument("--broker", help="use this broker (kafka://host:port) instead of starting one")
    p.add_argument("--checkpoint", help="also run the pipeline serving this Transformer checkpoint on CPU")
    p.add_argument("--rate", help="latency runs at this many events/s, or 'half' (of each variant's max)")
    p.add_argument("--rate-events", type=int, default=0, help="events per rate run (default: rate × --rate-seconds)")
    p.add_argument("--rate-seconds", type=float, default=30.0)
    p.add_argument("--skip-passthrough", action="store_true")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--profile", help="profile one worker into this file (pyinstrument text or py-spy raw)")
    p.add_argument("--profile-run", default="base", choices=("base", "tf", "rate-base", "rate-tf"),
                   help="which worker --profile samples: the baseline or Transformer pipeline, backlog or rate "
                        "run (default base); py-spy also samples the worker's inference process")
    p.add_argument("--profiler", choices=("pyinstrument", "py-spy"), default="py-spy",
                   help="py-spy (default; attached at the first prediction, all threads, written as a hot-spot "
                        "summary; binary from PATH or $PY_SPY) or pyinstrument (whole run, main thread, .pyisession)")
    p.add_argument("--worker-env", action="append", default=[], metavar="K=V",
                   help="extra environment for the worker (e.g. NEXTACTION_MAX_BATCH=1024); repeatable")
    p.add_argument("--worker-loglevel", default="info", choices=("crit", "error", "warn", "info", "debug"),
                   help="faust worker -l (default info; warn/error are slower: see Worker)")
    p.add_argument("--no-precreate-changelogs", action="store_true",
                   help="let Faust create its changelog topics (exposes a start-up race, see precreate_changelogs)")
    p.add_argument("--worker-cwd", help="run the worker from this directory (a patched copy of the code)")
    p.add_argument("--compare-cwd", help="also run the baseline pipeline from this directory (a patched copy of "
                                         "the code, found first on sys.path), in the same run")
    p.add_argument("--compare-loglevel", choices=("crit", "error", "warn", "info", "debug"),
                   help="faust -l for the comparison worker (e.g. warn, to measure Faust's spinner/DEBUG-root cost)")
    p.add_argument("--compare-env", action="append", default=[], metavar="K=V",
                   help="extra environment for the --compare-cwd worker only (e.g. to test a setting); repeatable")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per phase before giving up")
    p.add_argument("--stall", type=float, default=60.0, help="seconds without new output before giving up waiting")
    p.add_argument("--workdir", help="keep data here (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (broker data, worker logs)")
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.relative_to(ROOT)}")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.events < 1:
        p.error("--events must be >= 1")
    if args.rate not in (None, "half"):
        try:
            if not float(args.rate) > 0:
                raise ValueError
        except ValueError:
            p.error(f"--rate must be a positive number or 'half' (got {args.rate!r})")
    for kv in args.worker_env:
        if "=" not in kv:
            p.error(f"--worker-env wants K=V (got {kv!r})")
    if args.checkpoint and not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint!r} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    command = " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                                                 os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *(argv or sys.argv[1:])])
    bench = Bench(args)
    interrupted = False

    def on_term(signum, frame):  # noqa: ARG001 - make SIGTERM run the finally: cleanup
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        bench.start_broker()
        asyncio.run(bench.main())
    except KeyboardInterrupt:
        interrupted = True
        log.error("interrupted")
    except (BenchError, BrokerError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        bench.cleanup()
    if not bench.phases:
        return 1
    text = report(bench, command)
    print("\n" + text)
    if interrupted:
        return 130
    if not args.no_write:
        write_results(text)
        print(f"\nwritten to {RESULTS}")
    bad = [p for p in bench.phases if p.missing or p.duplicates or p.unexpected]
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
