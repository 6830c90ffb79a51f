"""models.predictor: the Predictor contract, checked on every predictor the stream can serve (like river's
estimator checks).

Each check runs on the popularity + Markov baseline, the Transformer in this process, and the
Transformer in an inference process: what the batcher may rely on (models/predictor.py) holds for
all of them, or the batcher would need to know which one it has.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from models.predictor import Prediction, Predictor
from models.schema import ACTIONS, EventSeq

T0 = 1_700_000_000_000
K = 5


def _histories(n: int = 6) -> list[EventSeq]:
    rng = np.random.default_rng(3)
    out = [EventSeq.empty()]
    for u in range(1, n):
        m = int(rng.integers(1, 12))
        out.append(EventSeq.from_columns([f"i{int(x)}" for x in rng.integers(0, 40, m)],
                                         [ACTIONS[int(a)] for a in rng.integers(0, 5, m)],
                                         T0 + np.cumsum(rng.integers(1_000, 600_000, m)),
                                         devices=["ios"] * m, locations=["de"] * m))
    return out


@pytest.fixture(params=["baseline", "transformer", pytest.param("inference-process", marks=pytest.mark.slow)])
def predictor(request, make_checkpoint):
    from stream_app.settings import Settings

    if request.param == "baseline":
        from online.baseline import PopularityMarkovPredictor

        p = PopularityMarkovPredictor()
    elif request.param == "transformer":
        from models.serving import TransformerPredictor

        p = TransformerPredictor.from_checkpoint(make_checkpoint(0), device="cpu", num_threads=1)
    else:  # a child process per test: slow
        from stream_app.remote import RemotePredictor

        p = RemotePredictor.start(Settings(checkpoint=make_checkpoint(0), device="cpu", serve_threads=1))
    yield p
    p.close()


def _well_formed(p: Prediction, k: int) -> None:
    assert isinstance(p, Prediction)
    assert len(p.action_probs) == len(ACTIONS) and all(math.isfinite(x) and x >= 0 for x in p.action_probs)
    assert math.isclose(sum(p.action_probs), 1.0, rel_tol=1e-6)
    assert len(p.top_items) <= k and all(isinstance(i, str) and math.isfinite(s) for i, s in p.top_items)
    assert [s for _, s in p.top_items] == sorted((s for _, s in p.top_items), reverse=True)  # best first
    # the contract (docs/contract.md): each score is the probability that the item is the next one (0.0
    # only where it is below float precision: the delta test's new item takes all but exp(-1000) of the mass)
    assert all(0 <= s <= 1 for _, s in p.top_items) and sum(s for _, s in p.top_items) <= 1 + 1e-5
    assert math.isfinite(p.next_gap_s) and p.next_gap_s >= 0


def test_is_a_predictor_with_a_version(predictor):
    assert isinstance(predictor, Predictor)
    assert isinstance(predictor.version, str) and predictor.version
    assert isinstance(predictor.learns, bool) and isinstance(predictor.runs_elsewhere, bool)
    assert predictor.take_text_rows() == {}  # no item text given: no text rows to count


def test_one_well_formed_prediction_per_history_in_order(predictor):
    hs = _histories()
    out = predictor.predict(hs, K, users=[f"u{i}" for i in range(len(hs))])
    assert len(out) == len(hs)
    for p in out:
        _well_formed(p, K)
    assert predictor.predict([], K) == []
    alone = predictor.predict([hs[3]], K)[0]  # order-independent: the same history alone, same answer
    assert [i for i, _ in alone.top_items] == [i for i, _ in out[3].top_items]
    np.testing.assert_allclose(alone.action_probs, out[3].action_probs, atol=1e-5)


def test_the_probabilities_of_every_item_sum_to_one(predictor):
    """Top items carry probabilities over the whole catalogue: asked for every item it knows, a
    predictor's item probabilities sum to 1, for an empty history, a known and an unknown last item
    (the baseline after it learned 40 items; the Transformer's 40-item checkpoint)."""
    for n in range(40):  # the baseline learns the 40 items the checkpoint knows
        predictor.observe(EventSeq.from_columns([f"i{n}", f"i{(7 * n) % 40}"], ["view", "cart"], [T0 + n, T0 + n + 1]))
    hs = [EventSeq.empty(), EventSeq.from_columns(["i3", "i5"], ["view", "view"], [T0, T0 + 9_000]),
          EventSeq.from_columns(["never-seen"], ["cart"], [T0])]
    for p in predictor.predict(hs, 40, users=["a", "b", "c"]):
        _well_formed(p, 40)
        assert all(s > 0 for _, s in p.top_items)
        assert len(p.top_items) == 40 and len({i for i, _ in p.top_items}) == 40
        assert math.isclose(sum(s for _, s in p.top_items), 1.0, abs_tol=1e-5)


def test_predict_async_gives_what_predict_gives_and_suspends_only_if_it_runs_elsewhere(predictor):
    hs = _histories()
    sync = predictor.predict(hs, K)
    coro = predictor.predict_async(hs, K)
    if predictor.runs_elsewhere:
        got = asyncio.run(coro)
    else:  # what the batcher's inference thread relies on: the coroutine completes on its first step
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        got = done.value.value
    assert [[i for i, _ in p.top_items] for p in got] == [[i for i, _ in p.top_items] for p in sync]


def test_observe_is_safe_and_learning_shows_only_if_it_learns(predictor):
    probe = EventSeq.from_columns(["i1"], ["view"], [T0])
    before = predictor.predict([probe], K)[0]
    for n in range(30):  # i1 -> i39 over and over
        predictor.observe(EventSeq.from_columns(["i1", "i39"], ["view", "cart"], [T0 + n, T0 + n + 1]))
    after = predictor.predict([probe], K)[0]
    if predictor.learns:
        assert after.top_items[0][0] == "i39"
    else:
        assert after.top_items == before.top_items


def test_successor_is_none_or_serves_the_new_checkpoint(predictor, make_checkpoint):
    from models.checkpoint import read_manifest

    path = make_checkpoint(1)
    new = predictor.successor(path, read_manifest(path)["content_hash"])
    if new is None:  # it serves no checkpoint: the caller builds one
        return
    try:
        assert isinstance(new, Predictor) and new.version == read_manifest(path)["content_hash"][:12]
        assert new.version != predictor.version and type(new) is type(predictor)
        new.warm_up()
        for p in new.predict(_histories(), K):
            _well_formed(p, K)
    finally:
        new.close()


def test_a_delta_for_its_version_applies_in_place_or_is_refused_without_change(predictor):
    """A delta built for the predictor's version (a changed row, a new item, the action bias) either
    applies (the version becomes its label, predictions stay well formed, the new item is ranked)
    or, for a predictor without such a model (the baseline), returns False and changes nothing."""
    from models.delta import ModelDelta, label_parts

    version = str(predictor.version)
    first, n, d = 6, 46, 32  # the make_checkpoint(0) model: 4 hash buckets, 40 items, d_model 32
    delta = ModelDelta(version, label_parts(version)[1] + 1, label_parts(version)[1], [first + 1, n], ["i1", "new-1"],
                       np.full((2, d), 0.01, np.float32), [0.0, 1_000.0], [0, 0], action_bias=np.zeros(5))
    hs = _histories()
    applied = predictor.apply_delta(delta)
    assert isinstance(applied, bool)
    if not applied:
        assert predictor.version == version
        return
    assert predictor.version == delta.label != version
    for p in predictor.predict(hs, K):
        _well_formed(p, K)
        assert p.top_items[0][0] == "new-1"  # the new item ranks at once
    assert predictor.apply_delta(delta) is False and predictor.version == delta.label  # applied once only


def test_warm_up_and_close_are_safe(predictor):
    predictor.warm_up()
    predictor.close()
    predictor.close()  # twice: the worker's shutdown may call it after a failed start
