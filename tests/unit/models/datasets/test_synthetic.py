"""models.datasets.synthetic: the seeded session generator, its funnel and catalogue, and its options by name."""

from __future__ import annotations

import numpy as np
import pytest

from models.datasets import load, synthetic
from models.schema import ACTION_INDEX
from models.errors import DatasetError


def test_synthetic_is_seeded_and_structured():
    a, b, c = synthetic(n_users=20, seed=3), synthetic(n_users=20, seed=3), synthetic(n_users=20, seed=4)
    assert all(a.sequences[u] == b.sequences[u] for u in a.sequences)
    assert any(a.sequences[u] != c.sequences[u] for u in a.sequences)
    s = a.sequences["u00"]
    assert np.all(np.diff(s.ts) > 0) and a.has_actions
    # the funnel: every purchase comes right after a cart of the same item
    purchases = [(s.actions[i - 1], s.items[i - 1], s.items[i]) for s in a.sequences.values()
                 for i in range(1, len(s)) if s.actions[i] == ACTION_INDEX["purchase"]]
    assert purchases and all(act == ACTION_INDEX["cart"] and prev == item for act, prev, item in purchases)
    assert s.actions[0] == ACTION_INDEX["view"]


def test_synthetic_seeds_share_the_catalogue_of_n_items():
    """Two seeds over the same n_items: the same items, each in the same category (the demo trains
    on one seed and streams another)."""
    a, c = synthetic(n_users=30, n_items=80, seed=1), synthetic(n_users=30, n_items=80, seed=2)
    assert a.items == c.items == [f"i{k}" for k in range(80)]

    def category_of(ds):
        return {i: cat for s in ds.sequences.values() for i, cat in zip(s.items, s.categories)}

    ca, cc = category_of(a), category_of(c)
    shared = set(ca) & set(cc)
    assert len(shared) > 10 and all(ca[i] == cc[i] for i in shared)


def test_synthetic_lengths_and_options_in_the_name():
    ds = load("synthetic", n_users=40, n_items=20, min_len=6, max_len=12)
    lens = [len(s) for s in ds.sequences.values()]
    assert len(lens) == 40 and min(lens) >= 6 and max(lens) <= 12 and len(ds.items) == 20
    named = load("synthetic:n_users=40, n_items=20,seed=5")
    assert named.meta["seed"] == 5 and all(
        named.sequences[u] == s for u, s in synthetic(n_users=40, n_items=20, seed=5).sequences.items())
    with pytest.raises(DatasetError, match="is not KEY=INTEGER"):
        load("synthetic:n_items=many")
    with pytest.raises(DatasetError, match="unknown options"):
        load("synthetic:colour=3")
