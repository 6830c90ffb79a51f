"""A small seeded generator with structure a sequence model can learn (tests and demos).

Each user walks a fixed item "chain": after item ``i`` the next item is ``succ[i]`` with
probability ``p_follow`` (else a popular item), the previous item is repeated with probability
``p_repeat``, and actions follow a funnel: ``view`` mostly, ``cart`` after an item was viewed
twice, ``purchase`` right after a ``cart``. Gaps are log-normal with a mean that depends on the
action. Devices and locations are fixed per user.

>>> from models.datasets.synthetic import synthetic
>>> a, b = synthetic(n_users=5, seed=1), synthetic(n_users=5, seed=1)
>>> a.sequences["u0"] == b.sequences["u0"], a.has_time, a.has_actions
(True, True, True)
"""

from __future__ import annotations

import numpy as np

from models.datasets.core import Dataset
from models.schema import ACTION_INDEX, EventSeq

_GAP_S = {"view": 40.0, "click": 20.0, "cart": 90.0, "fav": 60.0, "purchase": 3600.0}


def synthetic(n_users: int = 200, n_items: int = 60, min_len: int = 8, max_len: int = 40,
              p_follow: float = 0.8, p_repeat: float = 0.05, seed: int = 0,
              start_ms: int = 1_700_000_000_000) -> Dataset:
    rng = np.random.default_rng(seed)
    succ = rng.permutation(n_items)
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.1
    pop /= pop.sum()
    devices = ["ios", "android", "web"]
    locs = ["de", "fr", "us", "jp"]
    seqs: dict[str, EventSeq] = {}
    for u in range(n_users):
        n = int(rng.integers(min_len, max_len + 1))
        dev, loc = devices[u % 3], locs[int(rng.integers(len(locs)))]
        cur = int(rng.choice(n_items, p=pop))
        t = start_ms + int(rng.integers(0, 86_400_000))
        seen: dict[int, int] = {}
        items, acts, ts = [], [], []
        prev_action = "view"
        for _ in range(n):
            seen[cur] = seen.get(cur, 0) + 1
            if prev_action == "cart":
                action = "purchase"
            elif seen[cur] >= 2:
                action = "cart"
            elif rng.random() < 0.1:
                action = "fav"
            else:
                action = "view"
            items.append(f"i{cur}")
            acts.append(ACTION_INDEX[action])
            ts.append(t)
            t += int(1000 * rng.lognormal(np.log(_GAP_S[action]), 0.5))
            prev_action = action
            r = rng.random()
            if action == "purchase" or r >= p_follow + p_repeat:
                cur = int(rng.choice(n_items, p=pop))
            elif r < p_follow:
                cur = int(succ[cur])
            # else repeat the same item
        k = len(items)
        seqs[f"u{u}"] = EventSeq(items, np.asarray(acts, np.uint8), np.asarray(ts, np.int64),
                                 [dev] * k, [loc] * k, [f"c{int(i[1:]) % 7}" for i in items])
    item_ids = [f"i{i}" for i in range(n_items)]
    return Dataset("synthetic", seqs, item_ids, True, True,
                   {"seed": seed, "n_users": n_users, "n_items": n_items, "succ": succ.tolist()})
