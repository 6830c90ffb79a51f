"""Baselines the Transformer has to beat, as scorers for :func:`models.evaluate.evaluate`.

Every baseline is fitted on the **train part only** (``fit(ds, train)``) and may read the case's
history when it scores (that is the model's input too). ``score_items(histories)`` returns a
``[B, len(ds.items)]`` float matrix, higher is better. Where a baseline has nothing to say about
an item (e.g. Markov from an unseen last item) it falls back to popularity: scores are built as
``primary + popularity / (max_popularity + 1)`` -- the popularity part is below 1, so it only
orders items whose primary score ties (integer counts) and never changes the primary order.

Action baselines (:class:`MajorityAction`, :class:`LastActionMarkov`) also provide
``score_actions(histories) -> [B, 5]`` probabilities and ``predict_gap_s(histories) -> [B]``.

Baselines that are a probability model (:class:`Popularity`, :class:`RecentPopularity`,
:class:`Markov` and their subclasses) also provide ``item_probs(histories) -> [B, len(ds.items)]``:
each item's probability of being the next one (rows sum to 1), in the same order as their
``score_items`` up to ties. The popularity fallback is one pseudo-observation spread by
popularity: ``(count(i) + P_pop(i)) / (count + 1)``, where the counts are the primary evidence
(successors of the last item, recent events). The evaluator reports their calibration
(:func:`models.evaluate.evaluate`, ``item/top1_ece``); the similarity baselines have none.

>>> from models.datasets import synthetic, leave_one_out
>>> ds = synthetic(n_users=50, seed=0); sp = leave_one_out(ds)
>>> m = Markov().fit(ds, sp.train)
>>> m.score_items([c.history for c in sp.test[:4]]).shape == (4, len(ds.items))
True
>>> P = m.item_probs([c.history for c in sp.test[:4]])
>>> np.allclose(P.sum(1), 1.0), bool((P.argmax(1) == m.score_items([c.history for c in sp.test[:4]]).argmax(1)).all())
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from models.datasets.core import Dataset
from models.schema import ACTION_INDEX, ACTIONS, EventSeq
from models.errors import ConfigError

__all__ = ["Popularity", "RecentPopularity", "RecentItems", "Markov", "ItemKNN", "SessionKNN",
           "MajorityAction", "LastActionMarkov", "BASELINES", "make_baseline", "item_counts"]


def _idx(ds: Dataset, seq: EventSeq) -> np.ndarray:
    ix = ds.item_index
    return np.fromiter((ix.get(i, -1) for i in seq.items), np.int64, len(seq))


def item_counts(ds: Dataset, seqs, *, distinct_users: bool = False) -> np.ndarray:
    """Events per item over ``seqs`` (a dict or list of EventSeq); ``distinct_users`` counts users."""
    vals = seqs.values() if isinstance(seqs, dict) else seqs
    parts = [_idx(ds, s) for s in vals]
    if distinct_users:
        parts = [np.unique(p) for p in parts]
    allv = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    allv = allv[allv >= 0]
    return np.bincount(allv, minlength=len(ds.items)).astype(np.float64)


def _popfrac(pop: np.ndarray) -> np.ndarray:
    return pop / (pop.max() + 1.0)


def _popdist(pop: np.ndarray) -> np.ndarray:
    """Popularity as a distribution (uniform when nothing was counted)."""
    total = pop.sum()
    return pop / total if total > 0 else np.full(len(pop), 1.0 / max(1, len(pop)))


def _backoff(counts: np.ndarray, popdist: np.ndarray) -> np.ndarray:
    """``(counts + popdist) / (row total + 1)``: the counts' distribution with one pseudo-observation
    spread by popularity (rows of ``counts [B, N]`` sum to 1 after it)."""
    return (counts + popdist) / (counts.sum(1, keepdims=True) + 1.0)


class _Base:
    name = "base"

    def fit(self, ds: Dataset, train: dict[str, EventSeq]):
        self.ds = ds
        self.n_items = len(ds.items)
        self.pop = item_counts(ds, train)
        self.popf = _popfrac(self.pop)
        self._fit(train)
        return self

    def _fit(self, train) -> None:
        pass

    def _hists(self, histories: Sequence[EventSeq]) -> list[np.ndarray]:
        return [_idx(self.ds, h) for h in histories]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Popularity(_Base):
    """Most frequent items in the train part (event counts)."""

    name = "popularity"

    def score_items(self, histories):
        return np.broadcast_to(self.pop, (len(histories), self.n_items)).copy()

    def item_probs(self, histories):
        return np.broadcast_to(_popdist(self.pop), (len(histories), self.n_items)).copy()


class RecentPopularity(_Base):
    """Popularity over the most recent train events: the last ``days`` of event time (datasets with
    time) or each user's last ``last_n`` events (datasets without time)."""

    name = "recent_popularity"

    def __init__(self, days: float = 1.0, last_n: int = 5):
        self.days, self.last_n = days, last_n

    def _fit(self, train):
        if self.ds.has_time:
            t_end = max((int(s.ts[-1]) for s in train.values() if len(s)), default=0)
            lo = t_end - int(self.days * 86_400_000)
            recent = [s[int(np.searchsorted(s.ts, lo)):] for s in train.values()]
        else:
            recent = [s.tail(self.last_n) for s in train.values()]
        self.recent = item_counts(self.ds, recent)

    def score_items(self, histories):
        return np.broadcast_to(self.recent + self.popf, (len(histories), self.n_items)).copy()

    def item_probs(self, histories):
        return np.broadcast_to(_backoff(self.recent[None], _popdist(self.pop))[0], (len(histories), self.n_items)).copy()


class RecentItems(_Base):
    """The user's own history, most recent first (repeat consumption); then popularity."""

    name = "recent_items"

    def score_items(self, histories):
        out = np.broadcast_to(self.popf, (len(histories), self.n_items)).copy()
        for b, h in enumerate(self._hists(histories)):
            h = h[h >= 0]
            if h.size:
                # later positions overwrite earlier ones: score = 1 + recency position (>= 1)
                out[b, h] = 1.0 + np.arange(1, h.size + 1)
        return out


class Markov(_Base):
    """First-order transitions ``P(next | last item)`` counted on train sequences; popularity
    orders the rest (and everything when the last item was never followed in train)."""

    name = "markov"

    def _fit(self, train):
        src, dst = [], []
        for s in train.values():
            ix = _idx(self.ds, s)
            if ix.size > 1:
                src.append(ix[:-1])
                dst.append(ix[1:])
        src = np.concatenate(src) if src else np.zeros(0, np.int64)
        dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
        ok = (src >= 0) & (dst >= 0)
        n = self.n_items
        # one extra empty row (index n) for histories whose last item is unknown or absent
        self.T = sp.csr_matrix((np.ones(ok.sum()), (src[ok], dst[ok])), shape=(n + 1, n))
        self.T.sum_duplicates()

    def _last(self, histories) -> np.ndarray:
        n = self.n_items
        return np.array([h[-1] if h.size and h[-1] >= 0 else n for h in self._hists(histories)], np.int64)

    def score_items(self, histories):
        out = self.T[self._last(histories)].toarray()
        out += self.popf
        return out

    def item_probs(self, histories):
        return _backoff(self.T[self._last(histories)].toarray(), _popdist(self.pop))


class ItemKNN(_Base):
    """Item-to-item cosine similarity of co-occurrence over train user histories (binary
    user x item matrix), scored as the sum of similarities to the user's ``window`` most recent
    distinct items. ``include_self`` keeps each item's similarity to itself (= 1), so the user's
    own recent items stay candidates (repeat consumption)."""

    name = "item_knn"

    def __init__(self, window: int = 2, include_self: bool = False, neighbours: int | None = None,
                 distinct: bool = False, decay: float = 1.0, binary: bool = True):
        self.window, self.include_self, self.neighbours = window, include_self, neighbours
        self.distinct, self.decay, self.binary = distinct, decay, binary

    def _fit(self, train):
        rows, cols = [], []
        for u, s in enumerate(train.values()):
            ix = _idx(self.ds, s)
            ix = ix[ix >= 0]
            if self.binary:
                ix = np.unique(ix)
            rows.append(np.full(ix.size, u))
            cols.append(ix)
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        X = sp.csr_matrix((np.ones(r.size, np.float64), (r, c)), shape=(len(train), self.n_items))
        X.sum_duplicates()
        co = (X.T @ X).tocsr()
        cnt = np.asarray(X.multiply(X).sum(0)).ravel()
        inv = np.where(cnt > 0, 1.0 / np.sqrt(np.maximum(cnt, 1)), 0.0)
        sim = sp.diags(inv) @ co @ sp.diags(inv)
        sim = sim.tocsr()
        if not self.include_self:
            sim.setdiag(0)
            sim.eliminate_zeros()
        if self.neighbours:
            sim = _top_k_rows(sim, self.neighbours)
        self.S = sim.astype(np.float64)

    def score_items(self, histories):
        hs = self._hists(histories)
        rows, cols, wts = [], [], []
        for b, h in enumerate(hs):
            h = h[h >= 0]
            if h.size:
                if self.distinct:  # the ``window`` most recent distinct items
                    _, first = np.unique(h[::-1], return_index=True)
                    recent = h[::-1][np.sort(first)][: self.window]
                else:  # the items of the last ``window`` events (a repeated item counts once)
                    last = h[-self.window:][::-1]
                    _, first = np.unique(last, return_index=True)
                    recent = last[np.sort(first)]
                rows.append(np.full(recent.size, b))
                cols.append(recent)
                wts.append(self.decay ** np.arange(recent.size))
        if not rows:
            return np.broadcast_to(self.popf * 1e-6, (len(histories), self.n_items)).copy()
        Q = sp.csr_matrix((np.concatenate(wts), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(histories), self.n_items))
        out = (Q @ self.S).toarray()
        out += self.popf * 1e-6
        return out


def _top_k_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    m = m.tocsr()
    data, idx, ptr = [], [], [0]
    for i in range(m.shape[0]):
        a, b = m.indptr[i], m.indptr[i + 1]
        d, j = m.data[a:b], m.indices[a:b]
        if d.size > k:
            sel = np.argpartition(-d, k)[:k]
            d, j = d[sel], j[sel]
        data.append(d)
        idx.append(j)
        ptr.append(ptr[-1] + d.size)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(idx), np.array(ptr)), shape=m.shape)


class SessionKNN(_Base):
    """Session-based kNN (Jannach & Ludewig 2017, "SKNN"): the current session (the history's
    trailing events within ``gap_s`` of each other, at most ``window`` items) is compared with
    every train sequence by cosine over binary item sets; the ``k`` most similar sequences vote
    for their items with their similarity. Popularity orders the rest."""

    name = "session_knn"

    def __init__(self, k: int = 100, gap_s: float = 1800.0, window: int = 50):
        self.k, self.gap_s, self.window = k, gap_s, window

    def _fit(self, train):
        rows, cols = [], []
        for u, s in enumerate(train.values()):
            ix = np.unique(_idx(self.ds, s))
            ix = ix[ix >= 0]
            rows.append(np.full(ix.size, u))
            cols.append(ix)
        r, c = np.concatenate(rows), np.concatenate(cols)
        X = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(len(train), self.n_items))
        norms = np.sqrt(np.asarray(X.sum(1)).ravel())
        self.Xn = (sp.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0)) @ X).tocsr()
        self.XnT = self.Xn.T.tocsr()

    def _session(self, h: EventSeq) -> np.ndarray:
        ix = _idx(self.ds, h)
        if self.ds.has_time and len(h) > 1:
            gaps = np.diff(h.ts) > self.gap_s * 1000
            brk = np.flatnonzero(gaps)
            if brk.size:
                ix = ix[brk[-1] + 1:]
        ix = ix[ix >= 0][-self.window:]
        return np.unique(ix)

    def score_items(self, histories):
        B = len(histories)
        rows, cols, vals = [], [], []
        for b, h in enumerate(histories):
            s = self._session(h)
            if s.size:
                rows.append(np.full(s.size, b))
                cols.append(s)
                vals.append(np.full(s.size, 1.0 / np.sqrt(s.size)))
        out = np.broadcast_to(self.popf * 1e-6, (B, self.n_items)).copy()
        if not rows:
            return out
        Q = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(B, self.n_items))
        sims = (Q @ self.XnT).tocsr()  # [B, n_train]
        sims = _top_k_rows(sims, self.k)
        # vote with similarity for every item of the neighbour sessions (binary, unnormalised)
        Xb = self.Xn.copy()
        Xb.data[:] = 1.0
        out += (sims @ Xb).toarray()
        return out


class MajorityAction(Popularity):
    """Action head baseline: always the train-set action frequencies; gap = median train gap.
    Items: popularity."""

    name = "majority_action"

    def _fit(self, train):
        acts = np.concatenate([s.actions for s in train.values()]) if train else np.zeros(0, np.uint8)
        cnt = np.bincount(acts, minlength=len(ACTIONS)).astype(np.float64) + 1e-3
        self.probs = cnt / cnt.sum()
        gaps = [np.diff(s.ts) for s in train.values() if len(s) > 1]
        g = np.concatenate(gaps) / 1000.0 if gaps else np.array([60.0])
        self.gap = float(np.median(g)) if g.size else 60.0

    def score_actions(self, histories):
        return np.broadcast_to(self.probs, (len(histories), len(ACTIONS))).copy()

    def predict_gap_s(self, histories):
        return np.full(len(histories), self.gap)


class LastActionMarkov(Markov):
    """Action head baseline: ``P(next action | last action)`` with add-one smoothing; gap = median
    train gap after that last action. Items: first-order Markov."""

    name = "last_action_markov"

    def _fit(self, train):
        super()._fit(train)
        A = len(ACTIONS)
        C = np.ones((A, A))
        gaps: list[list[np.ndarray]] = [[] for _ in range(A)]
        for s in train.values():
            if len(s) > 1:
                np.add.at(C, (s.actions[:-1], s.actions[1:]), 1.0)
                d = np.diff(s.ts) / 1000.0
                for a in range(A):
                    m = s.actions[:-1] == a
                    if m.any():
                        gaps[a].append(d[m])
        self.P = C / C.sum(1, keepdims=True)
        allg = np.concatenate([np.concatenate(g) for g in gaps if g]) if any(gaps) else np.array([60.0])
        med = float(np.median(allg)) if allg.size else 60.0
        self.gap = np.array([float(np.median(np.concatenate(g))) if g else med for g in gaps])
        first = np.bincount(np.concatenate([s.actions for s in train.values()]) if train else
                            np.zeros(0, np.uint8), minlength=A) + 1.0
        self.prior = first / first.sum()

    def score_actions(self, histories):
        return np.stack([self.P[h.actions[-1]] if len(h) else self.prior for h in histories])

    def predict_gap_s(self, histories):
        return np.array([self.gap[h.actions[-1]] if len(h) else float(np.median(self.gap))
                         for h in histories])


BASELINES: dict[str, type] = {c.name: c for c in (Popularity, RecentPopularity, RecentItems, Markov, ItemKNN,
                                                  SessionKNN, MajorityAction, LastActionMarkov)}


def make_baseline(name: str, ds: Dataset, train: dict[str, EventSeq], **opts):
    """Construct and fit a baseline by name (see :data:`BASELINES`)."""
    if name not in BASELINES:
        raise ConfigError("baseline", name, f"unknown; choose from {sorted(BASELINES)}")
    return BASELINES[name](**opts).fit(ds, train)


_ = ACTION_INDEX  # re-exported for callers building action targets
