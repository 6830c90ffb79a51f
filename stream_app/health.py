"""The worker's health, served at ``/healthz`` (the container's healthcheck): 200 while it keeps up,
503 when it is stalled.

A worker is **stalled** when input waits for it (its assigned ``events`` partitions have records
past the committed offsets) and either

- ``agent_stalled``: the agent handled no event for ``health_stall_s`` seconds, or
- ``commits_stopped``: no committed offset advanced for ``health_stall_s`` seconds (the agent reads,
  but events are not acknowledged: inference or delivery hangs, or Faust's commit does).

An idle worker (nothing to read) is healthy however long it waits. The clock of both starts when
the worker starts, so a worker recovering its tables is not stalled before ``health_stall_s``.

>>> verdict(lag=0, since_progress_s=999, since_commit_s=999, stall_s=60) is None
True
>>> verdict(lag=5, since_progress_s=61, since_commit_s=1, stall_s=60)
'agent_stalled'
>>> verdict(lag=5, since_progress_s=1, since_commit_s=61, stall_s=60)
'commits_stopped'
"""

from __future__ import annotations

import time
from typing import Any, Callable


def verdict(*, lag: int, since_progress_s: float, since_commit_s: float, stall_s: float) -> str | None:
    """Why the worker is unhealthy (``agent_stalled``, ``commits_stopped``), or ``None`` when healthy."""
    if lag <= 0:
        return None
    if since_progress_s > stall_s:
        return "agent_stalled"
    if since_commit_s > stall_s:
        return "commits_stopped"
    return None


class HealthWatch:
    """Remembers when the agent last handled an event (:meth:`progressed`) and when the committed
    offsets last moved (:meth:`observe`, on each sample), and judges a sample (:meth:`check`)."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s, self.clock = stall_s, clock
        self.last_progress = self.last_commit = clock()
        self._committed: dict[Any, int] = {}

    def progressed(self) -> None:
        self.last_progress = self.clock()

    def observe(self, committed: dict[Any, int]) -> None:
        """Record the committed offsets (per partition); a partition's offset moving up counts as
        commits advancing."""
        before = self._committed
        if any(off > before.get(tp, -1) for tp, off in committed.items()):
            self.last_commit = self.clock()
        self._committed = dict(committed)

    def check(self, lag: int, committed: dict[Any, int]) -> dict[str, Any]:
        """``{"ok", "reason", "lag", "since_progress_s", "since_commit_s"}`` for one sample."""
        self.observe(committed)
        now = self.clock()
        since_progress, since_commit = now - self.last_progress, now - self.last_commit
        reason = verdict(lag=lag, since_progress_s=since_progress, since_commit_s=since_commit, stall_s=self.stall_s)
        return {"ok": reason is None, "reason": reason, "lag": lag, "since_progress_s": round(since_progress, 1),
                "since_commit_s": round(since_commit, 1), "stall_s": self.stall_s}


def partition_lags(consumer: Any, topics: Any) -> dict[Any, int]:
    """The records past the committed offset (the next offset to read, as Kafka keeps it) of each
    partition of ``topics`` the Faust consumer holds; a partition whose end offset it has not fetched
    yet is left out (nothing known to wait). What ``/healthz``, ``/metrics`` (``nextaction status``)
    and the dashboard report."""
    committed = consumer._committed_offset  # noqa: SLF001 - Faust exposes no public getter
    out: dict[Any, int] = {}
    for tp in consumer.assignment():
        if tp.topic not in topics:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - not fetched yet
            continue
        if high is not None:
            out[tp] = max(0, int(high) - int(committed.get(tp) or 0))
    return out


def consumer_sample(consumer: Any, topic: str) -> tuple[int, dict[Any, int]]:
    """``(lag, committed)`` of the Faust consumer's assigned partitions of ``topic``: the records past
    the committed offsets (:func:`partition_lags`) and those offsets."""
    committed = {tp: off for tp, off in consumer._committed_offset.items()  # noqa: SLF001
                 if tp.topic == topic and off is not None and tp in consumer.assignment()}
    return sum(partition_lags(consumer, (topic,)).values()), committed


# --- per partition: which one waits, and why (the log line a stalled worker leaves) -------------------------
def partition_state(consumer: Any, topic: str) -> dict[int, dict[str, Any]]:
    """What the Faust consumer knows of each assigned partition of ``topic``: ``committed`` and
    ``read`` offsets, ``highwater``, whether Faust asks the fetcher for it (``active``; ``paused`` by a
    rebalance, ``buffered``: its stream buffer was full) and aiokafka's fetch ``position``. Private
    attributes of both libraries (no public getters), read defensively: a missing one is ``None``."""
    def tps(name: str) -> set:
        return {tp.partition for tp in (getattr(consumer, name, None) or ()) if tp.topic == topic}

    active, paused, buffered = tps("_active_partitions"), tps("_paused_partitions"), tps("_buffered_partitions")
    assignment = None
    try:
        assignment = consumer._thread._consumer._subscription.subscription.assignment  # noqa: SLF001
    except AttributeError:
        pass
    out: dict[int, dict[str, Any]] = {}
    for tp in consumer.assignment():
        if tp.topic != topic:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - not fetched yet
            high = None
        position = None
        if assignment is not None:
            try:
                st = assignment.state_value(tp)
                position = st.position if st is not None and st.has_valid_position else None
            except Exception:  # noqa: BLE001 - aiokafka internals: diagnostics only
                position = None
        out[tp.partition] = {"committed": consumer._committed_offset.get(tp),  # noqa: SLF001
                             "read": consumer._read_offset.get(tp), "highwater": high,  # noqa: SLF001
                             "position": position, "active": tp.partition in active,
                             "paused": tp.partition in paused, "buffered": tp.partition in buffered}
    return out


class PartitionWatch:
    """Finds the partitions whose records wait while their committed offset stays put for ``stall_s``
    seconds, and names each once per episode (:meth:`update` returns the newly stalled ones), so the
    worker's log says which partition stopped and in what state (``/healthz`` says only *that* the
    worker is stalled).

    >>> clock = iter([0, 10, 40, 41, 50]).__next__
    >>> w = PartitionWatch(30, clock)
    >>> w.update({2: {"committed": 98, "highwater": 128}, 3: {"committed": 60, "highwater": 60}})
    []
    >>> w.update({2: {"committed": 98, "highwater": 128}, 3: {"committed": 60, "highwater": 70}})
    []
    >>> w.update({2: {"committed": 98, "highwater": 128}, 3: {"committed": 70, "highwater": 70}})  # 40 s
    [2]
    >>> w.update({2: {"committed": 98, "highwater": 128}, 3: {"committed": 70, "highwater": 70}})  # named once
    []
    >>> w.update({2: {"committed": 128, "highwater": 128}}), w.stalled  # it moved: the episode ends
    ([], set())
    """

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s, self.clock = stall_s, clock
        self._since: dict[Any, tuple[int | None, float]] = {}  # partition -> (committed, when it was last seen moving)
        self.stalled: set = set()

    def update(self, state: dict[Any, dict[str, Any]]) -> list:
        now = self.clock()
        newly = []
        for p, s in state.items():
            committed, high = s.get("committed"), s.get("highwater")
            waiting = high is not None and high > (committed or 0)
            seen = self._since.get(p)
            if not waiting or seen is None or seen[0] != committed:
                self._since[p] = (committed, now)
                self.stalled.discard(p)
                continue
            if now - seen[1] > self.stall_s and p not in self.stalled:
                self.stalled.add(p)
                newly.append(p)
        for p in set(self._since) - set(state):  # no longer assigned
            del self._since[p]
            self.stalled.discard(p)
        return sorted(newly)
