"""The per-user window: bounded by count and by age, tolerant of out-of-order events (pure).

Age is measured against the user's newest event time, not the wall clock, so replays of old logs
keep their history.

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

from models.schema import ACTION_INDEX, EventSeq


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
    if history.ts[0] < cutoff:  # (the array method: np.searchsorted's dispatch costs more than the search)
        history = history[int(history.ts.searchsorted(cutoff, side="left")):]
    return history.tail(max_events)


def contains(history: EventSeq, item: str, action: str, ts: int) -> bool:
    """Is this exact event (time, item, action) already in the history (a redelivery)?

    >>> h = EventSeq.from_columns(["a", "b"], ["view", "cart"], [1, 2])
    >>> contains(h, "b", "cart", 2), contains(h, "b", "view", 2)
    (True, False)
    """
    if not len(history) or ts > history.ts[-1]:  # the usual case: a new event, after every stored one
        return False
    lo = int(history.ts.searchsorted(ts, side="left"))
    hi = int(history.ts.searchsorted(ts, side="right"))
    a = ACTION_INDEX[action]
    return any(history.items[i] == item and int(history.actions[i]) == a for i in range(lo, hi))


def as_of(history: EventSeq, ts: int) -> EventSeq:
    """The events up to and including time ``ts`` (the context a prediction for that event sees).

    >>> as_of(EventSeq.from_columns(["a", "b", "c"], ["view"] * 3, [1, 2, 3]), 2).items
    ['a', 'b']
    """
    if not len(history) or ts >= history.ts[-1]:  # the usual case: the window's newest event
        return history
    end = int(history.ts.searchsorted(ts, side="right"))
    return history if end == len(history) else history[:end]
