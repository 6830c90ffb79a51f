"""The exact account of a stream run, by source (partition, offset), for the fault-injection tests.

Not a test module (the repository's rule: no test file imports another); tests/integration/test_faults.py
uses it. Every input message of ``events`` is identified by its partition and offset; every
prediction, dead-letter and outcome record names the (partition, offset) it came from, so a run can
be counted exactly:

* ``lost``: a valid input without any prediction, or an invalid one without a DLQ record;
* ``first_copy_lost``: a valid input whose only predictions are marked ``duplicate`` (its state
  change reached the changelog before the crash, its first prediction did not reach the topic);
* ``duplicates_marked``: re-published predictions flagged ``duplicate: true`` (a redelivery the
  worker recognised); ``duplicates_unmarked``: a second *first-time* prediction of one input (a
  redelivery the worker did not recognise, its state change was lost with the crash);
* ``outcome_repeats``: inputs with more than one ``outcomes`` record (at most one is allowed);
* ``activity_mismatches``: first-time predictions whose ``activity`` is not the number of the user's
  distinct events so far in the event's tumbling window; ``history_breaks``: users whose
  ``history_len`` does not count 1, 2, 3, ... over their events (state lost or counted twice).

:func:`report` prints one ``FAULTS {...}`` JSON line per scenario (the table in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from stream_app.errors import EventRejected
from stream_app.events import parse_event
from stream_app.kafka_security import client_kwargs


async def read_topics(settings, topics: list[str], until, timeout: float,
                      isolation: str = "read_uncommitted") -> dict[str, list]:
    """Read ``topics`` from the beginning until ``until(records)`` is true (or the timeout);
    ``isolation="read_committed"`` skips records of aborted or open transactions (``exactly_once``)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                enable_auto_commit=False, auto_offset_reset="earliest", isolation_level=isolation)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in await _partitions(consumer, t)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[str, list] = {t: [] for t in topics}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300, max_records=10_000)
            for tp, msgs in batch.items():
                out[tp.topic].extend(msgs)
            if until(out):
                break
        return out
    finally:
        await consumer.stop()


async def _partitions(consumer, topic: str) -> set[int]:
    for _ in range(100):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return parts
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise AssertionError(f"topic {topic!r} has no partitions")


async def committed_offsets(settings) -> dict[int, int | None]:
    """The offsets the app's consumer group (``app_id``) committed on each ``events`` partition."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                         group_id=settings.app_id, enable_auto_commit=False)
    await c.start()
    try:
        return {p: await c.committed(TopicPartition(settings.topic_events, p)) for p in range(settings.partitions)}
    finally:
        await c.stop()


async def end_offsets(settings, topic: str) -> dict[int, int]:
    """The end offset (next offset to be written) of each partition of ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                         enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in await _partitions(c, topic)]
        return {tp.partition: off for tp, off in (await c.end_offsets(tps)).items()}
    finally:
        await c.stop()


def metric(text: str, name: str) -> float:
    """The sum of every sample whose line starts with ``name`` (all its label sets) in a ``/metrics`` text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def wait_for_metric(worker, name: str, at_least: float, timeout: float) -> None:
    """Poll the worker's ``/metrics`` until ``name`` reaches ``at_least`` (a slow answer is retried:
    the worker may be busy loading a model on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if metric(worker.metrics(), name) >= at_least:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{name} < {at_least} after {timeout} s:\n{worker.tail()}"
        time.sleep(0.2)


def source(kind: str, record: dict) -> tuple[int, int]:
    """The (partition, offset) of the input behind a ``predictions``, ``outcomes`` or ``dlq`` record."""
    if kind == "dlq":
        return record["source"]["partition"], record["source"]["offset"]
    return record["partition"], record["offset"]


def read_outputs(settings, n_inputs: int, timeout: float = 180.0, settle_s: float = 1.0) -> dict[str, list]:
    """Inputs, predictions, DLQ records and outcomes (decoded: lists of dicts, inputs as messages),
    once every one of ``n_inputs`` inputs has an output; then ``settle_s`` more for late outcomes."""
    s = settings
    topics = [s.topic_events, s.topic_predictions, s.topic_dlq, s.topic_outcomes]

    def covered(out):
        seen = {(m.partition, m.offset) for m in out[s.topic_events]}
        if len(seen) < n_inputs:
            return False
        done = {source("predictions", orjson.loads(m.value)) for m in out[s.topic_predictions]}
        done |= {source("dlq", orjson.loads(m.value)) for m in out[s.topic_dlq]}
        return len(done & seen) >= n_inputs

    out = asyncio.run(read_topics(s, topics, covered, timeout))
    if settle_s:
        time.sleep(settle_s)
        again = asyncio.run(read_topics(s, topics, lambda o: False, settle_s))
        out = again if sum(map(len, again.values())) >= sum(map(len, out.values())) else out
    return {"events": out[s.topic_events], "predictions": [orjson.loads(m.value) for m in out[s.topic_predictions]],
            "dlq": [orjson.loads(m.value) for m in out[s.topic_dlq]],
            "outcomes": [orjson.loads(m.value) for m in out[s.topic_outcomes]]}


@dataclass
class Account:
    events_in: int = 0
    valid: int = 0
    invalid: int = 0
    predictions_out: int = 0
    dlq: int = 0
    outcomes: int = 0
    lost: int = 0
    first_copy_lost: int = 0
    duplicates_marked: int = 0
    duplicates_unmarked: int = 0
    dlq_repeats: int = 0
    outcome_repeats: int = 0
    activity_mismatches: int = 0
    history_breaks: int = 0
    users: int = 0
    lost_keys: list = field(default_factory=list, repr=False)
    fresh: dict = field(default_factory=dict, repr=False)  # (partition, offset) -> its first-time prediction
    # (or, where that was lost, its first re-published one)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("lost_keys", "fresh")}


def account(out: dict, activity_window_s: int = 3600) -> Account:
    """Count ``out`` (from :func:`read_outputs`) exactly; asserts nothing (the tests decide)."""
    a = Account(events_in=len({(m.partition, m.offset) for m in out["events"]}),
                predictions_out=len(out["predictions"]), dlq=len(out["dlq"]), outcomes=len(out["outcomes"]))
    preds, dlq, outcomes = defaultdict(list), defaultdict(int), defaultdict(int)
    for p in out["predictions"]:
        preds[source("predictions", p)].append(p)
    for d in out["dlq"]:
        dlq[source("dlq", d)] += 1
    for o in out["outcomes"]:
        outcomes[source("outcomes", o)] += 1
    a.outcome_repeats = sum(n > 1 for n in outcomes.values())
    now_ms = int(time.time() * 1000)
    by_user: dict[str, list] = defaultdict(list)  # user -> [(partition, offset, event)]
    for m in sorted({(m.partition, m.offset): m for m in out["events"]}.values(), key=lambda m: (m.partition, m.offset)):
        po = (m.partition, m.offset)
        try:
            ev = parse_event(m.value, now_ms=now_ms, key=m.key if m.key is not None else b"")
        except EventRejected:
            a.invalid += 1
            if not dlq.get(po):
                a.lost += 1
                a.lost_keys.append(po)
            a.dlq_repeats += max(0, dlq.get(po, 0) - 1)
            continue
        a.valid += 1
        records = preds.get(po, [])
        fresh = [p for p in records if not p["duplicate"]]
        a.duplicates_marked += len(records) - len(fresh)
        a.duplicates_unmarked += max(0, len(fresh) - 1)
        if not records:
            a.lost += 1
            a.lost_keys.append(po)
            continue
        if not fresh:
            a.first_copy_lost += 1
        a.fresh[po] = (fresh or records)[0]
        by_user[ev.user_id].append((po, ev))
    a.users = len(by_user)
    size_ms = activity_window_s * 1000
    for user, evs in by_user.items():  # one user = one partition: offsets are the user's event order
        seen: set = set()
        counts: dict[int, int] = defaultdict(int)
        expected_len = 0
        broken = False
        for po, ev in evs:
            ident = (ev.ts, ev.item_id, ev.action)
            if ident not in seen:
                seen.add(ident)
                counts[ev.ts // size_ms] += 1
                expected_len += 1
            p = a.fresh[po]
            if p["activity"] != counts[ev.ts // size_ms]:
                a.activity_mismatches += 1
            if p["history_len"] != expected_len:
                broken = True
        a.history_breaks += broken
    return a


def first_published_after(out: dict, wall_s: float) -> float | None:
    """Seconds from ``wall_s`` (time.time()) to the first prediction published after it."""
    later = [p["published_ms"] / 1000.0 for p in out["predictions"] if p["published_ms"] / 1000.0 > wall_s]
    return round(min(later) - wall_s, 2) if later else None


def child_pids(log_path: Path) -> list[int]:
    """The inference processes a worker started, from its log ("inference process <pid> serving")."""
    return [int(x) for x in re.findall(r"inference process (\d+) serving", log_path.read_text(errors="replace"))]


def pid_gone_within(pid: int, seconds: float) -> float | None:
    """Seconds until ``pid`` no longer exists (or is a zombie), None if still alive after ``seconds``."""
    import os

    t0 = time.monotonic()
    while True:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return round(time.monotonic() - t0, 3)
        except (ProcessLookupError, FileNotFoundError):
            return round(time.monotonic() - t0, 3)
        if time.monotonic() - t0 > seconds:
            return None
        time.sleep(0.02)


def report(scenario: str, acc: Account, **extra) -> dict:
    """Print the scenario's ``FAULTS {...}`` line (pytest -s shows it) and return it."""
    line = {"scenario": scenario, **acc.summary(), **extra}
    print("\nFAULTS", json.dumps(line), flush=True)
    return line
