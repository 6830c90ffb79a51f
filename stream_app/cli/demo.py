"""``nextaction demo``: start the broker, train a small model on synthetic sessions, run a worker,
replay synthetic events of another seed over the same catalogue, and show the live predictions.

The model and the stream come from one generator (:mod:`models.datasets.synthetic`): training uses
``--dataset synthetic:n_items=N,seed=S+1``, the replay ``stream_app.replay.synthetic(..., seed=S,
n_items=N)``, so the model is asked about the structure it learnt, on users it never saw.

>>> [p.name for p in typer.main.get_command(app).params][:4]
['events', 'users', 'seed', 'items']
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from stream_app.cli import offline
from stream_app.cli.common import console, current_settings, errors, positive
from stream_app.cli.kafka import points_at_embedded
from stream_app.cli.stream import open_consumer, worker_argv
from stream_app.errors import BrokerError
from stream_app.ports import free_port, port_free
from stream_app.settings import SettingsType

app = typer.Typer()


@app.command()
def demo(
    events: int = typer.Option(3000, "--events", "-n", help="Synthetic events to replay.", callback=positive("--events")),
    users: int = typer.Option(200, "--users", "-u", help="Synthetic users.", callback=positive("--users")),
    seed: int = typer.Option(7, help="Seed of the replayed events (the model trains on seed + 1)."),
    items: int | None = typer.Option(None, "--items", help="Catalogue size of both (default: the generator's, "
                                     "models.datasets.synthetic.N_ITEMS).", callback=positive("--items")),
    rate: float = typer.Option(500.0, help="Events per second.", callback=positive("--rate")),
    show: int = typer.Option(3, help="Users shown side by side at the end (those with the most events).",
                             callback=positive("--show")),
    last: int = typer.Option(5, help="Events shown per user, each with the prediction it caused.",
                             callback=positive("--last")),
    timeout: float = typer.Option(180.0, help="Seconds to wait for the predictions after the replay.",
                                  callback=positive("--timeout")),
    train: bool = typer.Option(True, "--train/--no-train",
                               help="First train a small model on synthetic data of the same catalogue "
                                    "(nextaction train --dataset synthetic:...); else serve the baseline."),
) -> None:
    """Start the broker, run a worker, replay synthetic events and show live predictions."""
    from models.datasets.synthetic import N_ITEMS
    from stream_app import broker, kafka_admin, replay

    n_items = items or N_ITEMS
    with errors():
        settings = current_settings()
        console.rule("[bold]1. Kafka")
        if points_at_embedded(settings):
            with console.status("starting the embedded broker (first run downloads the jars)..."):
                st = broker.start(settings)
            console.print(f"Kafka {st.version} {'started' if st.started else 'already running'} on {st.bootstrap} "
                          f"(pid {st.pid})")
        else:
            kafka_admin.require_broker(settings)
            console.print(f"using the Kafka cluster at {settings.bootstrap_servers} (NEXTACTION_BROKER_URL)")
        counts = kafka_admin.ensure_topics(settings)
        console.print("topics: " + ", ".join(f"{t} ({n})" for t, n in counts.items()))

        console.rule("[bold]2. Model")
        checkpoint = settings.checkpoint or (train_model(settings, n_items, seed) if train else None)
        console.print("the worker serves " + (f"the checkpoint {checkpoint}" if checkpoint else
                                              "the popularity + Markov baseline, which learns from the stream"))

        console.rule("[bold]3. Worker")
        web_port = settings.web_port if port_free(settings.web_bind, settings.web_port) else free_port()
        log_path = Path(settings.data_dir).absolute() / "demo" / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = _spawn_worker(settings, web_port, log_path, checkpoint)
        console.print(f"worker pid {proc.pid} (web 127.0.0.1:{web_port}); log: {log_path}")
        try:
            console.rule(f"[bold]4. Replay {events:,} synthetic events (seed {seed}, {n_items:,} items) "
                         f"at {rate:,.0f}/s")
            run = asyncio.run(_demo_stream(
                settings, replay.synthetic(events, users, seed, n_items=n_items), rate, timeout, proc, log_path))
            dlq = worker_dead_letters(f"http://127.0.0.1:{web_port}/metrics")
        finally:
            with console.status("stopping the worker..."):
                code = _stop_process(proc)
            console.print(f"worker stopped (exit {code})")
        show_run(run, dlq, show, last)
        if points_at_embedded(settings):
            console.print("\nThe broker is still running: [bold]nextaction kafka stop[/] stops it "
                          "([bold]nextaction tail predictions --from-beginning --max 5[/] shows more).")


def train_model(settings: SettingsType, n_items: int, seed: int, budget_min: float = 1.0) -> Path | None:
    """Train the demo's model (``nextaction train``) on ``n_items`` and seed ``seed + 1`` into
    ``DATA_DIR/demo/model``; None (with a note) if training fails: the demo then serves the baseline."""
    out = Path(settings.data_dir).absolute() / "demo" / "model"
    dataset = f"synthetic:n_items={n_items},seed={seed + 1}"
    console.print(f"[dim]nextaction train --dataset {dataset} --out {out} --budget-min {budget_min} --threads 1[/]")
    try:
        offline.train(dataset=dataset, out=out, budget_min=budget_min, threads=1)
    except typer.Exit as exc:
        if exc.exit_code:
            console.print(f"[yellow]training failed (exit {exc.exit_code}, see above)[/]; going on without a model")
            return None
    return out


def _spawn_worker(settings: SettingsType, web_port: int, log_path: Path,
                  checkpoint: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if checkpoint is not None:
        env["NEXTACTION_CHECKPOINT"] = str(checkpoint)
    with open(log_path, "ab") as log:
        return subprocess.Popen(worker_argv(settings, "info", web_port), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM the process group, SIGKILL after ``timeout``; return the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


@dataclass
class DemoRun:
    """What the demo's replay produced: the events sent (in order), the predictions they caused, seconds."""

    events: list[dict]
    predictions: list[dict]
    elapsed: float

    @property
    def sent(self) -> int:
        return len(self.events)


async def _demo_stream(settings: SettingsType, events, rate: float, timeout: float, proc: subprocess.Popen,
                       log_path: Path) -> DemoRun:
    """Replay ``events`` while collecting the predictions they cause."""
    import orjson

    from stream_app import replay

    consumer = await open_consumer(settings, settings.topic_predictions, from_beginning=False)
    predictions: list[dict] = []

    def check_worker() -> None:
        if proc.poll() is not None:
            raise BrokerError(f"the worker exited with status {proc.returncode}; last lines of {log_path}:\n"
                              + _log_tail(log_path))

    async def collect() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=250, max_records=1000)
            for recs in batches.values():
                for rec in recs:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        predictions.append(orjson.loads(rec.value))
            check_worker()

    expected: set[tuple[Any, Any]] = set()  # (user_id, ts) of the events this demo sends
    sent_events: list[dict] = []

    def tracked():
        for event in events:
            expected.add((event.get("user_id"), event.get("ts")))
            sent_events.append(event)
            yield event

    def answered() -> int:
        return len(expected.intersection((p.get("user_id"), p.get("event_ts")) for p in predictions))

    t0 = time.monotonic()
    collector = asyncio.create_task(collect())
    try:
        producer = asyncio.create_task(replay.produce(settings, tracked(), rate, True))
        done, _ = await asyncio.wait({producer, collector}, return_when=asyncio.FIRST_COMPLETED)
        if collector in done:  # the worker died (or the consumer failed) while we were producing
            producer.cancel()
            collector.result()
        producer.result()
        deadline = time.monotonic() + timeout
        last_n, last_change = -1, time.monotonic()
        with console.status("") as status:
            while (n := answered()) < len(expected) and not collector.done():
                now = time.monotonic()
                if n != last_n:
                    last_n, last_change = n, now
                if now >= deadline or (n and now - last_change > 20):
                    break
                status.update(f"waiting for predictions: {n:,}/{len(expected):,} "
                              f"({'worker starting up' if not predictions else 'streaming'})")
                await asyncio.sleep(0.25)
        if collector.done():
            collector.result()
        if not predictions:
            raise BrokerError(f"no predictions arrived on {settings.topic_predictions!r} within {timeout:.0f} s; "
                              f"last lines of the worker log {log_path}:\n{_log_tail(log_path)}")
        ours = [p for p in predictions if (p.get("user_id"), p.get("event_ts")) in expected]
        if len(ours) < len(predictions):
            console.print(f"[dim]({len(predictions) - len(ours):,} predictions were for events of an earlier run)[/]")
        return DemoRun(sent_events, ours, time.monotonic() - t0)
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await collector
        await consumer.stop()


# --- the final view: pure functions of the run (tests/unit/stream_app/cli/test_demo.py) --------------------

def busiest_users(events: list[dict], n: int) -> list[str]:
    """The ``n`` users with the most events (ties: the one seen first).

    >>> busiest_users([{"user_id": u} for u in "abcbcc"], 2)
    ['c', 'b']
    """
    counts = Counter(str(e.get("user_id")) for e in events)
    return [u for u, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


@dataclass
class Step:
    """One event of a user, the prediction it caused (None: none arrived) and whether the event's item was
    among the items the user's previous prediction named (None: no previous prediction)."""

    event: dict
    prediction: dict | None
    hit: bool | None


def timelines(events: list[dict], predictions: list[dict], users: list[str], last: int) -> dict[str, list[Step]]:
    """Each user's ``last`` events, oldest first, each with its prediction and whether it was foreseen.

    >>> evs = [{"user_id": "u", "item_id": i, "action": "view", "ts": t} for t, i in enumerate("abc")]
    >>> preds = [{"user_id": "u", "event_ts": 0, "top_items": [["b", 0.5]]}, {"user_id": "u", "event_ts": 1,
    ...          "top_items": [["a", 0.4]]}]
    >>> [(s.event["item_id"], s.prediction is not None, s.hit) for s in timelines(evs, preds, ["u"], 3)["u"]]
    [('a', True, None), ('b', True, True), ('c', False, False)]
    """
    by_event = {(str(p.get("user_id")), p.get("event_ts")): p for p in predictions}
    out: dict[str, list[Step]] = {}
    for user in users:
        steps: list[Step] = []
        previous: dict | None = None
        for e in sorted((e for e in events if str(e.get("user_id")) == user), key=lambda e: e.get("ts") or 0):
            hit = None if previous is None else \
                str(e.get("item_id")) in {str(i[0]) for i in previous.get("top_items") or []}
            p = by_event.get((user, e.get("ts")))
            steps.append(Step(e, p, hit))
            previous = p
        out[user] = steps[-last:]
    return out


def step_text(step: Step) -> str:
    """A step as rich markup: the event (UTC time, action, item, ✓ when foreseen), then the prediction it
    caused: the most likely next action and the two most likely next items, with their probabilities.

    >>> print(step_text(Step({"ts": 0, "action": "cart", "item_id": "i7"}, {"action_probs": {"view": 0.6,
    ...       "purchase": 0.3}, "top_items": [["i7", 0.31], ["i2", 0.12], ["i9", 0.1]]}, True)))
    00:00:00 cart [bold]i7[/] [green]✓[/]
    → view 0.60
      i7 0.31 · i2 0.12
    """
    e = step.event
    ts = e.get("ts")
    when = time.strftime("%H:%M:%S", time.gmtime(ts / 1000)) if isinstance(ts, (int, float)) else "?"
    mark = {True: " [green]✓[/]", False: "", None: ""}[step.hit]
    head = f"{when} {escape(str(e.get('action')))} [bold]{escape(str(e.get('item_id')))}[/]{mark}"
    p = step.prediction
    if p is None:
        return head + "\n[yellow]→ no prediction[/]"
    probs = p.get("action_probs") or {}
    action, prob = max(probs.items(), key=lambda kv: kv[1]) if probs else ("?", 0.0)
    items = " · ".join(f"{escape(str(i))} {sc:.2f}" for i, sc in (p.get("top_items") or [])[:2])
    return head + f"\n→ {escape(str(action))} {prob:.2f}" + (f"\n  {items}" if items else "")


def users_table(lines: dict[str, list[Step]], events_per_user: Counter) -> Table:
    """The users side by side: one column each, one row per step."""
    table = Table(show_lines=True, title_justify="left",
                  title="busiest users: last events (UTC) → the prediction after each (✓: item foreseen)")
    for user in lines:
        table.add_column(f"{escape(user)} ({events_per_user[user]:,} events)")
    depth = max((len(s) for s in lines.values()), default=0)
    for row in range(depth):
        cells = []
        for steps in lines.values():
            k = row - (depth - len(steps))  # align the newest events on the last row
            cells.append(step_text(steps[k]) if k >= 0 else "")
        table.add_row(*cells)
    return table


def summary_line(sent: int, predictions: list[dict], dead_letters: int | None, elapsed: float) -> str:
    """One line: events sent, predictions, dead letters, latency p50/p99 (event → prediction, as the
    prediction records say) and the seconds from the first event sent to the last prediction read.

    >>> summary_line(4, [{"user_id": "u", "event_ts": t, "latency_ms": float(t)} for t in range(1, 4)], 1, 2.0)
    '4 events → 3 predictions, 1 dead-lettered, p50 2.0 ms, p99 3.0 ms (2.0 s)'
    """
    lats = sorted(p["latency_ms"] for p in predictions if isinstance(p.get("latency_ms"), (int, float)))
    answered = len({(p.get("user_id"), p.get("event_ts")) for p in predictions})
    line = (f"{sent:,} events → {answered:,} predictions, "
            f"{'?' if dead_letters is None else f'{dead_letters:,}'} dead-lettered")
    if lats:
        line += f", p50 {lats[len(lats) // 2]:.1f} ms, p99 {lats[min(len(lats) - 1, int(len(lats) * 0.99))]:.1f} ms"
    return line + f" ({elapsed:.1f} s)"


def worker_dead_letters(url: str) -> int | None:
    """Messages the worker dead-lettered, from its ``/metrics`` (None if it does not answer)."""
    import urllib.request

    from stream_app.status import parse_metrics

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            samples = parse_metrics(resp.read().decode())
    except (OSError, ValueError):
        return None
    return int(sum(v for _, v in samples.get("nextaction_events_rejected_total", [])))


def show_run(run: DemoRun, dead_letters: int | None, users: int, last: int) -> None:
    console.rule("[bold]5. Predictions")
    picked = busiest_users(run.events, users)
    console.print(users_table(timelines(run.events, run.predictions, picked, last),
                              Counter(str(e.get("user_id")) for e in run.events)))
    console.print(summary_line(run.sent, run.predictions, dead_letters, run.elapsed), soft_wrap=True)
    answered = len({(p.get("user_id"), p.get("event_ts")) for p in run.predictions})
    if answered < run.sent:
        console.print(f"[yellow]{run.sent - answered:,} events have no prediction yet[/] (invalid ones go to "
                      "the DLQ: nextaction tail events.dlq --from-beginning --timeout 5)")
