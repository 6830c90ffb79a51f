"""The per-user window: bounded by count and by age, tolerant of out-of-order events (pure).

The value stored in the ``histories`` table is a :class:`UserState` (the window and the user's latest
prediction; :func:`encode_value`). Age is measured against
the user's newest event time, not the wall clock, so replays of old logs keep their history.

>>> h = EventSeq.empty()
>>> for i, t in enumerate([1_000, 2_000, 3_000, 4_000]):
...     h = add_event(h, f"i{i}", "view", t, max_events=3, ttl_ms=10_000)
>>> h.items
['i1', 'i2', 'i3']
>>> add_event(h, "late", "click", 2_500, max_events=3, ttl_ms=10_000).items  # out of order: slotted in
['late', 'i2', 'i3']
>>> add_event(h, "far", "view", 20_000, max_events=3, ttl_ms=10_000).items   # older ones age out
['far']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from models.schema import EventSeq


def add_event(history: EventSeq, item: str, action: str | int, ts: int, *, max_events: int, ttl_ms: int,
              device: str = "", location: str = "", category: str = "") -> EventSeq:
    """Insert one event in event-time order, then apply the age and count bounds."""
    return bound(history.appended(item, action, ts, device, location, category), max_events=max_events,
                 ttl_ms=ttl_ms)


def bound(history: EventSeq, *, max_events: int, ttl_ms: int) -> EventSeq:
    """Drop events older than ``ttl_ms`` before the newest one, then keep the last ``max_events``."""
    if len(history) == 0:
        return history
    cutoff = int(history.ts[-1]) - ttl_ms
    first = int(np.searchsorted(history.ts, cutoff, side="left"))
    if first:
        history = history[first:]
    return history.tail(max_events)


@dataclass(slots=True)
class UserState:
    """One user's ``histories`` table value: the event window and a summary of the latest prediction
    published for the user (``None`` before the first; it pairs with the next event as an outcome).

    Stored as one orjson object: the :meth:`EventSeq.to_json` columns plus ``"p"`` for the
    prediction, so one table write (one changelog record) per event keeps both. A value without
    ``"p"`` (written before the two were merged) reads as a history with no prediction yet.

    >>> st = UserState(EventSeq.from_columns(["a"], ["cart"], [5]), {"v": "m1", "event_ts": 5})
    >>> back = decode_value(encode_value(st))
    >>> back.history.items, back.last
    (['a'], {'v': 'm1', 'event_ts': 5})
    >>> decode_value(EventSeq.from_columns(["a"], ["view"], [1]).pack()).last is None
    True
    """

    history: EventSeq
    last: dict | None = None


def encode_value(state: UserState) -> bytes:
    """Table value bytes (what also goes to the changelog)."""
    d = state.history.to_json()
    if state.last is not None:
        d["p"] = state.last
    return orjson.dumps(d)


def decode_value(value: bytes | None) -> UserState:
    """Inverse of :func:`encode_value`; ``None`` (no entry yet) is the empty history."""
    if value is None:
        return UserState(EventSeq.empty())
    d = orjson.loads(value)
    last = d.pop("p", None)
    return UserState(EventSeq.from_json(d), last)
