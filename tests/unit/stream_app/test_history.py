"""The per-user window: count bound, TTL, out-of-order events, packing."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.schema import ACTIONS, EventSeq
from stream_app.history import add_event, as_of, bound, contains


def build(ts_list, max_events=1000, ttl_ms=10**12, items=None):
    h = EventSeq.empty()
    for n, t in enumerate(ts_list):
        h = add_event(h, items[n] if items else f"i{n}", "view", t, max_events=max_events, ttl_ms=ttl_ms)
    return h


def test_count_bound_keeps_newest():
    h = build(range(1000, 11000, 1000), max_events=4)
    assert len(h) == 4 and h.items == ["i6", "i7", "i8", "i9"]


def test_ttl_relative_to_newest_event_not_wall_clock():
    h = build([1_000, 5_000, 9_000], ttl_ms=5_000)
    assert h.items == ["i1", "i2"]  # 1_000 is older than 9_000 - 5_000
    old = build([1_000, 2_000], ttl_ms=5_000)  # timestamps from 1970: still kept (no wall clock)
    assert old.items == ["i0", "i1"]


def test_out_of_order_event_is_slotted_in_order():
    h = build([1_000, 3_000, 2_000, 3_000])
    assert h.ts.tolist() == [1_000, 2_000, 3_000, 3_000]
    assert h.items == ["i0", "i2", "i1", "i3"]  # equal timestamps keep arrival order


def test_late_event_older_than_ttl_is_dropped():
    h = build([100_000, 1_000], ttl_ms=10_000)
    assert h.items == ["i0"]


def test_empty_history_stays_empty_and_redeliveries_are_recognised():
    assert bound(EventSeq.empty(), max_events=3, ttl_ms=1) == EventSeq.empty()
    h = build([1_000, 2_000, 2_000], items=["a", "b", "c"])
    assert contains(h, "c", "view", 2_000) and not contains(h, "c", "cart", 2_000)
    assert not contains(h, "a", "view", 2_000)  # the same item at another time is a new event
    assert as_of(h, 1_999).items == ["a"] and as_of(h, 2_000) is h


@settings(max_examples=100, deadline=None)
@given(events=st.lists(st.tuples(st.text(min_size=1, max_size=5), st.sampled_from(ACTIONS),
                                 st.integers(0, 10**7)), max_size=40),
       max_events=st.integers(1, 20), ttl_ms=st.integers(1, 10**7))
def test_property_sorted_bounded_and_round_trips(events, max_events, ttl_ms):
    h = EventSeq.empty()
    for item, action, ts in events:
        h = add_event(h, item, action, ts, max_events=max_events, ttl_ms=ttl_ms)
        assert len(h) <= max_events
        assert np.all(np.diff(h.ts) >= 0)
        assert int(h.ts[-1]) - int(h.ts[0]) <= ttl_ms
        assert len(h.items) == len(h.actions) == len(h.devices) == len(h.locations) == len(h.categories)
    assert EventSeq.unpack(h.pack()) == h
