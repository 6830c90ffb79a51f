"""Item neighbours: a sparse "what is consumed together" table added to the Transformer's item scores.

The transition table (:mod:`models.transitions`) counts what *follows* the last item. Item-kNN
counts what the *same users* consume, in any order: the cosine similarity of two items' columns in
the binary user x item matrix, ``|U(a) & U(b)| / sqrt(|U(a)| |U(b)|)``. On logs where an item occurs
a handful of times its embedding cannot learn that, while the co-occurrence count simply has it
(item-kNN is the strongest baseline on MovieLens-100k with history masked). The model keeps each
item's ``top`` most similar items (itself excluded) and adds
``weight * sum(cosine(i, j) for i in the last window events)`` to the score of every neighbour
``j``. ``weight`` and ``window`` are fitted on validation cases after training
(:func:`models.train.fit_neighbours`); weight 0 turns the table off. The table is stored in the
checkpoint (CSR over vocabulary indices, the :class:`~models.transitions.Transitions` layout) and
applied on every serving path (:meth:`models.model.NextActionModel.item_logits`). It is built
offline and not updated by the online trainer; a row given to a new item online loses its
neighbours (:meth:`models.model.NextActionModel.clear_neighbours`).

>>> seqs = [np.array([5, 6, 7]), np.array([5, 6]), np.array([7, 7])]
>>> t = count_neighbours(seqs, n_items=8, top=2)
>>> nbrs, sims = t.successors(5)   # 5 and 6 share both their users; 5 and 7 one of 2 x 2
>>> nbrs, [round(s, 4) for s in sims]
([6, 7], [1.0, 0.5])
>>> t.successors(0)                # padding, mask and bucket rows are never sources or neighbours
([], [])
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from models.errors import ConfigError
from models.transitions import Transitions, top_per_row


def count_neighbours(seqs: Iterable[np.ndarray], n_items: int, top: int, first_item: int = 0) -> Transitions:
    """The cosine co-occurrence table of index sequences (one per user): each row keeps its ``top``
    most similar items (ties: smaller index first), itself excluded. Indices below ``first_item``
    (padding, mask, hash buckets) are neither sources nor neighbours."""
    import scipy.sparse as sp

    if top < 1:
        raise ConfigError("neighbour_top", top, "must be >= 1 to build a table")
    rows, cols = [], []
    for u, s in enumerate(seqs):
        s = np.unique(np.asarray(s, np.int64))
        s = s[(s >= first_item) & (s < n_items)]
        rows.append(np.full(s.size, u, np.int64))
        cols.append(s)
    n_users = len(rows)
    if not n_users or not sum(c.size for c in cols):
        return Transitions(np.zeros(n_items + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    r, c = np.concatenate(rows), np.concatenate(cols)
    X = sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(n_users, n_items))
    co = (X.T @ X).tocoo()  # (n_items, n_items): users in common
    users = np.asarray(X.sum(0), np.float64).ravel()
    keep = co.row != co.col
    a, b, n = co.row[keep].astype(np.int64), co.col[keep].astype(np.int64), co.data[keep].astype(np.float64)
    return top_per_row(a, b, n / np.sqrt(users[a] * users[b]), n_items, top)
