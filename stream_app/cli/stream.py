"""The stream's commands: ``worker`` (the Faust worker), ``replay taobao|csv|synthetic`` (produce
events), ``tail TOPIC`` (pretty-print a topic), ``deploy CHECKPOINT`` (announce a model on
``model-updates``) and ``forget USER_ID...`` (privacy deletion, docs/privacy.md). The replay sources and Kafka clients are imported inside the commands.

>>> parse_mapping(["user_id=uid,item_id=sku", "action=type", "ts=time"])
{'user_id': 'uid', 'item_id': 'sku', 'action': 'type', 'ts': 'time'}
>>> from stream_app.settings import Settings
>>> worker_argv(Settings(web_port=7000))[1:]
['-m', 'faust', '-A', 'stream_app.app:app', 'worker', '-l', 'info', '--web-bind', '127.0.0.1', '--web-port', '7000']
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from stream_app.cli.common import console, current_settings, err_console, errors, existing_file, positive
from stream_app.errors import BrokerError
from stream_app.kafka_admin import start_client
from stream_app.kafka_security import client_kwargs
from stream_app.settings import SettingsType

app = typer.Typer()
replay_app = typer.Typer(no_args_is_help=True, help="Produce events into the events topic, as fast as possible or at --rate.")
app.add_typer(replay_app, name="replay")

#: The Faust app for ``faust -A``. Named as ``module:attribute``: with the bare package name, Faust
#: looks ``app`` up on ``stream_app`` twice, and once ``stream_app.app`` (the module) has been
#: imported that attribute is the module, not the app ("Looks like module, not app").
FAUST_APP = "stream_app.app:app"
RATE_HELP = "Events per second (default: as fast as possible)."


class TsUnit(str, Enum):
    """Unit of a CSV timestamp column (``iso``: ISO-8601 text)."""

    s = "s"
    ms = "ms"
    us = "us"
    ns = "ns"
    iso = "iso"


# --------------------------------------------------------------------------------------------- #
# worker
# --------------------------------------------------------------------------------------------- #

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
    with errors():
        argv = worker_argv(current_settings(), loglevel, extra=list(ctx.args))
    console.print(f"[dim]exec {' '.join(argv[1:])}[/]")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


# --------------------------------------------------------------------------------------------- #
# replay
# --------------------------------------------------------------------------------------------- #

def parse_mapping(values: list[str]) -> dict[str, str]:
    """Parse ``--map field=column`` options (repeatable and/or comma-separated) into ``{field: column}``
    (the fields of :data:`stream_app.events.FIELDS`)."""
    from stream_app.events import FIELDS, REQUIRED_FIELDS  # here: it imports numpy, which --help need not

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
            if field not in FIELDS:
                raise typer.BadParameter(f"unknown event field {field!r}; fields: {', '.join(FIELDS)}",
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


# Options every replay command shares (typer reads a default's OptionInfo afresh for each command).
REBASE_TIME = typer.Option(False, "--rebase-time/--keep-time",
                           help="Shift event times so the replay ends near now (gaps kept).")
LIMIT = typer.Option(None, help="Replay at most this many events.", callback=positive("--limit"))
RATE = typer.Option(None, help=RATE_HELP, callback=positive("--rate"))
PROGRESS = typer.Option(True, "--progress/--no-progress")


@replay_app.command("taobao")
def replay_taobao(
    path: Path = typer.Argument(..., help="UserBehavior.csv (user,item,category,behavior,timestamp; no header).",
                                callback=existing_file),
    rebase_time: bool = REBASE_TIME,
    limit: int | None = LIMIT,
    rate: float | None = RATE,
    progress: bool = PROGRESS,
) -> None:
    """Replay the Taobao UserBehavior CSV (pv→view, cart, fav, buy→purchase)."""
    from stream_app import replay

    with errors():
        _replay(replay.taobao_csv(path, rebase_time=rebase_time), limit=limit, rate=rate, progress=progress)


@replay_app.command("csv")
def replay_csv(
    path: Path = typer.Argument(..., help="A CSV file with a header row.", callback=existing_file),
    mapping: list[str] = typer.Option(..., "--map", "-m", help="FIELD=COLUMN pairs, comma-separated or repeated; "
                                      "user_id, item_id, action and ts are required.", callback=_check_mapping),
    ts_unit: TsUnit = typer.Option(TsUnit.ms, "--ts-unit", help="Unit of the ts column: epoch s/ms/us/ns, or iso (ISO-8601)."),
    rebase_time: bool = REBASE_TIME,
    limit: int | None = LIMIT,
    rate: float | None = RATE,
    progress: bool = PROGRESS,
) -> None:
    """Replay a generic CSV, mapping its columns onto event fields."""
    from stream_app import replay

    fields = parse_mapping(mapping)  # the callback already validated it (and typer keeps the raw list)
    with errors():
        events = replay.generic_csv(path, fields, rebase_time=rebase_time, ts_unit=ts_unit.value)
        _replay(events, limit=limit, rate=rate, progress=progress)


@replay_app.command("synthetic")
def replay_synthetic(
    events: int = typer.Option(10_000, "--events", "-n", help="Number of events.", callback=positive("--events")),
    users: int = typer.Option(500, "--users", "-u", help="Number of users.", callback=positive("--users")),
    seed: int = typer.Option(0, help="Random seed (same seed, same events)."),
    items: int | None = typer.Option(None, "--items", help="Catalogue size (default: the generator's, "
                                     "models.datasets.synthetic.N_ITEMS).", callback=positive("--items")),
    rate: float | None = RATE,
    progress: bool = PROGRESS,
) -> None:
    """Replay seeded synthetic sessions (user preferences, sessions, gaps, devices, a purchase funnel)."""
    from stream_app import replay

    with errors():
        opts = {} if items is None else {"n_items": items}
        _replay(replay.synthetic(events, users, seed, **opts), limit=None, rate=rate, progress=progress)


def _replay(events, *, limit: int | None, rate: float | None, progress: bool) -> None:
    from stream_app import replay
    from stream_app.kafka_admin import require_broker

    settings = current_settings()
    require_broker(settings)
    if limit is not None:
        events = itertools.islice(events, limit)
    t0 = time.monotonic()
    sent = asyncio.run(replay.produce(settings, events, rate, progress))
    dt = time.monotonic() - t0
    console.print(f"[green]sent[/] {sent:,} events to [bold]{settings.topic_events}[/] on {settings.bootstrap_servers} "
                  f"in {dt:.1f} s ({sent / max(dt, 1e-9):,.0f} events/s)")


# --------------------------------------------------------------------------------------------- #
# tail
# --------------------------------------------------------------------------------------------- #

@app.command()
def tail(
    topic: str = typer.Argument(..., help="Topic name, e.g. predictions, events.dlq."),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Start at the oldest record, not at the end."),
    max_records: int | None = typer.Option(None, "--max", help="Stop after this many records.",
                                           callback=positive("--max")),
    timeout: float | None = typer.Option(None, help="Stop after this many seconds without a new record "
                                                    "(default: follow until Ctrl-C).", callback=positive("--timeout")),
    compact: bool = typer.Option(False, "--compact", "-c", help="One line per record."),
) -> None:
    """Pretty-print the JSON records of a topic."""
    with errors():
        settings = current_settings()
        n = asyncio.run(_tail(settings, topic, from_beginning=from_beginning, max_records=max_records,
                              timeout=timeout, compact=compact))
    err_console.print(f"[dim]{n} record{'s' if n != 1 else ''}[/]")


async def _topic_partitions(settings: SettingsType, topic: str) -> list[int]:
    """The partition ids of ``topic``; BrokerError naming the topic (and the known ones) if it is missing."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), request_timeout_ms=15_000)
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


async def open_consumer(settings: SettingsType, topic: str, *, from_beginning: bool):
    """A group-less consumer assigned to every partition of ``topic``, at its start or its end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    parts = [TopicPartition(topic, p) for p in await _topic_partitions(settings, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), group_id=None,
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
    consumer = await open_consumer(settings, topic, from_beginning=from_beginning)
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
# deploy: announce a checkpoint on model-updates (every worker hot-swaps)
# --------------------------------------------------------------------------------------------- #

@app.command()
def deploy(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (written by `nextaction train`)."),
    version: str | None = typer.Option(None, help="Label for the record (default: the first 12 hex digits "
                                                  "of the content hash, which is what workers report)."),
) -> None:
    """Verify a checkpoint and publish it on the model-updates topic with its content hash: every worker
    loads, checks and swaps to it between batches (the path must be readable by the workers and lie
    under their checkpoint roots: CHECKPOINT's folder, MODELS_DIR, CHECKPOINT_ROOTS)."""

    from stream_app.updates import UpdateRejected, admit, checkpoint_roots, update_record

    with errors():
        settings = current_settings()
        update = update_record(checkpoint, version)  # computes the sha256 from the files
        try:
            admit(update.encode(), checkpoint_roots(settings))
        except UpdateRejected as exc:  # the workers may be configured otherwise: say so, send anyway
            err_console.print(f"[yellow]warning:[/] workers with these settings would reject it: "
                              f"{escape(exc.detail)}")
        asyncio.run(send_one(settings, settings.topic_model_updates, update.KEY, update.encode()))
    console.print(f"[green]announced[/] {update.path} (content hash {update.sha256[:12]}) on "
                  f"[bold]{settings.topic_model_updates}[/]; workers report it as model_version {update.sha256[:12]}")


# --------------------------------------------------------------------------------------------- #
# forget: privacy deletion of users (docs/privacy.md)
# --------------------------------------------------------------------------------------------- #

@app.command()
def forget(
    user_ids: list[str] = typer.Argument(..., help="User ids to forget."),
) -> None:
    """Forget users: every worker deletes them from its tables (changelog tombstones), its KV cache and
    the trainer's examples, in order with their events. Records already in `events`, `predictions`,
    `outcomes` and `events.dlq` stay until those topics' retention (docs/privacy.md)."""
    with errors():
        settings = current_settings()
        if any(not u for u in user_ids):
            raise typer.BadParameter("a user id must not be empty", param_hint="USER_ID")
        n = asyncio.run(send_forget(settings, user_ids))
    console.print(f"[green]requested[/] forgetting {len(user_ids)} user(s) on [bold]{settings.topic_events}[/] "
                  f"({n} control records: one per partition and user)")


async def send_forget(settings: SettingsType, user_ids: list[str]) -> int:
    """Produce a forget control record for each user to **every** partition of ``events`` (key: the user).

    Whichever partitioner the event producers use (murmur2 for Java and aiokafka, CRC32 for
    librdkafka clients: DESIGN.md), the partition that holds the user's events gets it after them;
    the workers of the other partitions find no state and only pass the marker on to the trainer.
    Returns the number of records, each acknowledged by the broker."""
    from aiokafka import AIOKafkaProducer

    from stream_app.records import CONTROL_HEADER, FORGET, ForgetRequest

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                request_timeout_ms=15_000)
    await start_client(settings, producer.start, producer.stop)
    try:
        partitions = sorted(await producer.partitions_for(settings.topic_events))
        value, headers = ForgetRequest().encode(), [(CONTROL_HEADER, FORGET.encode())]
        futures = [await producer.send(settings.topic_events, value, key=u.encode(), partition=p, headers=headers)
                   for u in user_ids for p in partitions]
        for f in futures:  # each send's own result: flush() would not raise for a failed batch
            await f
        return len(futures)
    finally:
        await producer.stop()


async def send_one(settings: SettingsType, topic: str, key: bytes | None, value: bytes) -> None:
    """Produce one record to ``topic`` and wait for the broker's acknowledgement."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), request_timeout_ms=15_000)
    await start_client(settings, producer.start, producer.stop)
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
