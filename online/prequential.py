"""Prequential (score-then-train) metrics per model version, over a rolling window of examples.

An ``outcomes`` record was already scored by the version that served it: the target item's 1-based
rank in the served top-K (``item_rank``, ``None`` when not in it; ``stream_app.records.outcome_record``
numbers the served list from 1) and the probability the served model gave the target's action
(``action_prob``). Scoring each example *before* the trainer learns from it is the prequential
protocol: every example is a held-out test for the version that served it.

Per example (:func:`score`):

* ``hit``: 1.0 when ``1 <= item_rank <= k``, else 0.0 (HR@k);
* ``ndcg``: :func:`ndcg_at` -- ``1 / log2(rank + 1)`` for ``rank <= k``, else 0.0 (one relevant item,
  so the ideal DCG is 1); the one definition, also used by :class:`online.guardrails.ShadowComparator`;
* ``log_loss``: ``-log(max(action_prob, EPS))`` with ``EPS = 1e-7`` (about float32 resolution: the
  served probabilities come from a float32 softmax, and a tiny floor would let one example dominate).

:class:`Prequential` keeps river rolling means (``utils.Rolling(stats.Mean, window_size=window)``)
of the three per version and overall; only the ``max_versions`` most recently updated versions are
kept (the least recently updated is forgotten), so memory is ``O((max_versions + 1) * window)``.

>>> p = Prequential(window=3)
>>> p.update("v1", 1, 0.5)           # hit at rank 1
Scores(hit=1.0, ndcg=1.0, log_loss=0.6931471805599453)
>>> p.update("v1", None, 1.0).hit    # not in the served top-K
0.0
>>> p.update("v2", 3, 0.25).ndcg     # 1 / log2(4)
0.5
>>> p.snapshot()["v1"]
{'hr10': 0.5, 'ndcg10': 0.5, 'log_loss': 0.34657359027997264, 'n': 2, 'seen': 2}
>>> p.overall()["n"], p.overall()["ndcg10"]
(3, 0.5)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

from river import stats, utils

EPS = 1e-7


def ndcg_at(rank: int | None, k: int = 10) -> float:
    """NDCG@k of one example with a single relevant item at 1-based ``rank`` (``None``: not ranked).

    >>> ndcg_at(1), ndcg_at(3), ndcg_at(11), ndcg_at(None)
    (1.0, 0.5, 0.0, 0.0)
    """
    if rank is None:
        return 0.0
    if rank < 1:
        raise ValueError(f"ranks are 1-based (got {rank!r})")
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0


class Scores(NamedTuple):
    """The prequential scores of one example."""

    hit: float
    ndcg: float
    log_loss: float


def score(item_rank: int | None, action_prob: float, k: int = 10) -> Scores:
    """HR@k, NDCG@k and the action log loss of one example (see the module docstring).

    >>> score(2, 0.0, k=1)
    Scores(hit=0.0, ndcg=0.0, log_loss=16.11809565095832)
    """
    ndcg = ndcg_at(item_rank, k)  # validates the rank
    hit = 1.0 if item_rank is not None and item_rank <= k else 0.0
    return Scores(hit, ndcg, -math.log(max(float(action_prob), EPS)))


class _Rolling:
    """Rolling means of the three scores over the last ``window`` examples."""

    __slots__ = ("hit", "ndcg", "log_loss", "seen")

    def __init__(self, window: int) -> None:
        self.hit = utils.Rolling(stats.Mean, window_size=window)
        self.ndcg = utils.Rolling(stats.Mean, window_size=window)
        self.log_loss = utils.Rolling(stats.Mean, window_size=window)
        self.seen = 0

    def update(self, s: Scores) -> None:
        self.hit.update(s.hit)
        self.ndcg.update(s.ndcg)
        self.log_loss.update(s.log_loss)
        self.seen += 1

    def as_dict(self, k: int) -> dict[str, float | int]:
        return {f"hr{k}": self.hit.get(), f"ndcg{k}": self.ndcg.get(), "log_loss": self.log_loss.get(),
                "n": len(self.hit.window), "seen": self.seen}


class Prequential:
    """Rolling prequential HR@k, NDCG@k and action log loss, per served model version and overall.

    Arguments:
        window: examples each rolling mean covers (per version, and overall). 1,000 by default: the
            standard error of a rolling HR/NDCG (per-example std at most 0.5) is then at most 0.016.
        k: the cut-off; the snapshot keys are ``f"hr{k}"`` and ``f"ndcg{k}"`` (``hr10``, ``ndcg10``).
        max_versions: versions kept; beyond it the least recently updated one is forgotten.
    """

    def __init__(self, window: int = 1000, *, k: int = 10, max_versions: int = 50) -> None:
        for name, v in (("window", window), ("k", k), ("max_versions", max_versions)):
            if not v >= 1:
                raise ValueError(f"Prequential: {name} must be >= 1 (got {v!r})")
        self.window, self.k, self.max_versions = window, k, max_versions
        self._versions: OrderedDict[str, _Rolling] = OrderedDict()
        self._all = _Rolling(window)
        self.forgotten = 0  # versions dropped beyond max_versions

    def update(self, version: str, item_rank: int | None, action_prob: float) -> Scores:
        """Score one example served by ``version`` and add it to that version's and the overall means."""
        s = score(item_rank, action_prob, self.k)
        r = self._versions.get(version)
        if r is None:
            r = self._versions[version] = _Rolling(self.window)
            if len(self._versions) > self.max_versions:
                self._versions.popitem(last=False)
                self.forgotten += 1
        else:
            self._versions.move_to_end(version)
        r.update(s)
        self._all.update(s)
        return s

    def snapshot(self) -> dict[str, dict[str, float | int]]:
        """``{version: {"hr10", "ndcg10", "log_loss", "n" (examples in the window), "seen" (all)}}``,
        least recently updated version first."""
        return {v: r.as_dict(self.k) for v, r in self._versions.items()}

    def overall(self) -> dict[str, float | int]:
        """The same means over the last ``window`` examples of any version."""
        return self._all.as_dict(self.k)

    def __len__(self) -> int:
        """Versions kept."""
        return len(self._versions)
