"""The replay buffer: bounded, a uniform reservoir of the past, sample proportions, reproducible."""

from __future__ import annotations

from collections import Counter

import pytest
from scipy import stats

from online.replay import ReplayBuffer


def test_bounds_never_exceeded_under_100k_adds():
    buf = ReplayBuffer(recent=50, reservoir=200, seed=1)
    for x in range(100_000):
        buf.add(x)
        st = buf.stats()
        assert st["recent"] <= 50 and st["reservoir"] <= 200 and len(buf) <= 250
    assert buf.stats() == {"recent": 50, "reservoir": 200, "added": 100_000, "evicted": 99_950, "sampled": 0}
    assert len(buf) == 250
    assert buf.recent_items() == list(range(99_950, 100_000))
    res = buf.reservoir_items()
    assert len(set(res)) == 200 and all(x < 99_950 for x in res)  # disjoint from the recent part


def test_fills_up_before_it_replaces():
    buf = ReplayBuffer(recent=2, reservoir=3, seed=0)
    for x in range(5):
        buf.add(x)
    assert buf.recent_items() == [3, 4] and sorted(buf.reservoir_items()) == [0, 1, 2]


def reservoir_counts(runs: int, n: int, recent: int, reservoir: int) -> Counter:
    counts: Counter = Counter()
    for seed in range(runs):
        counts.update(ReplayBuffer.replay(range(n), recent=recent, reservoir=reservoir, seed=seed).reservoir_items())
    return counts


def test_reservoir_is_uniform_over_everything_that_left_the_recent_part():
    """Chi-square over 2,000 seeded runs: each of the 95 evicted examples is kept 2000*10/95 ~ 210 times.

    "Keep the first 10" (counts 2000 for 0..9, 0 after) or "keep the last 10" (the same for 85..94)
    give a chi-square in the tens of thousands; a uniform sample ~94 (its degrees of freedom)."""
    runs, n, recent, reservoir = 2000, 100, 5, 10
    counts = reservoir_counts(runs, n, recent, reservoir)
    assert set(counts) <= set(range(n - recent))  # only evicted examples
    observed = [counts[x] for x in range(n - recent)]
    assert sum(observed) == runs * reservoir
    chi2, p = stats.chisquare(observed)
    assert p > 1e-3, (chi2, p)
    # and the two ends the wrong algorithms would favour get their fair share
    expected = runs * reservoir / (n - recent)
    first, last = sum(observed[:10]) / 10, sum(observed[-10:]) / 10
    assert abs(first - expected) < 0.15 * expected and abs(last - expected) < 0.15 * expected

    # the same check rejects "keep the first N" and "keep the last N"
    keep_first = [runs if x < reservoir else 0 for x in range(n - recent)]
    keep_last = [runs if x >= n - recent - reservoir else 0 for x in range(n - recent)]
    assert stats.chisquare(keep_first)[1] < 1e-3 and stats.chisquare(keep_last)[1] < 1e-3


def test_recent_zero_samples_everything_added():
    counts = reservoir_counts(runs=1000, n=40, recent=0, reservoir=4)
    observed = [counts[x] for x in range(40)]
    assert stats.chisquare(observed)[1] > 1e-3


def test_sample_proportions():
    buf = ReplayBuffer.replay(range(1000), recent=100, reservoir=100, seed=3)
    recent = set(buf.recent_items())
    for n, frac, want_recent in ((10, 0.5, 5), (10, 0.9, 9), (10, 0.0, 0), (10, 1.0, 10), (20, 0.25, 5), (5, 0.5, 3)):
        s = buf.sample(n, recent_fraction=frac)
        assert len(s) == n and len(set(s)) == n  # without replacement
        assert sum(x in recent for x in s) == want_recent, (n, frac)
    assert buf.sampled == 65


def test_sample_tops_up_from_the_other_part_and_never_returns_more_than_it_holds():
    buf = ReplayBuffer.replay(range(8), recent=5, reservoir=10, seed=0)  # 5 recent, 3 in the reservoir
    s = buf.sample(6, recent_fraction=0.0)
    assert len(s) == 6 and set(range(3)) <= set(s)  # all 3 old ones + 3 recent to make up
    s = buf.sample(100, recent_fraction=0.5)
    assert sorted(s) == list(range(8))
    assert ReplayBuffer(recent=3, reservoir=3, seed=0).sample(4) == []


def test_deterministic_by_seed():
    def run(seed):
        buf = ReplayBuffer.replay(range(5000), recent=20, reservoir=50, seed=seed)
        return buf.reservoir_items(), [buf.sample(16, 0.3) for _ in range(3)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_reservoir_content_does_not_depend_on_sampling():
    a, b = ReplayBuffer(recent=10, reservoir=20, seed=5), ReplayBuffer(recent=10, reservoir=20, seed=5)
    for x in range(2000):
        a.add(x)
        b.add(x)
        if x % 7 == 0:
            b.sample(8, 0.5)
    assert a.reservoir_items() == b.reservoir_items()


def test_generic_over_the_example_type():
    buf: ReplayBuffer[tuple[str, int]] = ReplayBuffer(recent=2, reservoir=2, seed=0)
    for x in [("a", 1), ("b", 2), ("c", 3)]:
        buf.add(x)
    assert set(buf.sample(3, 0.5)) == {("a", 1), ("b", 2), ("c", 3)}


def test_bad_arguments():
    with pytest.raises(ValueError):
        ReplayBuffer(recent=0, reservoir=0, seed=0)
    with pytest.raises(ValueError):
        ReplayBuffer(recent=-1, reservoir=3, seed=0)
    buf = ReplayBuffer(recent=2, reservoir=2, seed=0)
    with pytest.raises(ValueError):
        buf.sample(1, recent_fraction=1.5)
    with pytest.raises(ValueError):
        buf.sample(-1)
