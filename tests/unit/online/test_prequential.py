"""Prequential HR@10, NDCG@10 and action log loss: hand-computed values, per version, rolling."""

from __future__ import annotations

import math

import orjson
import pytest

from models.predictor import Prediction
from models.schema import EventSeq
from online.prequential import EPS, Prequential, ndcg_at, score
from stream_app.records import StoredPrediction, outcome_record


def test_ndcg_hand_computed():
    assert ndcg_at(1) == 1.0
    assert ndcg_at(2) == pytest.approx(1 / math.log2(3))  # 0.6309...
    assert ndcg_at(3) == 0.5
    assert ndcg_at(7) == pytest.approx(1 / 3)
    assert ndcg_at(10) == pytest.approx(1 / math.log2(11))
    assert ndcg_at(11) == 0.0 and ndcg_at(None) == 0.0
    assert ndcg_at(5, k=4) == 0.0 and ndcg_at(4, k=4) == pytest.approx(1 / math.log2(5))
    with pytest.raises(ValueError):
        ndcg_at(0)


def test_score_hand_computed():
    s = score(4, 0.1)
    assert s.hit == 1.0 and s.ndcg == pytest.approx(1 / math.log2(5)) and s.log_loss == pytest.approx(-math.log(0.1))
    assert score(None, 1.0) == (0.0, 0.0, 0.0)
    assert score(10, 0.5).hit == 1.0 and score(11, 0.5).hit == 0.0
    assert score(1, 0.0).log_loss == pytest.approx(-math.log(EPS))  # floored, finite


def test_rank_convention_matches_outcome_record():
    """``item_rank`` in the outcomes record is 1-based: the top item has rank 1, NDCG 1."""
    top = [("a", 0.5), ("b", 0.3), ("c", 0.2)]
    last = StoredPrediction("v1", 1_000, 0, 1, Prediction([0.2, 0.2, 0.2, 0.2, 0.2], top, 60.0))
    served = EventSeq.from_columns(["x"], ["view"], [1_000])
    ranks = {}
    for item in ("a", "c", "zz"):
        rec = orjson.loads(outcome_record("u", last, served=served, action="view", item_id=item, category="",
                                          event_ts=2_000, partition=0, offset=2))
        ranks[item] = rec["happened"]["item_rank"]
    assert ranks == {"a": 1, "c": 3, "zz": None}
    assert [ndcg_at(ranks[i]) for i in ("a", "c", "zz")] == [1.0, 0.5, 0.0]


def test_per_version_separation_and_overall():
    p = Prequential(window=100)
    for _ in range(4):
        p.update("good", 1, 0.5)
    for _ in range(2):
        p.update("bad", None, 0.25)
    snap = p.snapshot()
    assert snap["good"] == {"hr10": 1.0, "ndcg10": 1.0, "log_loss": pytest.approx(math.log(2)), "n": 4, "seen": 4}
    assert snap["bad"] == {"hr10": 0.0, "ndcg10": 0.0, "log_loss": pytest.approx(math.log(4)), "n": 2, "seen": 2}
    overall = p.overall()
    assert overall["n"] == 6 and overall["hr10"] == pytest.approx(4 / 6)
    assert overall["log_loss"] == pytest.approx((4 * math.log(2) + 2 * math.log(4)) / 6)


def test_window_rolls():
    p = Prequential(window=3)
    for rank in (1, 1, 1, None, None):  # the last 3: hit, miss, miss
        p.update("v", rank, 1.0)
    s = p.snapshot()["v"]
    assert s["n"] == 3 and s["seen"] == 5
    assert s["hr10"] == pytest.approx(1 / 3) and s["ndcg10"] == pytest.approx(1 / 3)
    for _ in range(3):
        p.update("v", 3, 1.0)
    assert p.snapshot()["v"]["ndcg10"] == pytest.approx(0.5) and p.snapshot()["v"]["hr10"] == pytest.approx(1.0)


def test_k_names_the_keys_and_cuts():
    p = Prequential(window=10, k=5)
    p.update("v", 6, 0.5)
    assert p.snapshot()["v"]["hr5"] == 0.0 and "ndcg5" in p.overall()


def test_versions_are_bounded_least_recently_updated_forgotten():
    p = Prequential(window=5, max_versions=3)
    for v in ("v1", "v2", "v3"):
        p.update(v, 1, 0.5)
    p.update("v1", 1, 0.5)  # v1 is now the most recently updated
    p.update("v4", 1, 0.5)
    assert list(p.snapshot()) == ["v3", "v1", "v4"] and p.forgotten == 1 and len(p) == 3
    for n in range(200):
        p.update(f"x{n}", 2, 0.5)
    assert len(p) == 3 and p.overall()["n"] == 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        Prequential(window=0)
    with pytest.raises(ValueError):
        Prequential(max_versions=0)
    with pytest.raises(ValueError):
        Prequential().update("v", 0, 0.5)
