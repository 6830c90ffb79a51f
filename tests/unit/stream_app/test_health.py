"""stream_app.health: the decision behind ``/healthz`` (a real worker answers it in
tests/integration/test_security.py)."""

from __future__ import annotations

from collections import namedtuple

import pytest

from stream_app.health import HealthWatch, consumer_sample, verdict

TP = namedtuple("TP", "topic partition")


@pytest.mark.parametrize("lag, progress, commit, expected", [
    (0, 1e6, 1e6, None),  # idle: nothing to read, healthy however long
    (3, 10, 10, None),  # keeping up
    (3, 61, 10, "agent_stalled"),
    (3, 10, 61, "commits_stopped"),
    (3, 61, 61, "agent_stalled"),
    (3, 60, 60, None),  # exactly at the limit
])
def test_verdict(lag, progress, commit, expected):
    assert verdict(lag=lag, since_progress_s=progress, since_commit_s=commit, stall_s=60) == expected


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_watch_tracks_progress_and_commit_advances():
    clock = Clock()
    w = HealthWatch(30, clock)
    a, b = TP("events", 0), TP("events", 1)
    assert w.check(5, {})["ok"]  # just started: the clocks start now
    clock.t += 31
    state = w.check(5, {})
    assert state == {"ok": False, "reason": "agent_stalled", "lag": 5, "since_progress_s": 31.0,
                     "since_commit_s": 31.0, "stall_s": 30}
    assert w.check(0, {})["ok"]  # the input drained: idle
    w.progressed()
    assert w.check(5, {a: 10})["ok"]  # the first commit seen
    clock.t += 20
    w.progressed()
    assert w.check(5, {a: 10})["ok"]
    clock.t += 20
    w.progressed()
    assert w.check(5, {a: 10})["reason"] == "commits_stopped"  # reads, but nothing commits for 40 s
    assert w.check(5, {a: 10, b: 0})["ok"]  # a newly assigned partition's offset counts as movement
    clock.t += 31
    w.progressed()
    w.observe({a: 12, b: 0})  # the timer saw a commit move
    assert w.check(5, {a: 12, b: 0})["ok"]
    clock.t += 31
    w.progressed()
    assert not w.check(5, {a: 11, b: 0})["ok"]  # an offset going back (a rebalance) is no progress


class FakeConsumer:
    def __init__(self, high, committed):
        self.high, self._committed_offset = high, committed

    def assignment(self):
        return set(self.high)

    def highwater(self, tp):
        if self.high[tp] == "boom":
            raise RuntimeError("not fetched")
        return self.high[tp]


def test_consumer_sample_counts_records_past_the_committed_offsets_of_the_events_topic():
    e0, e1, e2, other = TP("events", 0), TP("events", 1), TP("events", 2), TP("histories-changelog", 0)
    c = FakeConsumer({e0: 100, e1: 7, e2: None, other: 500}, {e0: 90, other: 1})
    assert consumer_sample(c, "events") == (10 + 7, {e0: 90})
    c = FakeConsumer({e0: "boom"}, {})
    assert consumer_sample(c, "events") == (0, {})


def test_partition_state_names_what_faust_and_aiokafka_know_of_each_partition():
    """The per-partition line a stalled worker logs (agents._sample_commits): offsets, whether Faust
    fetches it, aiokafka's position; an attribute a library version lacks reads as ``None``/absent."""
    from types import SimpleNamespace

    from stream_app.health import partition_state

    p2, p3, other = TP("events", 2), TP("events", 3), TP("histories-changelog", 2)
    states = {p2: SimpleNamespace(position=98, has_valid_position=True),
              p3: SimpleNamespace(position=None, has_valid_position=False)}
    assignment = SimpleNamespace(state_value=states.get)
    consumer = SimpleNamespace(
        assignment=lambda: {p2, p3, other}, highwater={p2: 128, p3: 60}.get,
        _committed_offset={p2: 98, p3: 60}, _read_offset={p2: 97}, _active_partitions={p3, other},
        _paused_partitions={p2}, _buffered_partitions=set(),
        _thread=SimpleNamespace(_consumer=SimpleNamespace(_subscription=SimpleNamespace(
            subscription=SimpleNamespace(assignment=assignment)))))
    state = partition_state(consumer, "events")
    assert state == {2: {"committed": 98, "read": 97, "highwater": 128, "position": 98, "active": False,
                         "paused": True, "buffered": False},
                     3: {"committed": 60, "read": None, "highwater": 60, "position": None, "active": True,
                         "paused": False, "buffered": False}}
    del consumer._thread  # another aiokafka/Faust layout: no position, the rest still reported
    assert partition_state(consumer, "events")[2]["position"] is None
