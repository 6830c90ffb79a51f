"""The per-user window: bounded by count and by age, tolerant of out-of-order events (pure).

The value stored in the ``histories`` table is ``EventSeq.pack()`` bytes. Age is measured against
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

import numpy as np

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


def encode_value(history: EventSeq) -> bytes:
    """Table value bytes (what also goes to the changelog)."""
    return history.pack()


def decode_value(value: bytes | None) -> EventSeq:
    """Inverse of :func:`encode_value`; ``None`` (no entry yet) is the empty history."""
    return EventSeq.empty() if value is None else EventSeq.unpack(value)
