"""The popularity + Markov baseline learns from what it observes, within bounded memory."""

from __future__ import annotations

import math

import pytest

from models.schema import ACTIONS, EventSeq
from online.baseline import PopularityMarkovPredictor


def seq(*events):
    """events: (item, action, ts_ms)"""
    return EventSeq.from_columns([e[0] for e in events], [e[1] for e in events], [e[2] for e in events])


def feed(p, items_actions, t0=1_700_000_000_000, gap_ms=10_000):
    h = EventSeq.empty()
    for n, (item, action) in enumerate(items_actions):
        h = h.appended(item, action, t0 + n * gap_ms)
        p.observe(h)
    return h


def test_learns_item_transition_against_popularity():
    p = PopularityMarkovPredictor()
    feed(p, [("z", "view")] * 50)  # z is by far the most popular item
    for _ in range(20):
        feed(p, [("a", "view"), ("b", "view")])
    top = p.predict([seq(("a", "view", 0))], k=3)[0].top_items
    assert top[0][0] == "b"
    assert [i for i, _ in p.predict([seq(("q", "view", 0))], k=1)[0].top_items] == ["z"]  # unknown: popularity


def test_learns_action_transition_and_probabilities_sum_to_one():
    p = PopularityMarkovPredictor()
    for _ in range(30):
        feed(p, [("a", "cart"), ("a", "purchase")])
    pred = p.predict([seq(("a", "cart", 0)), seq(), seq(("x", "fav", 0))], k=5)
    assert max(range(len(ACTIONS)), key=lambda i: pred[0].action_probs[i]) == ACTIONS.index("purchase")
    for q in pred:
        assert len(q.action_probs) == len(ACTIONS) and math.isclose(sum(q.action_probs), 1.0, abs_tol=1e-9)
        assert all(x > 0 for x in q.action_probs)
        assert len(q.top_items) <= 5 and q.next_gap_s >= 0


def test_next_gap_follows_observed_gaps():
    fast, slow = PopularityMarkovPredictor(), PopularityMarkovPredictor()
    feed(fast, [("a", "view")] * 50, gap_ms=5_000)
    feed(slow, [("a", "view")] * 50, gap_ms=3_600_000)
    one = seq(("a", "view", 0))
    assert fast.predict([one], 1)[0].next_gap_s == pytest.approx(5, rel=0.05)
    assert slow.predict([one], 1)[0].next_gap_s == pytest.approx(3600, rel=0.05)
    # the user's own gaps pull the estimate towards them
    own = seq(("a", "view", 0), ("a", "view", 60_000), ("a", "view", 120_000), ("a", "view", 180_000))
    assert 5 < fast.predict([own], 1)[0].next_gap_s < 60


def test_decay_lets_new_trends_win():
    p = PopularityMarkovPredictor(half_life=100)
    for _ in range(200):
        feed(p, [("a", "view"), ("old", "view")])
    for _ in range(100):
        feed(p, [("a", "view"), ("new", "view")])
    assert p.predict([seq(("a", "view", 0))], 1)[0].top_items[0][0] == "new"


def test_memory_is_bounded():
    p = PopularityMarkovPredictor(max_items=100, max_successors=5, max_sources=20)
    h = EventSeq.empty()
    for n in range(3000):
        h = h.appended(f"i{n % 700}", "view", n * 1000).tail(2)
        p.observe(h)
    for n in range(300):  # one source with many successors
        p.observe(seq(("hub", "view", 0), (f"s{n}", "view", 1000)))
    st = p.stats()
    assert st["items"] <= 100 and st["sources"] <= 20
    assert max(len(s) for s in p._trans.values()) <= 10
    assert len(p.predict([seq(("hub", "view", 0))], k=7)[0].top_items) == 7


def test_rescaling_keeps_rankings():
    p = PopularityMarkovPredictor(half_life=1)  # the increment doubles each observation: forces rescales
    for _ in range(600):
        feed(p, [("a", "view"), ("b", "view")])
    pred = p.predict([seq(("a", "view", 0))], 2)[0]
    assert pred.top_items[0][0] == "b" and all(math.isfinite(s) for _, s in pred.top_items)
    assert math.isclose(sum(pred.action_probs), 1.0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_items"):
        PopularityMarkovPredictor(max_items=0)
    with pytest.raises(ValueError, match="k must be"):
        PopularityMarkovPredictor().predict([seq()], 0)


# --- the prediction contract (docs/contract.md): probabilities, whatever the stream ---------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_stream = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["i0", "i1", "i2", "i3", "i4", "i5", "i6"]),
                             st.sampled_from(ACTIONS), st.integers(0, 10 ** 7)), max_size=120)


@settings(max_examples=200, deadline=None)
@given(events=_stream, half_life=st.sampled_from([1.0, 5.0, 50_000.0]), max_items=st.sampled_from([2, 4, 200_000]),
       max_successors=st.sampled_from([1, 2, 50]), k=st.integers(1, 12))
def test_top_items_are_probabilities_and_action_probs_sum_to_one(events, half_life, max_items, max_successors, k):
    """Any stream (4 users, 7 items, tiny bounds that prune and evict, fast decay that rescales), each
    event predicted before it is learned, as the stream does: each top item's score is a probability,
    best first, the top-k sum to at most 1 and all items the predictor knows (k >= their number) to
    exactly 1; the action probabilities sum to 1."""
    p = PopularityMarkovPredictor(half_life=half_life, max_items=max_items, max_successors=max_successors,
                                  max_sources=3)
    users: dict[int, EventSeq] = {}
    t = 1_700_000_000_000
    for user, item, action, gap in events:
        t += gap
        users[user] = users.get(user, EventSeq.empty()).appended(item, action, t)
        # k=1 reads the cached popularity ranking (built up to 1,000 observations ago), k=64 rebuilds it
        # (7 items < 2k): the same item has the same probability either way
        (top,) = p.predict([users[user]], 1)[0].top_items or [("none", 1.0)]
        assert 0 < top[1] <= 1
        if top[0] != "none":
            assert math.isclose(top[1], dict(p.predict([users[user]], 64)[0].top_items)[top[0]], rel_tol=1e-9)
        p.observe(users[user])
    probes = [EventSeq.empty(), seq(("i0", "view", t)), seq(("unknown", "cart", t)), *users.values()]
    for pred, pred_all in zip(p.predict(probes, k), p.predict(probes, 64)):
        for pr, kk in ((pred, k), (pred_all, 64)):
            scores = [s for _, s in pr.top_items]
            assert len(scores) <= kk and all(0 < s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
            assert sum(scores) <= 1 + 1e-9
            assert math.isclose(sum(pr.action_probs), 1.0, abs_tol=1e-12) and min(pr.action_probs) > 0
        if p.observed:  # every item it knows: the distribution sums to 1
            assert math.isclose(sum(s for _, s in pred_all.top_items), 1.0, abs_tol=1e-9)
