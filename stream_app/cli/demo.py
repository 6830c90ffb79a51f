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
    show: int = typer.Option(15, help="Predictions to show in the table.", callback=positive("--show")),
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
            predictions, sent, elapsed = asyncio.run(_demo_stream(
                settings, replay.synthetic(events, users, seed, n_items=n_items), rate, timeout, proc, log_path))
        finally:
            with console.status("stopping the worker..."):
                code = _stop_process(proc)
            console.print(f"worker stopped (exit {code})")
        _show_predictions(predictions, sent, elapsed, show)
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


async def _demo_stream(settings: SettingsType, events, rate: float, timeout: float, proc: subprocess.Popen,
                       log_path: Path) -> tuple[list[dict], int, float]:
    """Replay ``events`` while collecting the predictions they cause; return (predictions, sent, seconds)."""
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

    def tracked():
        for event in events:
            expected.add((event.get("user_id"), event.get("ts")))
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
        sent = producer.result()
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
        return ours, sent, time.monotonic() - t0
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await collector
        await consumer.stop()


def _show_predictions(predictions: list[dict], sent: int, elapsed: float, show: int) -> None:
    console.rule("[bold]5. Predictions")
    table = Table(title=f"last {min(show, len(predictions))} of {len(predictions):,} predictions", show_lines=False)
    for col, kw in (("user", {}), ("event time", {}), ("model", {}), ("next action", {}), ("top items", {}),
                    ("next gap", {"justify": "right"}), ("latency", {"justify": "right"})):
        table.add_column(col, **kw)
    for p in predictions[-show:]:
        probs = p.get("action_probs") or {}
        best = max(probs.items(), key=lambda kv: kv[1]) if probs else ("?", 0.0)
        items = ", ".join(str(i[0]) for i in (p.get("top_items") or [])[:3])
        ts = p.get("event_ts")
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(ts / 1000)) if isinstance(ts, (int, float)) else "?"
        gap = p.get("next_gap_s")
        gap_s = f"{gap:,.0f} s" if isinstance(gap, (int, float)) else escape(str(gap))
        lat = p.get("latency_ms")
        lat_s = f"{lat:.1f} ms" if isinstance(lat, (int, float)) else "?"
        table.add_row(escape(str(p.get("user_id"))), when, escape(str(p.get("model_version", "?"))),
                      f"{best[0]} ({best[1]:.2f})", escape(items), gap_s, lat_s)
    console.print(table)
    lats = sorted(p["latency_ms"] for p in predictions if isinstance(p.get("latency_ms"), (int, float)))
    answered = len({(p.get("user_id"), p.get("event_ts")) for p in predictions})
    summary = f"{answered:,} of {sent:,} events got a prediction in {elapsed:.1f} s"
    if lats:
        summary += (f"; latency p50 {lats[len(lats) // 2]:.1f} ms, "
                    f"p99 {lats[min(len(lats) - 1, int(len(lats) * 0.99))]:.1f} ms")
    console.print(summary)
    if answered < sent:
        console.print(f"[yellow]{sent - answered:,} events have no prediction yet[/] (invalid ones go to "
                      "the DLQ: nextaction tail events.dlq --from-beginning --timeout 5)")
