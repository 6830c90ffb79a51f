"""Metric functions against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import metrics as M


def test_ranks_and_ties():
    s = np.array([[0.2, 0.9, 0.2, 0.2, 0.1],
                  [0.5, 0.1, 0.3, 0.9, 0.5]])
    t = np.array([0, 4])
    # row 0: one higher (0.9), two tied (items 2, 3); row 1: one higher (0.9), one tied (item 0)
    assert M.target_ranks(s, t, ties="pessimistic").tolist() == [3, 2]
    assert M.target_ranks(s, t, ties="optimistic").tolist() == [1, 1]
    assert M.target_ranks(s, t, ties="mean").tolist() == [2.0, 1.5]
    pop = np.array([4, 0, 9, 1, 4])
    # row 0: item 2 (pop 9) above target (pop 4), item 3 (pop 1) below -> rank 2
    # row 1: item 0 has the same pop as the target (4): residual tie, pessimistic -> rank 2
    assert M.target_ranks(s, t, tiebreak=pop).tolist() == [2, 2]
    pop2d = np.tile(pop, (2, 1))
    assert M.target_ranks(s, t, tiebreak=pop2d).tolist() == [2, 2]


def test_nan_target_rejected():
    with pytest.raises(ValueError):
        M.target_ranks(np.array([[np.nan, 1.0]]), np.array([0]))


def test_hr_ndcg_mrr_hand_computed():
    r = np.array([0, 1, 4, 9, 10, 30])
    assert M.hit_rate(r, 5) == pytest.approx(3 / 6)
    assert M.hit_rate(r, 10) == pytest.approx(4 / 6)
    nd10 = (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 6
    assert M.ndcg(r, 10) == pytest.approx(nd10)
    assert M.ndcg(r, 1) == pytest.approx(1 / 6)
    mrr = (1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 11 + 1 / 31) / 6
    assert M.mrr(r) == pytest.approx(mrr)
    assert M.mrr(r, 10) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10) / 6)


def test_top_k_matches_sort():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 20, size=(7, 1000)).astype(float)  # many ties
    got = M.top_k(s, 10)
    want = np.argsort(-s, axis=1, kind="stable")[:, :10]
    assert (got == want).all()


def test_auc_mann_whitney_with_ties():
    # pos scores 0.8, 0.5; neg 0.5, 0.2: pairs (0.8>0.5)=1, (0.8>0.2)=1, (0.5=0.5)=.5, (0.5>0.2)=1 -> 3.5/4
    assert M.auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.5, 0.5, 0.2])) == pytest.approx(0.875)
    assert M.auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert math.isnan(M.auc(np.array([0, 0]), np.array([0.1, 0.9])))
    assert M.per_class_auc(np.array([0, 1, 2]), np.eye(3))[2] == 1.0


def test_log_loss_accuracy_f1():
    y = np.array([0, 1, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    assert M.log_loss(y, p) == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.25)) / 3)
    assert M.accuracy(y, p.argmax(1)) == pytest.approx(2 / 3)
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 -> 1; class 2: tp0 fn1 -> 0
    assert M.macro_f1(y, p.argmax(1)) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert M.log_loss(np.array([0]), np.array([[0.0, 1.0]])) == pytest.approx(-math.log(1e-15))


def test_ece_hand_computed():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.95, 0.05], [0.85, 0.15], [0.7, 0.3], [0.4, 0.6]])
    # 10 bins: (0.9,1]: conf .95 right -> |1-.95|=.05, w=1/4; (0.8,.9]: .85 right -> .15;
    # (0.6,.7]: .7 wrong -> .7; (0.5,.6]: .6 right -> .4
    want = (0.05 + 0.15 + 0.7 + 0.4) / 4
    assert M.expected_calibration_error(y, p, n_bins=10) == pytest.approx(want)
    # perfectly calibrated one-hot predictions
    assert M.expected_calibration_error(np.array([0, 1]), np.eye(2)) == 0.0


def test_calibration_error_of_a_calibrated_forecaster_is_small_and_of_a_liar_large():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    hit = rng.uniform(0, 1, conf.size) < conf  # right with exactly the stated probability
    assert M.calibration_error(conf, hit) < 0.01
    assert M.calibration_error(conf, ~hit) > 0.3  # right with 1 - p
    assert M.calibration_error(np.full(10, 0.9), np.zeros(10)) == pytest.approx(0.9)
    # the top-label ECE of class probabilities is the ECE of their top class
    p = rng.dirichlet(np.ones(4), 1000)
    y = rng.integers(0, 4, 1000)
    assert M.expected_calibration_error(y, p) == pytest.approx(M.calibration_error(p.max(1), p.argmax(1) == y))
    with pytest.raises(ValueError, match="probabilities"):
        M.calibration_error(np.array([1.5]), np.array([1]))
    with pytest.raises(ValueError, match="entries"):
        M.calibration_error(np.array([0.5, 0.5]), np.array([1]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=200), st.integers(1, 30))
def test_calibration_error_is_between_0_and_1_and_at_most_the_mean_gap(pairs, n_bins):
    conf = np.array([c for c, _ in pairs])
    hit = np.array([h for _, h in pairs])
    ece = M.calibration_error(conf, hit, n_bins)
    assert 0 <= ece <= 1
    assert ece <= np.mean(np.abs(hit - conf)) + 1e-12  # binning only averages gaps away
    assert M.calibration_error(conf, hit, 1) == pytest.approx(abs(hit.mean() - conf.mean()))  # one bin


def test_coverage_novelty_logmae():
    top = np.array([[0, 1], [1, 3]])
    assert M.catalog_coverage(top, 8) == 3 / 8
    p = np.array([0.5, 0.25, 1.0, 0.125])
    assert M.novelty(top, p) == pytest.approx((1 + 2 + 2 + 3) / 4)
    assert M.log_mae(np.array([1.0, np.e ** 2]), np.array([np.e, np.e])) == pytest.approx(1.0)
    assert M.log_mae(np.array([0.0]), np.array([1.0])) == 0.0  # floored at 1 s
