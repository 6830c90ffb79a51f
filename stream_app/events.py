"""The ``events`` topic schema and its validation (pure: bytes in, :class:`Event` or a reason out).

Reason codes (the ``reason`` field of a dead-letter record):

=====================  ===========================================================
``too_large``          message larger than ``max_event_bytes``
``not_json``           not UTF-8 JSON
``not_object``         JSON, but not an object
``missing_field``      ``user_id``, ``action``, ``ts`` or (for item actions) ``item_id`` absent
``bad_type``           a field has the wrong type (e.g. ``ts`` is a string)
``bad_value``          a field is empty, too long, or not finite
``bad_action``         ``action`` is not one of view/click/cart/fav/purchase
``bad_ts``             ``ts`` is not a plausible epoch-milliseconds value
``clock_skew``         ``ts`` further in the future (or past) than the settings allow
``key_mismatch``       the message key is not the event's ``user_id``
=====================  ===========================================================

The pipeline (:mod:`stream_app.pipeline`, :mod:`stream_app.batcher`) adds three reasons of its own,
for events that passed validation:

=====================  ===========================================================
``predict_failed``     inference failed for this event (also after the batch was split)
``processing_failed``  the state update raised unexpectedly (a bug or a storage error)
``state_reset``        the user's stored state did not decode: the record holds the
                       stored bytes (key: the user id), the state is reset to empty and
                       the event itself is processed on it (it still gets a prediction)
=====================  ===========================================================

A dead-letter record never exceeds :data:`stream_app.records.DLQ_MAX_BYTES`; a longer original is cut
(``truncated``, ``original_bytes``, ``original_sha256``: :func:`stream_app.records.dlq_record`).

>>> e = parse_event(b'{"user_id": "u1", "item_id": "i9", "action": "view", "ts": 1700000000000}',
...                 now_ms=1700000000000)
>>> e.user_id, e.item_id, e.action, e.ts
('u1', 'i9', 'view', 1700000000000)
>>> parse_event(b'{"user_id": "u1", "action": "jump", "ts": 1700000000000}', now_ms=1700000000000)
Traceback (most recent call last):
...
stream_app.errors.EventRejected: bad_action: action must be one of view, click, cart, fav, purchase (got 'jump')
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import orjson

from models.schema import ACTIONS
from stream_app.errors import EventRejected

REASONS = ("too_large", "not_json", "not_object", "missing_field", "bad_type", "bad_value", "bad_action",
           "bad_ts", "clock_skew", "key_mismatch")

MIN_TS_MS = 946_684_800_000  # 2000-01-01: smaller values are seconds, not milliseconds
MAX_ID_LEN = 256
MAX_TEXT_LEN = 2048
_OPTIONAL_STR = ("session_id", "device", "location", "category")


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. Unknown extra fields are dropped (kept out of model input)."""

    user_id: str
    item_id: str
    action: str
    ts: int  # event time, epoch ms
    session_id: str = ""
    device: str = ""
    location: str = ""
    category: str = ""
    price: float | None = None
    item_text: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps({k: v for k, v in asdict(self).items() if v not in ("", None)})


#: The event fields, in schema order (the one list: replay mappings and CSV options use it).
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Event))
#: Fields every event must have.
REQUIRED_FIELDS: tuple[str, ...] = ("user_id", "item_id", "action", "ts")


def parse_event(raw: bytes, *, now_ms: int, key: bytes | None = None, max_bytes: int = 16_384,
                max_future_skew_ms: int = 300_000, max_age_ms: int = 0) -> Event:
    """Validate one raw message; raise :class:`EventRejected` with a reason code if it is bad."""
    if raw is None:
        raise EventRejected("not_json", "empty message body")
    if len(raw) > max_bytes:
        raise EventRejected("too_large", f"message is {len(raw)} bytes, limit {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventRejected("not_json", f"invalid JSON: {exc}", raw[:60]) from None
    if not isinstance(obj, dict):
        raise EventRejected("not_object", "event must be a JSON object", type(obj).__name__)

    user_id = _required_id(obj, "user_id")
    action = _required(obj, "action")
    if not isinstance(action, str):
        raise EventRejected("bad_type", "action must be a string", action)
    if action not in ACTIONS:
        raise EventRejected("bad_action", "action must be one of " + ", ".join(ACTIONS), action)
    item_id = _required_id(obj, "item_id")

    ts = _required(obj, "ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise EventRejected("bad_type", "ts must be a number (epoch milliseconds)", ts)
    if isinstance(ts, float):
        if not math.isfinite(ts):
            raise EventRejected("bad_ts", "ts must be finite", ts)
        ts = int(ts)
    if ts < MIN_TS_MS:
        raise EventRejected("bad_ts", "ts must be epoch milliseconds after 2000-01-01 (seconds given?)", ts)
    if ts > now_ms + max_future_skew_ms:
        raise EventRejected("clock_skew", f"ts is {(ts - now_ms) / 1000:.0f} s ahead of the worker clock "
                            f"(limit {max_future_skew_ms / 1000:.0f} s)", ts)
    if max_age_ms and ts < now_ms - max_age_ms:
        raise EventRejected("clock_skew", f"ts is {(now_ms - ts) / 1000:.0f} s old (limit {max_age_ms / 1000:.0f} s)",
                            ts)
    if key is not None and key.decode("utf-8", "replace") != user_id:
        raise EventRejected("key_mismatch", f"message key must equal user_id {user_id!r}", key[:60])

    opt = {}
    for name in _OPTIONAL_STR:
        v = obj.get(name)
        if v is None:
            continue
        if not isinstance(v, str):
            raise EventRejected("bad_type", f"{name} must be a string", v)
        if len(v) > MAX_ID_LEN:
            raise EventRejected("bad_value", f"{name} longer than {MAX_ID_LEN} characters", v)
        opt[name] = v
    price = obj.get("price")
    if price is not None:
        if isinstance(price, bool) or not isinstance(price, (int, float)):
            raise EventRejected("bad_type", "price must be a number", price)
        if not math.isfinite(price) or price < 0:
            raise EventRejected("bad_value", "price must be finite and >= 0", price)
        price = float(price)
    text = obj.get("item_text")
    if text is not None:
        if not isinstance(text, str):
            raise EventRejected("bad_type", "item_text must be a string", text)
        if len(text) > MAX_TEXT_LEN:
            raise EventRejected("bad_value", f"item_text longer than {MAX_TEXT_LEN} characters", len(text))
    return Event(user_id, item_id, action, int(ts), price=price, item_text=text or "", **opt)


def _required(obj: dict, name: str):
    if name not in obj or obj[name] is None:
        raise EventRejected("missing_field", f"{name} is required", sorted(obj)[:10])
    return obj[name]


def _required_id(obj: dict, name: str) -> str:
    v = _required(obj, name)
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise EventRejected("bad_type", f"{name} must be a string", v)
    v = str(v)
    if not v or len(v) > MAX_ID_LEN:
        raise EventRejected("bad_value", f"{name} must be 1..{MAX_ID_LEN} characters", v)
    return v
