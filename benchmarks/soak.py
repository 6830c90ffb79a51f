#!/usr/bin/env python
"""Soak: one worker for ``--minutes`` at ``--fraction`` of its measured maximum rate.

Question: does a worker run for a long time at a high, steady load without leaking memory, without
its consumer lag growing, without stalling, and without losing or repeating an event?

One run:

1. starts the embedded Apache Kafka broker (or uses ``--broker``);
2. **maximum**: a worker (baseline predictor, or ``--checkpoint`` on CPU) consumes a backlog of
   ``--max-events`` pre-produced events; its events/s is the maximum (as in e2e_throughput.py);
3. **soak**: a fresh worker (own app id, tables and output topics), warmed up, then fed synthetic
   events (times = the moment they are sent) at ``fraction × maximum`` for ``--minutes``. Every
   ``--sample-s`` seconds it records the worker's RSS (the worker and its inference process), the
   group's consumer lag on ``events`` (end offsets − committed offsets, from the broker) and the
   outputs written so far;
4. after the feed: waits for the last outputs, stops the worker (SIGTERM), reads every output back
   and counts missing and duplicated ones by source (partition, offset).

Reported: RSS at start/end and its slope (least squares, MB per minute) from the moment the feed has
sent ``users × WINDOW_EVENTS`` events (every user's window full, and with it the per-user state that
grows with the window: history rows, the inference process's KV cache) to the end, and before that
for information, lag (p50/max over the run, the slope over the second half), the longest interval
without a new output while events were waiting (a stall), event→prediction latency (p50/p99), the
exact account, and a PNG (``benchmarks/soak.png``) of RSS and lag over time.

Verdict (exit status 2 when any fails; the thresholds are options): 0 missing and 0 duplicates;
RSS slope ≤ ``--max-rss-slope`` MB/min once the state is full; lag bounded (max ≤ ``--max-lag-s``
seconds of input at the soak rate, a third of that at the end of the feed); no stall longer than
``--stall-s``. (The first runs used 10 s for both lag limits and the second half of the feed for
the RSS slope; benchmarks/RESULTS.md says why they changed.)

Results go to stdout and (unless ``--no-write``) into ``benchmarks/RESULTS.md`` (section ``soak``).

Examples::

    .venv/bin/python benchmarks/soak.py                                  # 10 min at 80%, baseline
    .venv/bin/python benchmarks/soak.py --checkpoint var/model --minutes 10
    .venv/bin/python benchmarks/soak.py --minutes 1 --no-write           # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/soak.py`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import BenchError, command_line, loadavg, machine, publish  # noqa: E402
from benchmarks.e2e.measure import (  # noqa: E402
    dlq_outputs,
    end_offsets_sum,
    pct,
    pipeline_outputs,
    read_topic,
    summarise,
    Phase,
)
from benchmarks.e2e.runner import Bench, precreate_changelogs, produce_events, rebase_to_now  # noqa: E402
from benchmarks.e2e.worker import Worker, tail_file  # noqa: E402
from stream_app import kafka_admin  # noqa: E402
from stream_app.errors import BrokerError  # noqa: E402
from stream_app.kafka_security import client_kwargs  # noqa: E402
from stream_app.replay import synthetic  # noqa: E402
from stream_app.settings import Settings  # noqa: E402

log = logging.getLogger("soak")
PNG = ROOT / "benchmarks" / "soak.png"
WARMUP_S = 60.0  # RSS samples before this (s from the feed's start) are start-up, not the slope


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    p.add_argument("--fraction", type=float, default=0.8, help="of the measured maximum rate (default 0.8)")
    p.add_argument("--rate", type=float, help="soak at this many events/s instead (skips the maximum run)")
    p.add_argument("--max-events", type=int, default=30_000, help="backlog for the maximum run (default 30,000)")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users (default 10,000)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--checkpoint", help="serve this Transformer checkpoint (CPU) instead of the baseline predictor")
    p.add_argument("--broker", help="use this broker (kafka://host:port) instead of starting one")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--max-rss-slope", type=float, default=5.0, help="MB/min allowed (default 5)")
    p.add_argument("--max-lag-s", type=float, default=30.0, help="lag allowed, in seconds of input (default 30)")
    p.add_argument("--stall-s", type=float, default=15.0, help="longest interval without output allowed (default 15)")
    p.add_argument("--worker-env", action="append", default=[], metavar="K=V", help="extra worker environment")
    p.add_argument("--samples", help="also write the samples (JSON) here")
    p.add_argument("--workdir", help="keep data here (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (broker data, worker logs)")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md and the PNG")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.fraction <= 1.5:
        p.error(f"--fraction must be in (0, 1.5] (got {args.fraction})")
    if args.minutes <= 0:
        p.error(f"--minutes must be > 0 (got {args.minutes})")
    if args.checkpoint and not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint!r} does not exist")
    return args


def bench_args(a: argparse.Namespace) -> argparse.Namespace:
    """The options :class:`benchmarks.e2e.runner.Bench` reads (e2e_throughput's defaults, ours on top)."""
    from benchmarks.e2e_throughput import parse_args as e2e_args

    argv = ["-n", str(a.max_events), "--users", str(a.users), "--seed", str(a.seed), "--partitions", str(a.partitions),
            "--timeout", "900", "--stall", "60"]
    for kv in a.worker_env:
        argv += ["--worker-env", kv]
    if a.broker:
        argv += ["--broker", a.broker]
    if a.workdir:
        argv += ["--workdir", a.workdir]
    if a.keep:
        argv += ["--keep"]
    return e2e_args(argv)


# ------------------------------------------------------------------------------------------------ #
# samples
# ------------------------------------------------------------------------------------------------ #

def tree_rss_mb(pid: int) -> float:
    """Resident memory (MB) of ``pid`` and its live descendants (the worker's inference process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").glob("*"):
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024.0


@dataclass
class Sample:
    t: float  # s since the feed started
    rss_mb: float
    produced: int  # end offsets of events (the warm-up probes included)
    committed: int  # the group's committed offsets on events
    outputs: int  # predictions + DLQ records written

    @property
    def lag(self) -> int:
        """The broker's view: events not yet committed (includes up to a commit interval of events)."""
        return max(0, self.produced - self.committed)

    @property
    def unanswered(self) -> int:
        """Events without an output yet (the worker's own backlog)."""
        return max(0, self.produced - self.outputs)


@dataclass
class Soak:
    rate: float
    max_eps: float | None
    minutes: float
    users: int
    window_events: int
    samples: list[Sample] = field(default_factory=list)
    phase: Phase | None = None
    sent: int = 0
    load: list[tuple[str, str]] = field(default_factory=list)

    def slope(self, ys: list[float], ts: list[float]) -> float:
        """Least-squares slope of ``ys`` over ``ts`` (per minute)."""
        if len(ys) < 3:
            return float("nan")
        return float(np.polyfit(np.asarray(ts) / 60.0, np.asarray(ys, dtype=float), 1)[0])

    def _rss_slope(self, lo: float, hi: float) -> float:
        s = [x for x in self.samples if lo <= x.t <= hi]
        return self.slope([x.rss_mb for x in s], [x.t for x in s])

    @property
    def filled_at(self) -> float | None:
        """Seconds into the feed when it had sent ``users × window_events`` events: from then on every
        user's window is full, and so are the state that grows with it (the history rows, the
        inference process's per-user KV cache, bounded by ``KV_CACHE_MB``). None if never."""
        need = self.users * self.window_events
        first = self.samples[0].produced if self.samples else 0
        return next((x.t for x in self.samples if x.produced - first >= need), None)

    @property
    def rss_slope(self) -> float:
        """MB/min from :attr:`filled_at` to the end of the feed (NaN when that is under two minutes):
        memory that still grows there, with every per-user structure full, is a leak."""
        t = self.filled_at
        if t is None or self.minutes * 60 - t < 120:
            return float("nan")
        return self._rss_slope(t, self.minutes * 60)

    @property
    def rss_slope_filling(self) -> float:
        return self._rss_slope(WARMUP_S, self.filled_at or self.minutes * 60)

    @property
    def lag_slope(self) -> float:
        end = self.minutes * 60
        s = [x for x in self.samples if end / 2 <= x.t <= end]
        return self.slope([x.lag for x in s], [x.t for x in s])

    @property
    def longest_stall(self) -> float:
        """Longest time between samples with pending events during which no output was written."""
        worst, since = 0.0, None
        for prev, cur in zip(self.samples, self.samples[1:]):
            if cur.outputs == prev.outputs and prev.produced > prev.outputs:
                since = prev.t if since is None else since
                worst = max(worst, cur.t - since)
            else:
                since = None
        return worst


async def committed_sum(settings, consumer) -> int:
    """Sum of the group's committed offsets on ``events`` (0 for a partition without a commit)."""
    from aiokafka import TopicPartition

    total = 0
    for p in range(settings.partitions):
        total += await consumer.committed(TopicPartition(settings.topic_events, p)) or 0
    return total


def live_events(n: int, users: int, seed: int):
    """``n`` synthetic events (sessions of ``users`` users), each stamped with the time it is sent."""
    for ev in synthetic(n, users, seed):
        yield {**ev, "ts": int(time.time() * 1000)}


async def soak(bench: Bench, a: argparse.Namespace, rate: float, result: Soak) -> None:
    from aiokafka import AIOKafkaConsumer

    topic = f"{bench.run_id}.soak.events"
    await bench.create_events_topic(topic)
    s = bench.app_settings("soak", topic)
    await kafka_admin.ensure_topics_async(s, [s.topic_dlq, s.topic_predictions, s.topic_outcomes, s.topic_model_updates],
                                          partitions=a.partitions)
    await precreate_changelogs(s)
    env = dict(kv.split("=", 1) for kv in a.worker_env)
    if a.checkpoint:
        env["NEXTACTION_CHECKPOINT"] = str(Path(a.checkpoint).absolute())
        env.setdefault("NEXTACTION_DEVICE", "cpu")
    w = Worker(s, bench.work / "worker-soak.log", extra_env=env, cwd=ROOT)
    bench.workers.append(w)
    w.start()
    mon = AIOKafkaConsumer(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s), group_id=None)
    grp = AIOKafkaConsumer(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s), group_id=s.app_id,
                           enable_auto_commit=False)  # never subscribes: only reads the group's commits
    await asyncio.wait_for(mon.start(), 30)
    await asyncio.wait_for(grp.start(), 30)
    out_topics = [s.topic_predictions, s.topic_dlq]
    try:
        warm = await bench._warm_up(s, w, mon, out_topics)  # noqa: SLF001 - the e2e runner's warm-up
        n = int(rate * a.minutes * 60)
        log.info("worker warm after %.1f s; soaking at %.0f ev/s for %.1f min (%d events)",
                 time.monotonic() - w.started, rate, a.minutes, n)
        result.load.append(("soak start", loadavg()))
        t0 = time.monotonic()
        feed = asyncio.ensure_future(produce_events(s, live_events(n, a.users, a.seed + 1), rate))
        next_sample = t0
        while True:
            w.check()
            if feed.done() and feed.exception():
                raise BenchError(f"producing the soak events failed: {feed.exception()!r}")
            now = time.monotonic()
            if now >= next_sample:
                produced = await end_offsets_sum(mon, [topic])
                result.samples.append(Sample(now - t0, tree_rss_mb(w.proc.pid), produced,
                                             await committed_sum(s, grp), await end_offsets_sum(mon, out_topics)))
                x = result.samples[-1]
                if len(result.samples) % 12 == 0:
                    log.info("t=%4.0f s: RSS %.0f MB, lag %d, outputs %d", x.t, x.rss_mb, x.lag, x.outputs)
                next_sample += a.sample_s
            if feed.done():
                x = result.samples[-1]
                if x.outputs >= len(warm) + n and x.lag == 0:
                    break
                if now - t0 > a.minutes * 60 + 300:
                    raise BenchError(f"soak: {x.outputs:,}/{len(warm) + n:,} outputs, lag {x.lag} five minutes after "
                                     f"the feed ended; worker log {w.log_path}:\n{tail_file(w.log_path)}")
            await asyncio.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
        result.sent = await feed
        result.load.append(("soak end", loadavg()))
    finally:
        await mon.stop()
        await grp.stop()
        rc = w.stop()
        log.info("worker stopped (exit %s)", rc)
    inputs = await bench.index_inputs(topic)
    for k in warm:
        inputs.pop(k, None)
    preds = await read_topic(s.bootstrap_servers, s.topic_predictions, timeout=600)
    dlq = await read_topic(s.bootstrap_servers, s.topic_dlq, timeout=600)
    outs, versions = pipeline_outputs(preds, warm)
    result.phase = summarise(Phase("soak", f"rate {rate:.0f}/s", len(inputs)), inputs, outs, dlq_outputs(dlq, warm))
    result.phase.versions = versions


# ------------------------------------------------------------------------------------------------ #
# report
# ------------------------------------------------------------------------------------------------ #

def verdict(r: Soak, a: argparse.Namespace) -> list[str]:
    """The failed checks (empty: passed)."""
    bad = []
    ph = r.phase
    if ph.missing or ph.duplicates or ph.unexpected:
        bad.append(f"{ph.missing} missing, {ph.duplicates} duplicated, {ph.unexpected} unexpected outputs")
    if r.rss_slope != r.rss_slope:  # NaN: the state was not full for two minutes
        bad.append(f"no RSS verdict: the feed did not send {r.users:,} users × {r.window_events} events two minutes "
                   f"before its end (run longer, or with fewer --users)")
    elif r.rss_slope > a.max_rss_slope:
        bad.append(f"RSS grows {r.rss_slope:.2f} MB/min once the state is full (> {a.max_rss_slope})")
    lag_limit = a.max_lag_s * r.rate
    soak_samples = [x for x in r.samples if x.t <= a.minutes * 60]
    max_lag = max(x.lag for x in soak_samples)
    if max_lag > lag_limit:
        bad.append(f"lag reached {max_lag:,} events (> {lag_limit:,.0f} = {a.max_lag_s:.0f} s of input)")
    if soak_samples[-1].lag > lag_limit / 3:
        bad.append(f"lag at the end of the feed {soak_samples[-1].lag:,} (> {lag_limit / 3:,.0f} = "
                   f"{a.max_lag_s / 3:.0f} s of input)")
    if r.longest_stall > a.stall_s:
        bad.append(f"no output for {r.longest_stall:.0f} s while events waited (> {a.stall_s:.0f} s)")
    return bad


def plot(r: Soak, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray([x.t for x in r.samples]) / 60.0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    ax1.plot(t, [x.rss_mb for x in r.samples], color="tab:blue")
    ax1.set_ylabel("worker RSS (MB)\nworker + inference process")
    ax1.grid(alpha=0.3)
    ax2.plot(t, [x.lag for x in r.samples], color="tab:red")
    ax2.set_ylabel("consumer lag (events)\nend − committed offsets")
    ax2.set_xlabel("minutes since the feed started")
    ax2.axvline(r.minutes, color="grey", ls="--", lw=0.8)
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(r: Soak, a: argparse.Namespace, command: str, bad: list[str], png: Path | None) -> str:
    ph = r.phase
    soak_samples = [x for x in r.samples if x.t <= a.minutes * 60]
    lags = [x.lag for x in soak_samples]
    rss = [x.rss_mb for x in r.samples]
    model = "Transformer (CPU)" if a.checkpoint else "baseline predictor"
    rate_from = (f"{a.fraction:.0%} of the measured maximum {r.max_eps:,.0f} ev/s" if r.max_eps
                 else "given with --rate")
    lines = [
        "## Soak (issue 14)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}; embedded broker on the "
        f"same machine; load average {', '.join(f'{w}: {v}' for w, v in r.load)}.",
        f"Command: `{command}`",
        "",
        f"One worker ({model}, {a.partitions} partitions) fed {r.sent:,} synthetic events ({a.users:,} users) at "
        f"**{r.rate:,.0f} events/s** ({rate_from}) for {a.minutes:g} minutes; sampled every {a.sample_s:g} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| events in / predictions / DLQ | {ph.inputs:,} / {ph.outputs:,} / {ph.dlq:,} |",
        f"| missing / duplicated | {ph.missing} / {ph.duplicates} |",
        f"| RSS start → end (max) | {rss[0]:,.0f} → {rss[-1]:,.0f} MB ({max(rss):,.0f}) |",
        f"| every user's window full after | {r.filled_at or float('nan'):,.0f} s ({r.users:,} users × "
        f"{r.window_events} events) |",
        f"| RSS slope from then to the end of the feed (verdict) | {r.rss_slope:+.2f} MB/min (least squares) |",
        f"| RSS slope, first minute until then (state filling) | {r.rss_slope_filling:+.2f} MB/min |",
        f"| consumer lag p50 / p99 / max | {pct(lags, 50):,.0f} / {pct(lags, 99):,.0f} / {max(lags):,} events |",
        f"| lag at the end of the feed | {soak_samples[-1].lag:,} events |",
        f"| events without an output yet, p50 / max | {pct([x.unanswered for x in soak_samples], 50):,.0f} / "
        f"{max(x.unanswered for x in soak_samples):,} |",
        f"| lag slope, second half | {r.lag_slope:+,.1f} events/min |",
        f"| longest interval without output while events waited | {r.longest_stall:.1f} s |",
        f"| event→prediction p50 / p99 / max | {ph.e2e_p50:,.0f} / {ph.e2e_p99:,.0f} / {ph.e2e_max:,.0f} ms |",
        f"| worker latency_ms p50 / p99 | {ph.proc_p50:,.1f} / {ph.proc_p99:,.1f} ms |",
        "",
        ("**Verdict: passed** (0 missing, 0 duplicated; RSS slope ≤ "
         f"{a.max_rss_slope:g} MB/min once the state is full; lag ≤ {a.max_lag_s:g} s of input, ≤ "
         f"{a.max_lag_s / 3:g} s at the end of the feed; no stall over {a.stall_s:g} s)."
         if not bad else "**Verdict: FAILED**: " + "; ".join(bad) + "."),
    ]
    if png is not None:
        lines += ["", f"![RSS and consumer lag during the soak]({png.name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    command = command_line(argv)
    bench = Bench(bench_args(a))
    bench.run_id = bench.run_id.replace("e2e-", "soak-")

    def on_term(signum, frame):  # noqa: ARG001 - make SIGTERM run the finally: cleanup
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    result: Soak | None = None
    try:
        bench.start_broker()

        async def run() -> Soak:
            max_eps = None
            rate = a.rate
            if rate is None:
                topic = f"{bench.run_id}.max.events"
                await bench.create_events_topic(topic)
                evs = rebase_to_now(list(synthetic(a.max_events, a.users, a.seed)))
                await produce_events(bench.broker.model_copy(update={"topic_events": topic}), evs, None)
                inputs = await bench.index_inputs(topic)
                ph = await bench.run_pipeline("max", "maximum", topic, inputs,
                                              checkpoint=Path(a.checkpoint).absolute() if a.checkpoint else None)
                if ph.missing or ph.duplicates:
                    raise BenchError(f"maximum run: {ph.missing} missing, {ph.duplicates} duplicated")
                max_eps = ph.eps
                rate = a.fraction * max_eps
                log.info("maximum %.0f ev/s -> soak at %.0f ev/s", max_eps, rate)
            r = Soak(rate, max_eps, a.minutes, a.users, Settings().window_events)
            await soak(bench, a, rate, r)
            return r

        result = asyncio.run(run())
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except (BenchError, BrokerError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        bench.cleanup()
    if a.samples:
        Path(a.samples).write_text(json.dumps([asdict(x) for x in result.samples]))
    bad = verdict(result, a)
    png = None
    if not a.no_write:
        png = PNG
        plot(result, png, f"soak: {result.rate:,.0f} ev/s for {a.minutes:g} min, "
                          f"{'Transformer' if a.checkpoint else 'baseline'} ({time.strftime('%Y-%m-%d')})")
    print()
    publish("soak", report(result, a, command, bad, png), write=not a.no_write)
    if bad:
        log.error("soak failed: %s", "; ".join(bad))
    return 2 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
