"""Item-to-item transitions: a sparse "what follows what" table added to the Transformer's item scores.

On sparse logs most items occur a handful of times, too rarely for their embeddings to memorise
which items follow them, while the first-order Markov baseline simply counts it. The model keeps
the same counts, pruned to each item's ``top`` most frequent successors, and adds
``weight * feature(count(last item -> j))`` to the score of every successor ``j`` of the user's last
item. ``weight`` (and the feature: ``log`` = ``log1p(count)``, ``prob`` = ``count / row total``) are
fitted on validation cases after training (:func:`models.train.fit_transitions`); weight 0 turns
the table off. The table is stored in the checkpoint (CSR: ``ptr [V + 1]``, ``idx [nnz]``,
``val [nnz]``, vocabulary indices) and applied on every serving path
(:meth:`models.model.NextActionModel.item_logits`).

>>> seqs = [np.array([5, 6, 7]), np.array([5, 6]), np.array([5, 7, 7])]
>>> t = count_transitions(seqs, n_items=8, top=2)
>>> t.successors(5)   # 5 -> 6 twice, 5 -> 7 once
([6, 7], [2.0, 1.0])
>>> t.successors(7), t.successors(0)
(([7], [1.0]), ([], []))
>>> [round(v, 4) for v in t.with_feature("prob").successors(5)[1]]
[0.6667, 0.3333]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from models.errors import ConfigError

#: The transition score kinds: ``log`` = ``log1p(count)``, ``prob`` = ``count / row total``.
TRANSITION_SCORES = ("log", "prob")


@dataclass(frozen=True)
class Transitions:
    """CSR table over vocabulary indices: row ``a`` lists the successors of ``a`` and their values."""

    ptr: np.ndarray  # (V + 1,) int64
    idx: np.ndarray  # (nnz,) int32 successor indices, per row by decreasing count
    val: np.ndarray  # (nnz,) float32 counts (or a feature of them, see with_feature)

    @property
    def n_items(self) -> int:
        return len(self.ptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.idx)

    def successors(self, item: int) -> tuple[list[int], list[float]]:
        a, b = int(self.ptr[item]), int(self.ptr[item + 1])
        return self.idx[a:b].tolist(), self.val[a:b].tolist()

    def with_feature(self, kind: str) -> "Transitions":
        """The same table with counts turned into the scored feature (``log`` or ``prob``)."""
        if kind not in TRANSITION_SCORES:
            raise ConfigError("transition_feature", kind, f"must be one of {TRANSITION_SCORES}")
        if kind == "log":
            return Transitions(self.ptr, self.idx, np.log1p(self.val).astype(np.float32))
        rows = np.repeat(np.arange(self.n_items), np.diff(self.ptr))
        totals = np.bincount(rows, weights=self.val, minlength=self.n_items)
        return Transitions(self.ptr, self.idx, (self.val / np.maximum(totals[rows], 1e-12)).astype(np.float32))


def count_transitions(seqs: Iterable[np.ndarray], n_items: int, top: int, first_item: int = 0) -> Transitions:
    """Count consecutive pairs ``(a, b)`` over index sequences; keep each row's ``top`` largest
    counts (ties: smaller index first). Indices below ``first_item`` (padding, mask, hash buckets)
    are neither sources nor successors."""
    if top < 1:
        raise ConfigError("transition_top", top, "must be >= 1 to build a table")
    src, dst = [], []
    for s in seqs:
        s = np.asarray(s, np.int64)
        if s.size > 1:
            src.append(s[:-1])
            dst.append(s[1:])
    if not src:
        return Transitions(np.zeros(n_items + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    a, b = np.concatenate(src), np.concatenate(dst)
    ok = (a >= first_item) & (b >= first_item) & (a < n_items) & (b < n_items)
    pairs, counts = np.unique(a[ok] * n_items + b[ok], return_counts=True)
    return top_per_row(pairs // n_items, pairs % n_items, counts, n_items, top)


def top_per_row(a: np.ndarray, b: np.ndarray, val: np.ndarray, n_items: int, top: int) -> Transitions:
    """The CSR table of the entries ``(a, b, val)`` (row, column, value; each pair at most once),
    keeping each row's ``top`` largest values, by decreasing value (ties: smaller column first).

    >>> top_per_row(np.array([1, 1, 1, 0]), np.array([2, 0, 3, 1]), np.array([5., 7., 5., 1.]), 4, 2).successors(1)
    ([0, 2], [7.0, 5.0])
    """
    order = np.lexsort((b, -val, a))  # by row, then value descending, then column
    a, b, val = a[order], b[order], val[order]
    start = np.searchsorted(a, a, side="left")
    keep = (np.arange(len(a)) - start) < top
    a, b, val = a[keep], b[keep], val[keep]
    ptr = np.zeros(n_items + 1, np.int64)
    np.add.at(ptr, a + 1, 1)
    return Transitions(np.cumsum(ptr), b.astype(np.int32), val.astype(np.float32))
