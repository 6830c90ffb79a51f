"""The category-recency term (``NextActionModel.category_recency``) on every serving path, the
``exclude_seen`` ranking (a discovery feed), and fitting both after training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.config import ModelConfig, TrainConfig
from models.encoding import ItemVocab, collate, encode
from models.errors import ConfigError
from models.model import NextActionModel
from models.schema import EventSeq
from tests.unit.models.paths import assert_every_path_scores_as_the_full_pass

ITEMS = [f"i{k}" for k in range(12)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)
F = VOCAB.first_item
#: each known item's category bucket: four categories, and i11 names none (bucket 0)
BUCKETS = np.array([0] * F + [k % 4 + 1 for k in range(11)] + [0], np.int64)


def _model(weight: float = 2.0, unseen: float = 3.0, window: int = 3, repeat_head: bool = True) -> NextActionModel:
    torch.manual_seed(0)
    m = NextActionModel(ModelConfig(n_items=len(VOCAB), n_hash_buckets=4, d_model=16, max_len=6, dropout=0.0,
                                    item_categories=True, n_category_buckets=8, category_window=window,
                                    category_weight=weight, category_weight_unseen=unseen,
                                    repeat_head=repeat_head)).eval()
    m.set_item_categories(BUCKETS)
    return m


def _hists() -> list[EventSeq]:
    rng = np.random.default_rng(2)
    return [EventSeq.from_columns([ITEMS[i] for i in rng.integers(0, len(ITEMS), n)], rng.integers(0, 5, n),
                                  1_700_000_000_000 + 60_000 * np.arange(n)) for n in (1, 3, 6, 9)]


def _scores(m: NextActionModel, hists: list[EventSeq] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return m.score_last(collate([encode(h, VOCAB, m.cfg) for h in hists or _hists()]))["item_scores"]


@pytest.mark.parametrize("window", [1, 3, 6])
def test_an_item_scores_the_weight_over_one_plus_the_distance_of_the_last_event_in_its_category(window):
    m = _model(window=window)
    got = _scores(m)
    m.cfg = dataclasses.replace(m.cfg, category_weight=0.0)
    expect = _scores(m)
    for b, h in enumerate(_hists()):
        best = {}  # category bucket -> 1 / (1 + distance) of its most recent event in the window
        for d, i in enumerate(VOCAB.indices(h.items[::-1][:window])):
            c = int(BUCKETS[i])
            if c and c not in best:
                best[c] = 1.0 / (1.0 + d)
        for j in range(F, len(VOCAB)):
            expect[b, j] += 2.0 * best.get(int(BUCKETS[j]), 0.0)
    torch.testing.assert_close(got, expect)
    without = _scores(m)
    assert (got[:, F:] != without[:, F:]).any()  # the term is there ...
    assert (got[:, -1] == without[:, -1]).all()  # ... but i11 names no category: never boosted


def test_incremental_steps_and_the_top_k_paths_score_the_term_as_the_full_pass():
    """prefill + step (the KV state's last items, as wide as the category window), the exact and the
    bf16 top-K with exact rescoring all give what one full pass over the history gives."""
    m = _model(window=4)
    assert m.last_window == 4  # wider than the neighbour window (2): the term reads 4 events
    assert_every_path_scores_as_the_full_pass(m, VOCAB, _hists())


@pytest.mark.parametrize("repeat_head", [True, False])
def test_exclude_seen_ranks_only_items_outside_the_window_with_the_unseen_weight(repeat_head):
    m = _model(repeat_head=repeat_head)
    hists = _hists()
    m.cfg = dataclasses.replace(m.cfg, category_weight=3.0)  # what the unseen weight should give
    expect = _scores(m)
    m.cfg = dataclasses.replace(m.cfg, category_weight=2.0)
    m.exclude_seen = True
    got = _scores(m)
    assert_every_path_scores_as_the_full_pass(m, VOCAB, hists)  # the KV cache's step path excludes too
    for b, h in enumerate(hists):
        seen = set(VOCAB.indices(h.items[-m.cfg.max_len:]).tolist())
        for j in range(F, len(VOCAB)):
            if j in seen:
                assert got[b, j] == float("-inf"), (b, j)
            else:
                assert got[b, j] == pytest.approx(float(expect[b, j]), abs=1e-5)
        with torch.no_grad():  # the top-K paths agree, and never return a window item
            last, _ = m.prefill(collate([encode(h, VOCAB, m.cfg)]), heads=False)
            for coarse in (None, torch.bfloat16):
                _, top, _ = m.top_items(last.h, last.rep, last.hist, last.item, 3, coarse=coarse, margin=len(ITEMS))
                assert not seen & set(top[0].tolist())


@pytest.mark.parametrize("repeat_head", [True, False])
def test_a_predictor_with_exclude_seen_never_serves_a_window_item(repeat_head):
    """Through the serving predictor: histories of several lengths (several padded buckets, joined
    for one heads call), then each continued by one event (the KV cache's step path)."""
    from models.serving import TransformerPredictor

    hists = _hists()
    plain = TransformerPredictor(_model(repeat_head=repeat_head), VOCAB, version="v", device="cpu",
                                 num_threads=1).predict(hists, k=4)
    fresh = TransformerPredictor(_model(repeat_head=repeat_head), VOCAB, version="v", device="cpu", num_threads=1,
                                 exclude_seen=True)
    for round_ in range(2):
        if round_:
            hists = [h.appended(ITEMS[3], 1, int(h.ts[-1]) + 60_000) for h in hists]
        got = fresh.predict(hists, k=4, users=[f"u{b}" for b in range(len(hists))])
        for h, p, q in zip(hists, plain, got):
            window = set(h.items[-fresh.cfg.max_len:])
            assert not window & {i for i, _ in q.top_items} and len(q.top_items) == 4
            if not round_:
                assert q.action_probs == pytest.approx(p.action_probs)  # only the item ranking changes
    assert fresh.stats["steps"] > 0  # the second round stepped the cached users
    if repeat_head:  # the plain ranking does serve window items here
        assert any(set(h.items) & {i for i, _ in p.top_items} for h, p in zip(_hists(), plain))


def test_the_weights_are_validated_and_need_item_categories():
    with pytest.raises(ConfigError, match="category_weight"):
        ModelConfig(category_weight=1.0)  # no item categories
    with pytest.raises(ConfigError, match="category_weight_unseen"):
        ModelConfig(item_categories=True, category_weight_unseen=-1.0)
    with pytest.raises(ConfigError, match="category_window"):
        ModelConfig(item_categories=True, category_window=51)
    m = NextActionModel(ModelConfig(n_items=len(VOCAB), n_hash_buckets=4, d_model=8, max_len=6))
    assert not m.uses_category_recency and m.last_window == 2


def _browsing_dataset(category_of):
    """Users browse one of eight categories: each history is six distinct items of it, and an item is
    rarely seen (40 per category), so a barely trained model cannot know which go together; the
    items' categories (``category_of(item index)``) can."""
    from models.datasets.core import dataset_from_columns

    rng = np.random.default_rng(0)
    users, items, ts, cats = [], [], [], []
    for u in range(200):
        g = int(rng.integers(8))
        for t, k in enumerate(rng.choice(40, 6, replace=False)):
            users.append(f"u{u}")
            items.append(f"g{g}i{k}")
            ts.append(t)
            cats.append(category_of(g, int(k)))
    return dataset_from_columns("browse", users, items, ts, categories=cats)


def _train(ds, tmp_path, protocol: str = "allowed"):
    from models.train import train

    path, _ = train(ds, ModelConfig(d_model=8, max_len=8, n_negatives=0, transition_top=0, neighbour_top=0,
                                    item_categories=True, n_category_buckets=64),
                    TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-4,
                                eval_protocol=protocol), tmp_path / "ck")
    return load_checkpoint(path)


def test_training_fits_both_weights_and_saves_what_it_fitted(tmp_path):
    ck = _train(_browsing_dataset(lambda g, k: f"c{g}"), tmp_path)
    for key, field in (("categories", "category_weight"), ("categories_unseen", "category_weight_unseen")):
        fit = ck.metadata[key]
        assert getattr(ck.model_config, field) == fit["weight"] >= 0 and fit["n_cases"] == 200, key
        assert fit["valid_ndcg10_after"] >= fit["valid_ndcg10_before"]
    assert ck.model_config.category_window == ck.metadata["categories"]["window"]


def test_a_history_masked_validation_fits_the_discovery_weight_once(tmp_path):
    """Validated with history masked (``--eval-protocol masked``) the one fit is the discovery feed's:
    both weights are that fit's."""
    ck = _train(_browsing_dataset(lambda g, k: f"c{g}"), tmp_path, protocol="masked")
    cfg = ck.model_config
    assert cfg.category_weight_unseen == cfg.category_weight == ck.metadata["categories"]["weight"]
    assert ck.metadata["categories_unseen"]["same_as"].startswith("categories")


def test_the_fit_finds_the_categories_a_model_does_not_know(tmp_path, monkeypatch):
    """The trained model's rows carry the categories already (a learned row per category), so the term
    adds little there; with those rows zeroed the model no longer knows them, and both fits (history
    allowed and excluded) find a weight that more than doubles validation NDCG@10."""
    from models.datasets import leave_one_out
    from models.train import fit_category_recency, validation_and_training

    ds = _browsing_dataset(lambda g, k: f"c{g}")
    ck = _train(ds, tmp_path)
    with torch.no_grad():
        ck.model.cat_emb.weight.zero_()
    _, valid, _ = validation_and_training(leave_one_out(ds), ck.train_config)
    for unseen in (False, True):
        fit = fit_category_recency(ck, ds, valid, mask_history=unseen, unseen=unseen)
        assert fit["weight"] > 0 and fit["valid_ndcg10_after"] > 2 * fit["valid_ndcg10_before"] + 0.05, fit
        assert ck.model.cfg.category_weight_unseen if unseen else ck.model.cfg.category_weight
        better, worse = map(int, fit["valid_sign_test"].split()[0].split("/"))
        assert better > 3 * worse and "not_significant" not in fit
    # the same gain, held to a significance level nothing meets: the weight is dropped, and said so
    import models.train as mt

    monkeypatch.setattr(mt, "CATEGORY_ALPHA", 0.0)
    fit = fit_category_recency(ck, ds, valid, mask_history=False)
    assert fit["weight"] == 0.0 and ck.model.cfg.category_weight == 0.0
    assert fit["not_significant"]["weight"] > 0 and fit["valid_ndcg10_after"] == fit["valid_ndcg10_before"]


def test_categories_that_say_nothing_beyond_the_item_keep_the_term_off(tmp_path):
    """Each item its own category and no repeats: the term only boosts the history's own items, which
    are never next (and are excluded in the unseen ranking), so weight 0 wins both fits."""
    ck = _train(_browsing_dataset(lambda g, k: f"c{g}-{k}"), tmp_path)
    assert ck.metadata["categories"]["weight"] == 0.0 and ck.metadata["categories_unseen"]["weight"] == 0.0
    assert not ck.model.uses_category_recency
    ck.model.exclude_seen = True
    assert not ck.model.uses_category_recency
