"""Acknowledge each partition's messages in the order they were read (pure bookkeeping).

Faust commits, per partition, the end of the first run of consecutive acked offsets, and skips an
unacked offset at the head of that run when it is exactly the committed offset
(``faust.transport.consumer.Consumer._new_offset``: ``min(acked) - committed_offset > 1`` should be
``> 0``; and with no commit yet it does not check at all). The pipeline finishes messages out of
order: a dead-lettered message is done once its DLQ record is confirmed, while a valid message read
just before it still waits in a prediction batch. Acked as they finish, the later message lets Faust
commit past the earlier one, and a ``kill -9`` or a rebalance before that batch is delivered loses it
for good (seen in the three-worker fault test: 2 of 4,000 events lost).

So every message is registered when read (:meth:`AckOrder.read`) and, when done, released only
once every message read before it on its partition is done too (:meth:`AckOrder.done`).

>>> order = AckOrder()
>>> for offset in (5, 6, 7):
...     order.read(("events", 0, offset), f"m{offset}")
>>> order.done(("events", 0, 6))  # 5 is still in a batch: hold 6 back
[]
>>> order.done(("events", 0, 5))
['m5', 'm6']
>>> order.done(("events", 0, 9))  # never registered (e.g. a revoked partition's): released at once
[None]
"""

from __future__ import annotations

from collections import deque
from typing import Any, Hashable, Iterable

Where = tuple[str, int, int]  # (topic, partition, offset)


class AckOrder:
    """Per (topic, partition): the messages read and not yet released, in read order."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, int], deque[list]] = {}  # entries: [offset, item, done]
        self._entries: dict[Where, list] = {}

    def read(self, where: Where, item: Any) -> None:
        """Register the message at ``where`` (``item`` is what :meth:`done` gives back). A partition
        read again from an earlier offset (a seek after a rebalance) drops its entries from there on."""
        topic, partition, offset = where
        q = self._queues.setdefault((topic, partition), deque())
        while q and q[-1][0] >= offset:
            self._entries.pop((topic, partition, q.pop()[0]), None)
        entry = [offset, item, False]
        q.append(entry)
        self._entries[where] = entry

    def done(self, where: Where) -> list[Any]:
        """Mark ``where`` done; return the items now releasable, in read order (``[None]`` for a
        message never registered here, so the caller acks it directly)."""
        entry = self._entries.get(where)
        if entry is None:
            return [None]
        entry[2] = True
        q = self._queues[where[:2]]
        out = []
        while q and q[0][2]:
            offset, item, _ = q.popleft()
            self._entries.pop((where[0], where[1], offset), None)
            out.append(item)
        return out

    def forget(self, partitions: Iterable[Hashable]) -> None:
        """Drop the entries of ``partitions`` (``(topic, partition)`` pairs): revoked, so their
        messages' acks no longer matter here."""
        for tp in partitions:
            for entry in self._queues.pop(tp, ()):
                self._entries.pop((tp[0], tp[1], entry[0]), None)

    def pending(self) -> int:
        """Messages read and not yet released."""
        return len(self._entries)
