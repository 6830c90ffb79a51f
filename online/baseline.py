"""A real predictor that learns from the stream: decayed popularity + first-order Markov chains.

:class:`PopularityMarkovPredictor` is what the stream serves until a Transformer checkpoint is
loaded (and what it falls back to when a checkpoint is missing or bad). It learns online from
every history the batcher shows it through :meth:`~PopularityMarkovPredictor.observe`:

* item popularity, exponentially decayed in *events* (half-life ``half_life`` observations);
* item → next-item transitions (the Markov successors of the last item), capped at
  ``max_successors`` per item and ``max_sources`` source items (least recently updated evicted);
* action → next-action transitions (a 5×5 decayed count matrix with a uniform prior);
* gap statistics: an exponentially weighted mean of ``log1p(gap seconds)`` per previous action,
  blended with the user's own recent gaps taken from the history itself.

Top-K items blend the Markov successors of the user's last item with global popularity, weighted
by how much evidence the successor list has: ``P(i) = c * P_markov(i | last) + (1 - c) * P_pop(i)``,
a distribution over every item it knows, so each top item's score is its probability of being the
user's next item (docs/contract.md) and the scores of all items sum to 1. Decay is implemented by growing the increment
(``inc *= 2 ** (1 / half_life)``) instead of shrinking every stored weight, so an update is O(1);
weights are rescaled when the increment gets large. Memory is bounded by ``max_items`` popular
items, ``max_sources × max_successors`` transitions and a fixed action matrix.

Not thread-safe by design: the batcher calls ``predict`` and ``observe`` from one inference thread.

>>> from models.schema import EventSeq
>>> p = PopularityMarkovPredictor()
>>> for _ in range(5):
...     p.observe(EventSeq.from_columns(["a", "b"], ["view", "cart"], [0, 30_000]))
>>> pred = p.predict([EventSeq.from_columns(["a"], ["view"], [0])], k=2)[0]
>>> pred.top_items[0][0], round(sum(pred.action_probs), 6), max(pred.action_dict(), key=pred.action_dict().get)
('b', 1.0, 'cart')
>>> round(pred.next_gap_s)  # the a -> b gap it saw was 30 s
30
>>> p.observe(EventSeq.from_columns(["c"], ["view"], [0]))  # c is seen once, b five times
>>> top = p.predict([EventSeq.from_columns(["a"], ["view"], [0])], k=5)[0].top_items  # probabilities
>>> [(i, round(s, 3)) for i, s in top], round(sum(s for _, s in top), 9)  # 5/7 + 2/7 * 5/6, 2/7 * 1/6
([('b', 0.952), ('c', 0.048)], 1.0)
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from operator import itemgetter
from typing import Mapping, Sequence

import numpy as np

from models.predictor import Prediction, Predictor
from models.schema import ACTIONS, EventSeq

_N_ACTIONS = len(ACTIONS)
_RESCALE_AT = 1e150
_DEFAULT_LOG_GAP = math.log1p(60.0)  # before any gap was seen: a minute


class PopularityMarkovPredictor(Predictor):
    """Popularity + first-order item/action Markov chains + gap statistics, learned online.

    Arguments:
        half_life: observations after which an old count weighs half as much.
        max_items: popularity entries kept (the least popular half is pruned beyond this).
        max_successors: successors kept per source item (the weakest dropped beyond twice this).
        max_sources: source items with a successor list (least recently updated evicted).
        markov_prior: pseudo-count; a successor list with this much (decayed) evidence gets
            half of the ranking weight, popularity the other half.
        gap_alpha: smoothing of the per-action gap statistics (lower bound of the EW weight).
        user_gaps: the user's own last gaps used for ``next_gap_s``.
    """

    version = "baseline-markov-1"
    learns = True

    def __init__(self, *, half_life: float = 50_000, max_items: int = 200_000, max_successors: int = 50,
                 max_sources: int = 100_000, markov_prior: float = 2.0, gap_alpha: float = 0.01,
                 user_gaps: int = 20) -> None:
        for name, v in (("half_life", half_life), ("max_items", max_items), ("max_successors", max_successors),
                        ("max_sources", max_sources), ("markov_prior", markov_prior), ("user_gaps", user_gaps)):
            if not v > 0:
                raise ValueError(f"PopularityMarkovPredictor: {name} must be > 0 (got {v!r})")
        if not 0 < gap_alpha <= 1:
            raise ValueError(f"PopularityMarkovPredictor: gap_alpha must be in (0, 1] (got {gap_alpha!r})")
        self.half_life, self.max_items, self.max_successors = half_life, max_items, max_successors
        self.max_sources, self.markov_prior, self.gap_alpha, self.user_gaps = (max_sources, markov_prior,
                                                                               gap_alpha, user_gaps)
        self._growth = 2.0 ** (1.0 / half_life)
        self._inc = 1.0  # weight of the next observation; stored weights are in these units
        self._pop: dict[str, float] = {}
        self._pop_sum = 0.0
        self._trans: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._trans_sum: dict[str, float] = {}
        self._act = np.zeros((_N_ACTIONS, _N_ACTIONS))
        self._act_prior = 1.0  # uniform pseudo-count per cell, in decayed units
        self._gap_mu = np.full(_N_ACTIONS, _DEFAULT_LOG_GAP)
        self._gap_n = np.zeros(_N_ACTIONS, np.int64)
        self._top_cache: list[tuple[str, float]] | None = None
        self._top_cache_n = 0
        self._since_refresh = 0
        self.observed = 0

    # --- learning ---------------------------------------------------------------------------------
    def observe(self, history: EventSeq) -> None:
        """Learn from a history whose last event is new."""
        n = len(history)
        if n == 0:
            return
        self.observed += 1
        self._inc *= self._growth
        inc = self._inc
        item, action = history.items[-1], int(history.actions[-1])
        self._pop[item] = self._pop.get(item, 0.0) + inc
        self._pop_sum += inc
        self._since_refresh += 1
        if n >= 2:
            prev_item, prev_action = history.items[-2], int(history.actions[-2])
            succ = self._trans.get(prev_item)
            if succ is None:
                succ = self._trans[prev_item] = {}
                self._trans_sum[prev_item] = 0.0
                if len(self._trans) > self.max_sources:
                    old, _ = self._trans.popitem(last=False)
                    del self._trans_sum[old]
            else:
                self._trans.move_to_end(prev_item)
            succ[item] = succ.get(item, 0.0) + inc
            self._trans_sum[prev_item] += inc
            if len(succ) > 2 * self.max_successors:
                keep = heapq.nlargest(self.max_successors, succ.items(), key=itemgetter(1))
                succ.clear()
                succ.update(keep)
                self._trans_sum[prev_item] = sum(w for _, w in keep)
            self._act[prev_action, action] += inc
            gap_s = max(0.0, (int(history.ts[-1]) - int(history.ts[-2])) / 1000.0)
            self._gap_n[prev_action] += 1
            alpha = max(self.gap_alpha, 1.0 / self._gap_n[prev_action])
            self._gap_mu[prev_action] += alpha * (math.log1p(gap_s) - self._gap_mu[prev_action])
        if len(self._pop) > self.max_items:
            self._prune_items()
        if self._inc > _RESCALE_AT:
            self._rescale()

    def _prune_items(self) -> None:
        keep = heapq.nlargest(self.max_items // 2, self._pop.items(), key=itemgetter(1))
        self._pop = dict(keep)
        self._pop_sum = sum(w for _, w in keep)
        self._top_cache = None

    def _rescale(self) -> None:
        s = 1.0 / self._inc
        self._pop = {k: w * s for k, w in self._pop.items()}
        self._pop_sum *= s
        for src, succ in self._trans.items():
            for k in succ:
                succ[k] *= s
            self._trans_sum[src] *= s
        self._act *= s
        self._inc = 1.0
        self._top_cache = None

    # --- inference --------------------------------------------------------------------------------
    def _popular(self, n: int) -> list[tuple[str, float]]:
        """About the ``n`` most popular items as (item, share of all decayed popularity *now*): the
        ranking is refreshed every 1,000 observations, the shares are always current (so that they
        stay probabilities: shares from an older total would not sum with the current ones)."""
        stale = self._since_refresh >= 1000 or (self._since_refresh and len(self._top_cache or ()) < n)
        if self._top_cache is None or self._top_cache_n < n or stale:
            self._top_cache_n = max(n, 256)
            self._top_cache = heapq.nlargest(self._top_cache_n, self._pop.items(), key=itemgetter(1))
            self._since_refresh = 0
        total = self._pop_sum or 1.0
        pop = self._pop
        return [(k, pop[k] / total) for k, _ in self._top_cache[:n]]

    def predict(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None = None,
                texts: Mapping[str, str] | None = None) -> list[Prediction]:
        """One prediction per history (the triggering event is each history's last; ``users`` and
        ``texts`` unused)."""
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k!r})")
        popular = self._popular(2 * k)
        return [self._predict_one(h, k, popular) for h in histories]

    def _action_probs(self, last_action: int | None) -> list[float]:
        prior_scaled = self._act_prior * self._inc  # the prior in stored units
        row = self._act.sum(axis=0) if last_action is None else self._act[last_action]
        p = (row + prior_scaled) / (row.sum() + prior_scaled * _N_ACTIONS)
        p = p / p.sum()
        return [float(x) for x in p]

    def _next_gap(self, history: EventSeq, last_action: int | None) -> float:
        if last_action is not None and self._gap_n[last_action] > 0:
            mu = float(self._gap_mu[last_action])
        elif self._gap_n.sum() > 0:
            mu = float(np.average(self._gap_mu, weights=self._gap_n))
        else:
            mu = _DEFAULT_LOG_GAP
        ts = history.ts[-(self.user_gaps + 1):]
        if len(ts) >= 2:
            own = np.log1p(np.maximum(np.diff(ts), 0) / 1000.0)
            w = len(own) / (len(own) + 3.0)
            mu = w * float(own.mean()) + (1.0 - w) * mu
        return float(math.expm1(mu))

    def _predict_one(self, history: EventSeq, k: int, popular: list[tuple[str, float]]) -> Prediction:
        if len(history) == 0:
            return Prediction(self._action_probs(None), heapq.nlargest(k, popular, key=itemgetter(1)),
                              self._next_gap(history, None), "no history: global popularity")
        last_item, last_action = history.items[-1], int(history.actions[-1])
        succ = self._trans.get(last_item)
        scores: dict[str, float] = {}
        explanation = f"after {ACTIONS[last_action]} of {last_item!r}: "
        if succ:
            total = self._trans_sum[last_item]
            evidence = total / self._inc
            conf = evidence / (evidence + self.markov_prior)
            for item, w in succ.items():
                scores[item] = conf * w / total
            explanation += f"{len(succ)} learned successors (weight {conf:.2f}) + popularity"
        else:
            conf = 0.0
            explanation += "no learned successors, popularity"
        pop_w = 1.0 - conf
        pop_total = self._pop_sum or 1.0
        for item in scores:
            scores[item] += pop_w * self._pop.get(item, 0.0) / pop_total
        for item, share in popular:
            if item not in scores:
                scores[item] = pop_w * share
        top = heapq.nlargest(k, scores.items(), key=itemgetter(1))
        # a probability: the blend of two shares can round to just above 1 (1.0000000000000002)
        return Prediction(self._action_probs(last_action), [(i, min(float(s), 1.0)) for i, s in top],
                          self._next_gap(history, last_action), explanation)

    def stats(self) -> dict[str, int]:
        """Sizes of the learned tables (for logs and memory checks)."""
        return {"observed": self.observed, "items": len(self._pop), "sources": len(self._trans),
                "transitions": sum(len(s) for s in self._trans.values())}
