"""Recently seen ids, bounded: how the trainer drops an outcome it already learned from.

At-least-once delivery can write an ``outcomes`` record twice (a worker that crashed after the
record reached the broker and before its input offset was committed processes the event again).
Every outcome names its event by the ``events`` (partition, offset), so the trainer keeps the ids
of the last ``capacity`` outcomes and skips a repeat. Redeliveries come within seconds of the first
copy (at most the commit interval plus a restart), far inside any useful capacity.

>>> seen = RecentIds(capacity=2)
>>> seen.add((0, 5)), seen.add((0, 5)), seen.add((1, 7)), seen.add((2, 9)), seen.add((0, 5))
(True, False, True, True, True)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class RecentIds:
    """The last ``capacity`` distinct ids added (oldest forgotten first)."""

    def __init__(self, capacity: int = 200_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (got {capacity!r})")
        self.capacity = capacity
        self._ids: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, id_: Hashable) -> bool:
        """Remember ``id_``; ``False`` if it was already among the recent ones (a repeat)."""
        if id_ in self._ids:
            return False
        self._ids[id_] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._ids)
