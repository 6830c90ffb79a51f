"""The report of the end-to-end benchmark: the markdown block (table, ratios, notes, definitions) and
its place in ``benchmarks/RESULTS.md`` (the ``e2e`` section, under "## End to end (issue 3, item 7)").
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import RESULTS, machine, publish
from benchmarks.e2e.measure import STEADY_AFTER_S

if TYPE_CHECKING:
    from benchmarks.e2e.runner import Bench

SECTION = "e2e"
#: The heading the ``e2e`` block goes under when RESULTS.md does not have it yet.
HEADING = "## End to end (issue 3, item 7)"


def fmt(x: float, spec: str = ",.0f") -> str:
    """``x`` formatted, or a dash for NaN.

    >>> fmt(1234.4), fmt(float("nan"))
    ('1,234', '–')
    """
    return "–" if x != x else format(x, spec)  # NaN -> dash


def report(bench: Bench, command: str) -> str:
    """The markdown block of one run: the machine, load, data and command, one table row per phase, the
    throughput ratios, per-phase notes and the definitions."""
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


def publish_report(text: str, *, write: bool, path: Path = RESULTS) -> None:
    """Print the report and, if ``write``, put it into the ``e2e`` section of RESULTS.md."""
    publish(SECTION, text, write=write, path=path, heading=HEADING)
