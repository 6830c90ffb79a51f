"""Event sources for replays (Taobao CSV, generic CSV, the seeded synthetic sessions) and the producer.

Every source yields event dicts in the ``events`` topic schema (see ``DESIGN.md``); :func:`produce`
sends them to Kafka keyed by user id. Sources that read files are :class:`CsvSource` iterators:
malformed rows are skipped and counted (``source.dropped``, by reason) instead of stopping a long
replay, and the count is logged when the file is done.

A dict with the key :data:`RAW` is sent as those exact bytes (keyed by :data:`RAW_KEY`, if
present): that is how :func:`synthetic` (the sessions of :mod:`models.datasets.synthetic`, the
generator the demo's model is trained on) mixes in deliberately malformed messages.

>>> evs = list(synthetic(200, 10, seed=7, bad_fraction=0.1))
>>> len(evs), evs == list(synthetic(200, 10, seed=7, bad_fraction=0.1))
(200, True)
>>> key, value = encode(next(e for e in evs if RAW in e)); value[:14]
b'{"user_id": "u'
"""

from __future__ import annotations

import asyncio
import csv
import logging
import math
import random
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import orjson

from models.datasets.synthetic import N_ITEMS
from models.datasets.synthetic import events as synthetic_events
from models.errors import DatasetError
from models.schema import canonical_action
from stream_app.errors import BrokerError
from stream_app.kafka_security import client_kwargs
from stream_app.events import FIELDS, REQUIRED_FIELDS

log = logging.getLogger(__name__)

RAW = "__raw__"  #: dict key: send these bytes as the message value, verbatim
RAW_KEY = "__key__"  #: dict key: the message key for a RAW message

TS_UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
TAOBAO_ACTIONS = {"pv": "view", "cart": "cart", "fav": "fav", "buy": "purchase"}


# --- file sources ------------------------------------------------------------------------------------
class CsvSource(Iterator[dict]):
    """An iterator over a CSV file's events that counts what it skipped.

    With ``rebase_time`` the file is read twice: once for its newest timestamp, then shifted so
    that the newest event is "now" (gaps between events unchanged).
    """

    def __init__(self, path: str | Path, rows: Callable[["CsvSource"], Iterator[dict]], *,
                 rebase_time: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"CSV file not found: {str(self.path)!r}")
        self._rows = rows
        self.rebase_time = rebase_time
        self.rows = 0
        self.emitted = 0
        self.dropped: Counter[str] = Counter()
        self.shift_ms = 0
        self._it: Iterator[dict] | None = None

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def __iter__(self) -> "CsvSource":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._generate()
        return next(self._it)

    def _generate(self) -> Iterator[dict]:
        if self.rebase_time:
            probe = CsvSource(self.path, self._rows)
            newest = max((e["ts"] for e in probe), default=None)
            if newest is not None:
                self.shift_ms = int(time.time() * 1000) - newest
        for ev in self._rows(self):
            if self.shift_ms:
                ev["ts"] += self.shift_ms
            self.emitted += 1
            yield ev
        if self.dropped:
            log.warning("%s: skipped %d of %d rows (%s)", self.path, sum(self.dropped.values()), self.rows,
                        ", ".join(f"{k}: {v}" for k, v in self.dropped.most_common()))


def taobao_csv(path: str | Path, rebase_time: bool = False) -> CsvSource:
    """Taobao UserBehavior CSV (``user,item,category,behavior,timestamp_s``, no header).

    ``pv`` → ``view``, ``buy`` → ``purchase`` (``cart``, ``fav`` unchanged); seconds → milliseconds.
    Rows that are truncated or malformed (wrong column count, unknown behaviour, non-integer or
    non-positive timestamp, empty ids) are skipped and counted in ``dropped``. File order is kept
    (the dataset is grouped by user; the stream's history tolerates out-of-order events).
    """

    def rows(src: CsvSource) -> Iterator[dict]:
        with open(src.path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.reader(f):
                src.rows += 1
                if len(row) != 5:
                    src.drop("columns")
                    continue
                user, item, cat, behavior, ts = (c.strip() for c in row)
                action = TAOBAO_ACTIONS.get(behavior.lower())
                if action is None:
                    src.drop("action")
                    continue
                if not user or not item:
                    src.drop("empty_id")
                    continue
                try:
                    ts_s = int(ts)
                except ValueError:
                    src.drop("ts")
                    continue
                if ts_s <= 0:
                    src.drop("ts")
                    continue
                ev = {"user_id": user, "item_id": item, "action": action, "ts": ts_s * 1000}
                if cat:
                    ev["category"] = cat
                yield ev

    return CsvSource(path, rows, rebase_time=rebase_time)


def parse_ts(value: str, ts_unit: str) -> int:
    """A CSV timestamp in ``ts_unit`` (``s``/``ms``/``us``/``ns`` or ``iso``) as epoch milliseconds.

    >>> parse_ts("1511544070", "s"), parse_ts("1511544070123", "ms"), parse_ts("2017-11-24T17:21:10Z", "iso")
    (1511544070000, 1511544070123, 1511544070000)
    """
    if ts_unit == "iso":
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1000)
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"timestamp {value!r} is not finite")
    return int(round(x * TS_UNITS[ts_unit]))


def generic_csv(path: str | Path, mapping: dict[str, str], rebase_time: bool = False,
                ts_unit: str = "ms") -> CsvSource:
    """A CSV with a header row; ``mapping`` names the column of each event field.

    ``mapping`` is ``{event field: CSV column}``, e.g. RetailRocket's ``events.csv``:
    ``{"user_id": "visitorid", "item_id": "itemid", "action": "event", "ts": "timestamp"}``
    (``user_id``, ``item_id``, ``action``, ``ts`` required; optional: session_id, device, location,
    category, price, item_text). Actions go through :func:`models.schema.canonical_action`
    (``pv``, ``buy``, ``addtocart``, ``transaction`` ...). Rows with a missing value, an unknown
    action or a bad timestamp/price are skipped and counted in ``dropped``.
    """
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise DatasetError(f"mapping names unknown event fields {unknown}; known: {', '.join(FIELDS)}")
    missing = [f for f in REQUIRED_FIELDS if f not in mapping]
    if missing:
        raise DatasetError(f"mapping must name a column for {', '.join(missing)} (got {mapping!r})")
    if ts_unit not in TS_UNITS and ts_unit != "iso":
        raise DatasetError(f"ts_unit {ts_unit!r} is not one of {', '.join([*TS_UNITS, 'iso'])}")

    def rows(src: CsvSource) -> Iterator[dict]:
        with open(src.path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            absent = [c for c in mapping.values() if c not in header]
            if absent:
                raise DatasetError(f"{str(src.path)!r}: columns {absent} not in the header {header}")
            for row in reader:
                src.rows += 1
                if None in row or any(v is None for v in row.values()):
                    src.drop("columns")
                    continue
                ev: dict = {}
                ok = True
                for field, column in mapping.items():
                    value = row[column].strip()
                    if not value:
                        if field in REQUIRED_FIELDS:
                            src.drop(f"empty_{field}")
                            ok = False
                            break
                        continue
                    try:
                        if field == "action":
                            value = canonical_action(value)
                        elif field == "ts":
                            value = parse_ts(value, ts_unit)
                        elif field == "price":
                            value = float(value)
                    except (DatasetError, ValueError, OverflowError):
                        src.drop(field)
                        ok = False
                        break
                    ev[field] = value
                if ok:
                    yield ev

    return CsvSource(path, rows, rebase_time=rebase_time)


def rebase(events: Iterable[dict], now_ms: int | None = None) -> list[dict]:
    """Shift all timestamps so that the newest event is at ``now_ms`` (default: now); keeps gaps."""
    evs = [dict(e) for e in events]
    stamped = [e for e in evs if isinstance(e.get("ts"), int)]
    if stamped:
        shift = (now_ms if now_ms is not None else int(time.time() * 1000)) - max(e["ts"] for e in stamped)
        for e in stamped:
            e["ts"] += shift
    return evs


# --- synthetic sessions ----------------------------------------------------------------------------
def _bad_event(ev: dict, rng: random.Random, n: int) -> dict:
    """A deliberately malformed variant of ``ev`` (one per reject reason, cycling)."""
    kind = n % 8
    uid = ev["user_id"]
    if kind == 0:
        return {RAW: b'{"user_id": "' + uid.encode() + b'", "ts": ' + str(ev["ts"]).encode() + b', oops',
                RAW_KEY: uid}
    if kind == 1:
        return {k: v for k, v in ev.items() if k != "item_id"}
    if kind == 2:
        return {**ev, "action": "teleport"}
    if kind == 3:
        return {**ev, "ts": ev["ts"] // 1000}  # seconds, not milliseconds
    if kind == 4:
        return {**ev, "ts": str(ev["ts"])}
    if kind == 5:
        return {**ev, "price": -1.0}
    if kind == 6:
        return {RAW: orjson.dumps([ev]), RAW_KEY: uid}
    return {RAW: orjson.dumps(ev), RAW_KEY: uid + "-other"}  # key differs from user_id


def synthetic(n_events: int, n_users: int, seed: int, bad_fraction: float = 0.0,
              n_items: int = N_ITEMS) -> Iterator[dict]:
    """:func:`models.datasets.synthetic.events` (sessions of up to ``n_users`` users over a
    catalogue of ``n_items``, fully determined by ``seed``), with malformed messages mixed in.

    ``bad_fraction`` of the events (chosen by the same seed) are replaced by malformed messages,
    one kind of rejection after another: not JSON, missing item_id, unknown action, seconds instead
    of milliseconds, ts as a string, negative price, an array, a key that is not the user id.
    """
    if not 0.0 <= bad_fraction < 1.0:
        raise DatasetError(f"synthetic: bad_fraction must be in [0, 1) (got {bad_fraction})")
    bad_rng = random.Random(seed ^ 0x5EED)
    n_bad = 0
    for ev in synthetic_events(n_events, n_users, seed, n_items):
        if bad_fraction and bad_rng.random() < bad_fraction:
            yield _bad_event(ev, bad_rng, n_bad)
            n_bad += 1
        else:
            yield ev


# --- producing -----------------------------------------------------------------------------------
def encode(event: dict) -> tuple[bytes | None, bytes]:
    """(message key, message value) for one event dict (see :data:`RAW`).

    >>> encode({"user_id": "u1", "action": "view", "item_id": "i", "ts": 1})
    (b'u1', b'{"user_id":"u1","action":"view","item_id":"i","ts":1}')
    """
    if RAW in event:
        key = event.get(RAW_KEY)
        return (key.encode() if isinstance(key, str) else key), event[RAW]
    uid = event.get("user_id")
    return (str(uid).encode() if uid is not None else None), orjson.dumps(event)


async def produce(settings, events: Iterable[dict], rate: float | None = None, progress: bool = True) -> int:
    """Send ``events`` to ``settings.topic_events`` (key = user id); return how many were sent.

    ``rate`` is events per second (``None``: as fast as possible). The producer batches
    (``linger_ms``) and is idempotent, so its retries never duplicate a message. Every send is
    confirmed by the broker before this returns.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from models.progress import progress as progress_bar

    if rate is not None and not rate > 0:
        raise DatasetError(f"rate must be > 0 events/s or None (got {rate!r})")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), client_id="nextaction-replay",
                                linger_ms=10, max_batch_size=512 * 1024, acks="all", enable_idempotence=True,
                                request_timeout_ms=30_000)
    try:
        await asyncio.wait_for(producer.start(), timeout=30)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        await _stop_quietly(producer)
        raise BrokerError(f"cannot reach Kafka at {settings.broker_url!r} to produce to "
                          f"{settings.topic_events!r}: {exc!r}") from exc
    total = len(events) if hasattr(events, "__len__") else None
    bar = progress_bar(total=total, unit="ev", enabled=progress, desc=f"-> {settings.topic_events}")
    sent, pending = 0, []
    t0 = time.monotonic()
    topic = settings.topic_events
    try:
        for ev in events:
            key, value = encode(ev)
            pending.append(await producer.send(topic, value, key=key))
            sent += 1
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
            if sent % 512 == 0:
                bar.update(512)
            if rate is not None:
                delay = t0 + sent / rate - time.monotonic()
                if delay > 0.001:
                    await asyncio.sleep(delay)
        await asyncio.gather(*pending)
        bar.update(sent % 512)
    except KafkaError as exc:
        raise BrokerError(f"producing to {topic!r} at {settings.broker_url!r} failed after {sent} events: "
                          f"{exc!r}") from exc
    finally:
        bar.close()
        await _stop_quietly(producer)
    return sent


async def _stop_quietly(producer) -> None:
    try:
        await producer.stop()
    except Exception:  # noqa: BLE001 - closing after a failure must not hide the failure
        log.debug("producer stop failed", exc_info=True)
