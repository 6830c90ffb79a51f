"""The ``nextaction`` command line.

``nextaction kafka start|stop|status|logs``  the embedded single-node broker (:mod:`stream_app.broker`)
``nextaction worker``                        ``faust -A stream_app.app:app worker`` with the configured web bind/port
``nextaction replay taobao|csv|synthetic``   produce events into the events topic
``nextaction tail TOPIC``                    pretty-print the JSON records of a topic
``nextaction train|evaluate|fit-transitions`` offline model commands (from ``models/cli.py``)
``nextaction demo``                          broker, worker, synthetic events, predictions on screen

Settings come from ``NEXTACTION_*`` environment variables (:mod:`stream_app.settings`). Heavy
imports (Faust, torch, the replay sources) happen inside the commands that need them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from models.errors import NextActionError
from stream_app.errors import BrokerError
from stream_app.kafka_admin import start_client
from stream_app.settings import SettingsType, get_settings

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(name="nextaction", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False,
                  help="Streaming next-action prediction on Kafka (Faust + RocksDB + a Transformer).")
kafka_app = typer.Typer(no_args_is_help=True, help="The embedded Apache Kafka broker (single KRaft node on 127.0.0.1).")
replay_app = typer.Typer(no_args_is_help=True, help="Produce events into the events topic, as fast as possible or at --rate.")
app.add_typer(kafka_app, name="kafka")
app.add_typer(replay_app, name="replay")

#: Event fields a CSV column can be mapped onto (DESIGN.md, events topic schema).
EVENT_FIELDS = ("user_id", "item_id", "action", "ts", "session_id", "device", "location", "category", "price",
                "item_text")
REQUIRED_FIELDS = ("user_id", "item_id", "action", "ts")


class TsUnit(str, Enum):
    """Unit of a CSV timestamp column (``iso``: ISO-8601 text)."""

    s = "s"
    ms = "ms"
    us = "us"
    ns = "ns"
    iso = "iso"


def main() -> None:
    """Console-script entry point (``nextaction``)."""
    app()


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn nextaction's own errors into one red line and exit status 1 (tracebacks are for bugs)."""
    try:
        yield
    except NextActionError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def _settings() -> SettingsType:
    return get_settings()


def _positive(name: str):
    def check(value: float | int | None):
        if value is not None and value <= 0:
            raise typer.BadParameter(f"{name} must be > 0, got {value}")
        return value
    return check


# --------------------------------------------------------------------------------------------- #
# kafka
# --------------------------------------------------------------------------------------------- #

@kafka_app.command("start")
def kafka_start(
    timeout: float = typer.Option(90.0, help="Seconds to wait for the broker to answer.", callback=_positive("--timeout")),
    topics: bool = typer.Option(True, "--topics/--no-topics", help="Create the app's topics if missing."),
) -> None:
    """Install (once), format (once) and start the broker; wait until it answers. Idempotent."""
    from stream_app import broker, kafka_admin

    with _errors():
        settings = _settings()
        t0 = time.monotonic()
        with console.status(f"starting Kafka {settings.kafka_version} on 127.0.0.1:{settings.kafka_port} "
                            "(first run downloads the jars with Maven)..."):
            st = broker.start(settings, timeout=timeout)
        if st.started:
            console.print(f"[green]started[/] Kafka {st.version} (pid {st.pid}) on [bold]{st.bootstrap}[/] "
                          f"in {time.monotonic() - t0:.1f} s; log: {st.log}")
        else:
            console.print(f"[green]already running[/] Kafka {st.version} (pid {st.pid}) on [bold]{st.bootstrap}[/]; "
                          f"log: {st.log}")
        _warn_if_broker_url_elsewhere(settings)
        if topics:
            counts = kafka_admin.ensure_topics(_local_settings(settings))
            console.print("topics: " + ", ".join(f"{t} ({n} partitions)" for t, n in counts.items()))


@kafka_app.command("stop")
def kafka_stop(timeout: float = typer.Option(30.0, help="Seconds before SIGTERM becomes SIGKILL.",
                                             callback=_positive("--timeout"))) -> None:
    """Stop the broker (SIGTERM, then SIGKILL after --timeout). Idempotent."""
    from stream_app import broker

    with _errors():
        settings = _settings()
        with console.status("stopping Kafka..."):
            was_running = broker.stop(settings, timeout=timeout)
        console.print("[green]stopped[/] Kafka" if was_running else
                      f"Kafka was not running (data dir {broker.BrokerPaths.of(settings).root})")


@kafka_app.command("status")
def kafka_status() -> None:
    """Show whether the broker runs and answers; exit status 1 if it does not answer."""
    from stream_app import broker

    with _errors():
        settings = _settings()
        st = broker.status(settings)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("process", f"[green]running[/] (pid {st.pid})" if st.running else "[red]not running[/]")
    table.add_row("answering", f"[green]yes[/] ({st.brokers} broker)" if st.answering else "[red]no[/]")
    if st.answering and not st.running:
        table.add_row("", "[yellow]a broker answers on this port but was not started from this data dir[/]")
    table.add_row("bootstrap", st.bootstrap)
    table.add_row("controller", f"127.0.0.1:{st.controller_port}")
    table.add_row("version", f"{st.version} ({'installed' if st.installed else 'not installed yet'})")
    table.add_row("data dir", str(st.data_dir))
    table.add_row("log", str(st.log))
    table.add_row("broker_url", settings.broker_url)
    console.print(table)
    _warn_if_broker_url_elsewhere(settings)
    if not st.answering:
        raise typer.Exit(1)


@kafka_app.command("logs")
def kafka_logs(lines: int = typer.Option(40, "--lines", "-n", callback=_positive("--lines"))) -> None:
    """Print the tail of the broker log."""
    from stream_app import broker

    with _errors():
        console.print(escape(broker.log_tail(_settings(), lines)), highlight=False, soft_wrap=True)


@kafka_app.command("install")
def kafka_install() -> None:
    """Download the broker jars from Maven Central (start does this on first use)."""
    from stream_app import broker

    with _errors():
        t0 = time.monotonic()
        with console.status("fetching Kafka jars with Maven..."):
            jars = broker.install(_settings())
        console.print(f"[green]installed[/] {jars} ({time.monotonic() - t0:.1f} s)")


def _local_settings(settings: SettingsType) -> SettingsType:
    """``settings`` aimed at the embedded broker (which may differ from ``broker_url``)."""
    from stream_app.settings import Settings

    fields = settings.model_dump()
    fields["broker_url"] = f"kafka://127.0.0.1:{settings.kafka_port}"
    return Settings(**fields)


def _points_at_embedded(settings: SettingsType) -> bool:
    hosts = settings.bootstrap_servers.split(",")
    return any(h.strip() in (f"127.0.0.1:{settings.kafka_port}", f"localhost:{settings.kafka_port}") for h in hosts)


def _warn_if_broker_url_elsewhere(settings: SettingsType) -> None:
    if not _points_at_embedded(settings):
        err_console.print(f"[yellow]note:[/] broker_url={settings.broker_url} does not point at this broker "
                          f"(127.0.0.1:{settings.kafka_port}); the app and the replay use broker_url.")


# --------------------------------------------------------------------------------------------- #
# tail
# --------------------------------------------------------------------------------------------- #

@app.command()
def tail(
    topic: str = typer.Argument(..., help="Topic name, e.g. predictions, events.dlq."),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Start at the oldest record, not at the end."),
    max_records: int | None = typer.Option(None, "--max", help="Stop after this many records.",
                                           callback=_positive("--max")),
    timeout: float | None = typer.Option(None, help="Stop after this many seconds without a new record "
                                                    "(default: follow until Ctrl-C).", callback=_positive("--timeout")),
    compact: bool = typer.Option(False, "--compact", "-c", help="One line per record."),
) -> None:
    """Pretty-print the JSON records of a topic."""
    with _errors():
        settings = _settings()
        n = asyncio.run(_tail(settings, topic, from_beginning=from_beginning, max_records=max_records,
                              timeout=timeout, compact=compact))
    err_console.print(f"[dim]{n} record{'s' if n != 1 else ''}[/]")


async def _topic_partitions(settings: SettingsType, topic: str) -> list[int]:
    """The partition ids of ``topic``; BrokerError naming the topic (and the known ones) if it is missing."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=15_000)
    await start_client(settings, admin.start, admin.close)
    try:
        topics = await admin.list_topics()
        if topic not in topics:
            known = ", ".join(sorted(t for t in topics if not t.startswith("__"))) or "none"
            raise BrokerError(f"topic {topic!r} does not exist on {settings.bootstrap_servers} (topics: {known})")
        (desc,) = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in desc["partitions"])
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _open_consumer(settings: SettingsType, topic: str, *, from_beginning: bool):
    """A group-less consumer assigned to every partition of ``topic``, at its start or its end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    parts = [TopicPartition(topic, p) for p in await _topic_partitions(settings, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                enable_auto_commit=False, request_timeout_ms=15_000,
                                auto_offset_reset="earliest" if from_beginning else "latest")
    await start_client(settings, consumer.start, consumer.stop)
    try:
        consumer.assign(parts)
        if from_beginning:
            await consumer.seek_to_beginning(*parts)
        else:
            await consumer.seek_to_end(*parts)
        for tp in parts:  # resolve positions now, so records produced from here on are not missed
            await consumer.position(tp)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def _tail(settings: SettingsType, topic: str, *, from_beginning: bool, max_records: int | None,
                timeout: float | None, compact: bool) -> int:
    consumer = await _open_consumer(settings, topic, from_beginning=from_beginning)
    n = 0
    last = time.monotonic()
    try:
        while max_records is None or n < max_records:
            batches = await consumer.getmany(timeout_ms=250, max_records=500)
            records = sorted((r for rs in batches.values() for r in rs), key=lambda r: (r.timestamp, r.partition))
            for rec in records:
                _print_record(rec, compact)
                n += 1
                if max_records is not None and n >= max_records:
                    break
            if records:
                last = time.monotonic()
            elif timeout is not None and time.monotonic() - last >= timeout:
                break
    finally:
        await consumer.stop()
    return n


def _print_record(rec: Any, compact: bool) -> None:
    import orjson

    key = rec.key.decode("utf-8", "replace") if rec.key is not None else "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.timestamp / 1000)) + f".{rec.timestamp % 1000:03d}"
    head = f"[dim]{escape(rec.topic)}[{rec.partition}]@{rec.offset}  {stamp}[/]  key=[cyan]{escape(key)}[/]"
    try:
        value = orjson.loads(rec.value) if rec.value is not None else None
    except orjson.JSONDecodeError:
        console.print(head, "[yellow]not JSON:[/]", escape(repr(rec.value[:500])), soft_wrap=True)
        return
    if compact:
        console.print(head, escape(orjson.dumps(value).decode()), soft_wrap=True)
    else:
        console.print(head)
        console.print_json(data=value)


# --------------------------------------------------------------------------------------------- #
# replay
# --------------------------------------------------------------------------------------------- #

RATE_HELP = "Events per second (default: as fast as possible)."


def parse_mapping(values: list[str]) -> dict[str, str]:
    """Parse ``--map field=column`` options (repeatable and/or comma-separated) into ``{field: column}``.

    >>> parse_mapping(["user_id=uid,item_id=sku", "action=type", "ts=time"])
    {'user_id': 'uid', 'item_id': 'sku', 'action': 'type', 'ts': 'time'}
    """
    mapping: dict[str, str] = {}
    for value in values:
        for pair in value.split(","):
            pair = pair.strip()
            if not pair:
                continue
            field, sep, column = pair.partition("=")
            field, column = field.strip(), column.strip()
            if not sep or not field or not column:
                raise typer.BadParameter(f"{pair!r} is not FIELD=COLUMN (e.g. user_id=visitorid)", param_hint="--map")
            if field not in EVENT_FIELDS:
                raise typer.BadParameter(f"unknown event field {field!r}; fields: {', '.join(EVENT_FIELDS)}",
                                         param_hint="--map")
            if field in mapping and mapping[field] != column:
                raise typer.BadParameter(f"field {field!r} mapped twice ({mapping[field]!r} and {column!r})",
                                         param_hint="--map")
            mapping[field] = column
    missing = [f for f in REQUIRED_FIELDS if f not in mapping]
    if missing:
        raise typer.BadParameter(f"missing {', '.join(missing)} (required: {', '.join(REQUIRED_FIELDS)})",
                                 param_hint="--map")
    return mapping


def _check_mapping(values: list[str]) -> list[str]:
    parse_mapping(values)
    return values


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {path}")
    return path


@replay_app.command("taobao")
def replay_taobao(
    path: Path = typer.Argument(..., help="UserBehavior.csv (user,item,category,behavior,timestamp; no header).",
                                callback=_existing_file),
    rebase_time: bool = typer.Option(False, "--rebase-time/--keep-time",
                                     help="Shift event times so the replay ends near now (gaps kept)."),
    limit: int | None = typer.Option(None, help="Replay at most this many events.", callback=_positive("--limit")),
    rate: float | None = typer.Option(None, help=RATE_HELP, callback=_positive("--rate")),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Replay the Taobao UserBehavior CSV (pv→view, cart, fav, buy→purchase)."""
    with _errors():
        replay = _replay_module()
        _replay(replay.taobao_csv(path, rebase_time=rebase_time), limit=limit, rate=rate, progress=progress)


@replay_app.command("csv")
def replay_csv(
    path: Path = typer.Argument(..., help="A CSV file with a header row.", callback=_existing_file),
    mapping: list[str] = typer.Option(..., "--map", "-m", help="FIELD=COLUMN pairs, comma-separated or repeated; "
                                      "user_id, item_id, action and ts are required.", callback=_check_mapping),
    ts_unit: TsUnit = typer.Option(TsUnit.ms, "--ts-unit", help="Unit of the ts column: epoch s/ms/us/ns, or iso (ISO-8601)."),
    rebase_time: bool = typer.Option(False, "--rebase-time/--keep-time",
                                     help="Shift event times so the replay ends near now (gaps kept)."),
    limit: int | None = typer.Option(None, help="Replay at most this many events.", callback=_positive("--limit")),
    rate: float | None = typer.Option(None, help=RATE_HELP, callback=_positive("--rate")),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Replay a generic CSV, mapping its columns onto event fields."""
    fields = parse_mapping(mapping)  # the callback already validated it (and typer keeps the raw list)
    with _errors():
        replay = _replay_module()
        events = replay.generic_csv(path, fields, rebase_time=rebase_time, ts_unit=ts_unit.value)
        _replay(events, limit=limit, rate=rate, progress=progress)


@replay_app.command("synthetic")
def replay_synthetic(
    events: int = typer.Option(10_000, "--events", "-n", help="Number of events.", callback=_positive("--events")),
    users: int = typer.Option(500, "--users", "-u", help="Number of users.", callback=_positive("--users")),
    seed: int = typer.Option(0, help="Random seed (same seed, same events)."),
    rate: float | None = typer.Option(None, help=RATE_HELP, callback=_positive("--rate")),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Replay seeded synthetic sessions (user preferences, sessions, gaps, devices, a purchase funnel)."""
    with _errors():
        replay = _replay_module()
        _replay(replay.synthetic(events, users, seed), limit=None, rate=rate, progress=progress)


def _fail(message: str) -> typer.Exit:
    """Print ``error: message`` and return the Exit(1) for the caller to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(1)


def _replay_module():
    try:
        from stream_app import replay
    except ModuleNotFoundError as exc:
        if exc.name == "stream_app.replay":
            raise _fail("stream_app/replay.py is missing from this checkout, so nothing can be replayed") from None
        raise
    return replay


def _replay(events, *, limit: int | None, rate: float | None, progress: bool) -> None:
    from stream_app.kafka_admin import require_broker

    replay = _replay_module()
    settings = _settings()
    require_broker(settings)
    if limit is not None:
        events = itertools.islice(events, limit)
    t0 = time.monotonic()
    sent = asyncio.run(replay.produce(settings, events, rate, progress))
    dt = time.monotonic() - t0
    console.print(f"[green]sent[/] {sent:,} events to [bold]{settings.topic_events}[/] on {settings.bootstrap_servers} "
                  f"in {dt:.1f} s ({sent / max(dt, 1e-9):,.0f} events/s)")


# --------------------------------------------------------------------------------------------- #
# deploy: announce a checkpoint on model-updates (every worker hot-swaps)
# --------------------------------------------------------------------------------------------- #

@app.command()
def deploy(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (written by `nextaction train`)."),
    version: str | None = typer.Option(None, help="Label for the record (default: the first 12 hex digits "
                                                  "of the content hash, which is what workers report)."),
) -> None:
    """Verify a checkpoint and publish it on the model-updates topic: every worker loads, checks and
    swaps to it between batches (the path must be readable by the workers)."""

    from stream_app.updates import update_record

    with _errors():
        settings = _settings()
        update = update_record(checkpoint, version)
        asyncio.run(_send_one(settings, settings.topic_model_updates, update.KEY, update.encode()))
    console.print(f"[green]announced[/] {update.path} (content hash {update.sha256[:12]}) on "
                  f"[bold]{settings.topic_model_updates}[/]; workers report it as model_version {update.sha256[:12]}")


async def _send_one(settings: SettingsType, topic: str, key: bytes | None, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=15_000)
    await start_client(settings, producer.start, producer.stop)
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


# --------------------------------------------------------------------------------------------- #
# worker, train, evaluate
# --------------------------------------------------------------------------------------------- #

#: The Faust app for ``faust -A``. Named as ``module:attribute``: with the bare package name, Faust
#: looks ``app`` up on ``stream_app`` twice, and once ``stream_app.app`` (the module) has been
#: imported that attribute is the module, not the app ("Looks like module, not app").
FAUST_APP = "stream_app.app:app"


def worker_argv(settings: SettingsType, loglevel: str | None = None, web_port: int | None = None,
                extra: list[str] | None = None) -> list[str]:
    """The ``faust -A stream_app.app:app worker`` command line for ``settings`` (run with this interpreter)."""
    return [sys.executable, "-m", "faust", "-A", FAUST_APP, "worker", "-l", loglevel or settings.log_level,
            "--web-bind", settings.web_bind, "--web-port", str(web_port or settings.web_port), *(extra or [])]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context,
           loglevel: str | None = typer.Option(None, "--loglevel", "-l", help="Log level (default: settings.log_level).")
           ) -> None:
    """Run the stream worker: faust -A stream_app.app:app worker -l info --web-bind/--web-port from settings.

    Extra options are passed on to ``faust worker``.
    """
    with _errors():
        argv = worker_argv(_settings(), loglevel, extra=list(ctx.args))
    console.print(f"[dim]exec {' '.join(argv[1:])}[/]")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("train", context_settings=_FORWARD, add_help_option=False)
def train_cmd(ctx: typer.Context) -> None:
    """Train a next-action model offline (options: nextaction train --help)."""
    _forward_to_models("train", list(ctx.args))


@app.command("evaluate", context_settings=_FORWARD, add_help_option=False)
def evaluate_cmd(ctx: typer.Context) -> None:
    """Evaluate a checkpoint (options: nextaction evaluate --help)."""
    _forward_to_models("evaluate", list(ctx.args))


@app.command("fit-transitions", context_settings=_FORWARD, add_help_option=False)
def fit_transitions_cmd(ctx: typer.Context) -> None:
    """Count and fit a checkpoint's item-transition table (options: nextaction fit-transitions --help)."""
    _forward_to_models("fit_transitions", list(ctx.args))


def _models_function(name: str):
    """``models.cli.<name>``; a missing module is a clear error, a broken one shows its traceback."""
    try:
        import models.cli as models_cli
    except ModuleNotFoundError as exc:
        if exc.name == "models.cli":
            raise _fail(f"models/cli.py is not in this checkout, so there is no `nextaction {name}` yet") from None
        err_console.print(f"[bold red]error:[/] models/cli.py failed to import ({exc}); traceback:")
        err_console.print_exception(show_locals=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - a broken module must not hide: show why, then fail
        err_console.print(f"[bold red]error:[/] models/cli.py failed to import ({type(exc).__name__}: {exc}); traceback:")
        err_console.print_exception(show_locals=False)
        raise typer.Exit(1) from None
    fn = getattr(models_cli, name, None)
    if not callable(fn):
        raise _fail(f"models/cli.py defines no function {name!r} for `nextaction {name}`")
    return fn


def _forward_to_models(name: str, args: list[str]) -> None:
    with _errors():
        fn = _models_function(name)
        sub = typer.Typer(add_completion=False, rich_markup_mode="rich")
        sub.command(name=name)(fn)
        command = typer.main.get_command(sub)
        try:
            command.main(args=args, prog_name=f"nextaction {name.replace('_', '-')}", standalone_mode=False)
        except Exception as exc:
            import click

            if isinstance(exc, click.ClickException):
                exc.show()
                raise typer.Exit(exc.exit_code) from None
            if isinstance(exc, click.exceptions.Abort):
                raise typer.Exit(1) from None
            raise


# --------------------------------------------------------------------------------------------- #
# demo
# --------------------------------------------------------------------------------------------- #

@app.command()
def demo(
    events: int = typer.Option(3000, "--events", "-n", help="Synthetic events to replay.", callback=_positive("--events")),
    users: int = typer.Option(200, "--users", "-u", help="Synthetic users.", callback=_positive("--users")),
    seed: int = typer.Option(7, help="Seed of the synthetic generator."),
    rate: float = typer.Option(500.0, help="Events per second.", callback=_positive("--rate")),
    show: int = typer.Option(15, help="Predictions to show in the table.", callback=_positive("--show")),
    timeout: float = typer.Option(180.0, help="Seconds to wait for the predictions after the replay.",
                                  callback=_positive("--timeout")),
    train: bool = typer.Option(True, "--train/--no-train",
                               help="First train a small model on synthetic data (nextaction train --dataset "
                                    "synthetic), if models/cli.py is there; else serve the baseline."),
) -> None:
    """Start the broker, run a worker, replay synthetic events and show live predictions."""
    from stream_app import broker, kafka_admin

    with _errors():
        settings = _settings()
        console.rule("[bold]1. Kafka")
        if _points_at_embedded(settings):
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
        checkpoint = settings.checkpoint or (_demo_train(settings) if train else None)
        console.print("the worker serves " + (f"the checkpoint {checkpoint}" if checkpoint else
                                              "the popularity + Markov baseline, which learns from the stream"))

        replay = _replay_module()
        console.rule("[bold]3. Worker")
        web_port = settings.web_port if _port_free(settings.web_bind, settings.web_port) else _free_port()
        log_path = Path(settings.data_dir).absolute() / "demo" / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = _spawn_worker(settings, web_port, log_path, checkpoint)
        console.print(f"worker pid {proc.pid} (web 127.0.0.1:{web_port}); log: {log_path}")
        try:
            console.rule(f"[bold]4. Replay {events:,} synthetic events at {rate:,.0f}/s")
            predictions, sent, elapsed = asyncio.run(_demo_stream(
                settings, replay.synthetic(events, users, seed), rate, timeout, proc, log_path))
        finally:
            with console.status("stopping the worker..."):
                code = _stop_process(proc)
            console.print(f"worker stopped (exit {code})")
        _show_predictions(predictions, sent, elapsed, show)
        if _points_at_embedded(settings):
            console.print("\nThe broker is still running: [bold]nextaction kafka stop[/] stops it "
                          "([bold]nextaction tail predictions --from-beginning --max 5[/] shows more).")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_worker(settings: SettingsType, web_port: int, log_path: Path,
                  checkpoint: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if checkpoint is not None:
        env["NEXTACTION_CHECKPOINT"] = str(checkpoint)
    with open(log_path, "ab") as log:
        return subprocess.Popen(worker_argv(settings, "info", web_port), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _demo_train(settings: SettingsType, budget_min: float = 1.0) -> Path | None:
    """Train a small model on synthetic data with ``nextaction train``; None (with a note) if not possible."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("models.cli")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        console.print("[yellow]skipped training:[/] models/cli.py is not in this checkout")
        return None
    out = Path(settings.data_dir).absolute() / "demo" / "model"
    args = ["--dataset", "synthetic", "--out", str(out), "--budget-min", str(budget_min), "--threads", "1"]
    console.print(f"[dim]nextaction train {' '.join(args)}[/]")
    try:
        _forward_to_models("train", args)
    except typer.Exit as exc:
        if exc.exit_code:
            console.print(f"[yellow]training failed (exit {exc.exit_code}, see above)[/]; going on without a model")
            return None
    return out


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

    replay = _replay_module()
    consumer = await _open_consumer(settings, settings.topic_predictions, from_beginning=False)
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


if __name__ == "__main__":
    main()
