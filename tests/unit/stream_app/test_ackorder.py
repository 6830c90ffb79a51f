"""stream_app.ackorder: acks leave each partition in read order, whatever order messages finish in."""

from __future__ import annotations

import random

from stream_app.ackorder import AckOrder


def test_releases_in_read_order_per_partition_whatever_the_finishing_order():
    order = AckOrder()
    rng = random.Random(3)
    read = [("events", p, o) for o in range(200) for p in (0, 1)]
    for where in read:
        order.read(where, where)
    released = []
    for where in rng.sample(read, len(read)):
        released += order.done(where)
    assert order.pending() == 0
    for p in (0, 1):
        assert [w[2] for w in released if w[1] == p] == list(range(200))


def test_a_rewind_drops_the_stale_entries_and_a_revoke_forgets_the_partition():
    order = AckOrder()
    for o in (10, 11, 12):
        order.read(("events", 0, o), o)
    order.read(("events", 0, 11), "again")  # re-read from 11 (a seek): 11 and 12 were stale
    assert order.done(("events", 0, 11)) == []  # 10 still holds it back
    assert order.done(("events", 0, 10)) == [10, "again"]
    order.read(("events", 1, 5), 5)
    order.forget([("events", 1)])
    assert order.done(("events", 1, 5)) == [None] and order.pending() == 0  # acked directly
