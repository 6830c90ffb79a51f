"""A bounded replay buffer: the most recent examples plus a uniform sample of all older ones.

:class:`ReplayBuffer` keeps two disjoint parts:

* **recent**: the last ``recent`` examples added (a deque);
* **reservoir**: a uniform random sample of at most ``reservoir`` of the examples that have *left*
  the recent part (Vitter's Algorithm R): after ``m`` examples were pushed out of the recent part,
  each of them is in the reservoir with the same probability ``min(1, reservoir / m)``. Examples
  still in the recent part are not offered to the reservoir, so the two parts never hold the same
  example and a sample never repeats one.

:meth:`ReplayBuffer.sample` mixes both in a given proportion (``recent_fraction`` of ``n`` from the
recent part, the rest from the reservoir, each drawn without replacement); when a part holds too
few, the other one makes up the difference, so a call returns ``min(n, len(buffer))`` examples,
shuffled. Memory is ``recent + reservoir`` references whatever the number of adds; the examples
themselves are opaque (any type).

Two seeded generators make it reproducible: one decides what the reservoir keeps (so its content
depends only on the seed and the adds, not on how often one sampled), the other draws samples.

>>> buf = ReplayBuffer(recent=3, reservoir=4, seed=0)
>>> for x in range(100):
...     buf.add(x)
>>> buf.recent_items()
[97, 98, 99]
>>> len(buf), buf.added, buf.evicted, all(x < 97 for x in buf.reservoir_items())
(7, 100, 97, True)
>>> s = buf.sample(4, recent_fraction=0.5)
>>> len(s), sum(x >= 97 for x in s)   # 2 recent + 2 from the reservoir
(4, 2)
>>> s == ReplayBuffer.replay(range(100), recent=3, reservoir=4, seed=0).sample(4, recent_fraction=0.5)
True
"""

from __future__ import annotations

import random
from collections import deque
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class ReplayBuffer(Generic[T]):
    """The last ``recent`` examples + a reservoir of ``reservoir`` examples sampled uniformly from
    everything that left the recent part (see the module docstring).

    Arguments:
        recent: size of the recent part (0: every example goes straight to the reservoir, which
            is then a uniform sample of everything added).
        reservoir: size of the reservoir (0: a plain sliding window).
        seed: seeds both generators (reservoir replacement, sampling).

    Counters: ``added`` (all adds), ``evicted`` (examples that left the recent part, i.e. were
    offered to the reservoir), ``sampled`` (examples returned by :meth:`sample`).
    """

    def __init__(self, recent: int, reservoir: int, seed: int = 0) -> None:
        if recent < 0 or reservoir < 0 or recent + reservoir == 0:
            raise ValueError(f"ReplayBuffer: recent and reservoir must be >= 0, not both 0 "
                             f"(got {recent!r}, {reservoir!r})")
        self.recent, self.reservoir, self.seed = recent, reservoir, seed
        self._recent: deque[T] = deque()
        self._reservoir: list[T] = []
        self._keep_rng = random.Random(f"replay-reservoir-{seed}")
        self._sample_rng = random.Random(f"replay-sample-{seed}")
        self.added = 0
        self.evicted = 0
        self.sampled = 0

    @classmethod
    def replay(cls, examples: Iterable[T], *, recent: int, reservoir: int, seed: int = 0) -> "ReplayBuffer[T]":
        """A buffer with ``examples`` added in order."""
        buf: ReplayBuffer[T] = cls(recent, reservoir, seed)
        for x in examples:
            buf.add(x)
        return buf

    def add(self, example: T) -> None:
        """Add ``example`` to the recent part; the oldest recent example (if full) is offered to the reservoir."""
        self.added += 1
        if self.recent == 0:
            self._offer(example)
            return
        if len(self._recent) == self.recent:
            self._offer(self._recent.popleft())
        self._recent.append(example)

    def _offer(self, example: T) -> None:
        """Algorithm R: the m-th example offered replaces a uniform slot with probability reservoir / m."""
        self.evicted += 1
        if self.reservoir == 0:
            return
        if len(self._reservoir) < self.reservoir:
            self._reservoir.append(example)
            return
        j = self._keep_rng.randrange(self.evicted)
        if j < self.reservoir:
            self._reservoir[j] = example

    def sample(self, n: int, recent_fraction: float = 0.5) -> list[T]:
        """``min(n, len(self))`` distinct examples, ``n * recent_fraction`` (rounded half up) of them from the
        recent part and the rest from the reservoir (a part that holds too few is topped up from the other),
        shuffled."""
        if n < 0:
            raise ValueError(f"sample: n must be >= 0 (got {n!r})")
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"sample: recent_fraction must be in [0, 1] (got {recent_fraction!r})")
        n = min(n, len(self))
        n_recent = min(int(n * recent_fraction + 0.5), len(self._recent))  # rounded half up
        n_old = min(n - n_recent, len(self._reservoir))
        n_recent = n - n_old  # top up from the recent part when the reservoir is short
        rng = self._sample_rng
        out = [self._recent[i] for i in rng.sample(range(len(self._recent)), n_recent)]
        out += rng.sample(self._reservoir, n_old)
        rng.shuffle(out)
        self.sampled += len(out)
        return out

    def discard(self, drop: Callable[[T], bool]) -> int:
        """Remove every example for which ``drop`` is true (a privacy deletion); returns how many went.
        The reservoir then holds fewer than ``reservoir`` examples and refills from the next examples
        that leave the recent part (the sample stays uniform over what is kept, up to those slots).

        >>> buf = ReplayBuffer.replay(range(10), recent=2, reservoir=20)
        >>> buf.discard(lambda x: x % 2 == 0), buf.recent_items(), sorted(buf.reservoir_items())
        (5, [9], [1, 3, 5, 7])
        """
        before = len(self)
        kept = [x for x in self._recent if not drop(x)]
        self._recent.clear()
        self._recent.extend(kept)
        self._reservoir = [x for x in self._reservoir if not drop(x)]
        return before - len(self)

    def recent_items(self) -> list[T]:
        """The recent part, oldest first."""
        return list(self._recent)

    def reservoir_items(self) -> list[T]:
        """The reservoir (in slot order, not meaningful)."""
        return list(self._reservoir)

    def __len__(self) -> int:
        return len(self._recent) + len(self._reservoir)

    def stats(self) -> dict[str, int]:
        """Sizes and counters (for logs and metrics)."""
        return {"recent": len(self._recent), "reservoir": len(self._reservoir), "added": self.added,
                "evicted": self.evicted, "sampled": self.sampled}
