"""models.auto: the training choices made from the log, and the copy strength fitted after training."""

from __future__ import annotations

import numpy as np
import pytest

from models.auto import (FULL_SOFTMAX_ITEMS, MAX_BATCH, MAX_WINDOW, MIN_BATCH, MIN_WINDOW, LogProfile,
                         auto_configs, choose)
from models.checkpoint import load_checkpoint
from models.config import ModelConfig, TrainConfig
from models.datasets.core import dataset_from_columns
from models.schema import EventSeq


def _profile(**kw) -> LogProfile:
    base = dict(n_sequences=50_000, n_events=1_000_000, n_items=20_000, p90_length=30, events_per_item=150.0,
                repeat_share=0.0, category_share=0.0, n_categories=0, action_shares=(1.0, 0.0, 0.0, 0.0, 0.0))
    return LogProfile(**{**base, **kw})


def test_each_choice_follows_the_log_not_fixed_values():
    big, _, _ = choose(_profile())
    assert big["n_negatives"] > 0 and big["max_len"] == MIN_WINDOW and big["dropout"] == 0.2
    small, _, _ = choose(_profile(n_items=FULL_SOFTMAX_ITEMS))
    assert small["n_negatives"] == 0
    long, _, _ = choose(_profile(p90_length=10_000))
    assert long["max_len"] == MAX_WINDOW
    mid, _, _ = choose(_profile(p90_length=121))
    assert mid["max_len"] == 130
    assert choose(_profile(events_per_item=100.0))[0]["dropout"] == 0.2  # dense from 100 events per item
    assert choose(_profile(events_per_item=2.0))[0]["dropout"] == 0.5
    assert choose(_profile(events_per_item=99.0))[0]["dropout"] == 0.5
    rich, _, _ = choose(_profile(category_share=0.9, action_shares=(0.9, 0.0, 0.05, 0.03, 0.02)))
    assert rich["item_categories"] and rich["action_prior"] and rich["action_loss_weight"] == 1.0
    plain, _, _ = choose(_profile(category_share=0.1, action_shares=(0.995, 0.0, 0.005, 0.0, 0.0)))
    assert not plain["item_categories"] and not plain["action_prior"]
    assert "n_category_buckets" not in plain  # no category rows: nothing to size


def test_category_buckets_grow_with_the_categories_named():
    def buckets(n: int) -> int:
        return choose(_profile(category_share=0.9, n_categories=n))[0]["n_category_buckets"]

    assert buckets(10) == 1024  # the floor
    assert buckets(2914) == 32768  # >= 8 per category, a power of two (2914 * 8 = 23,312)
    assert buckets(4096) == 32768 and buckets(4097) == 65536
    assert buckets(10**6) == 65536  # the cap
    _, _, why = choose(_profile(category_share=0.9, n_categories=2914), given_model={"n_category_buckets": 64})
    assert "category buckets 64: set explicitly" in why


def test_few_windows_mean_overlapping_windows_and_smaller_batches():
    _, many, _ = choose(_profile())  # 50,000 histories: plenty of windows
    assert many["window_stride"] == 50 and many["batch_size"] == MAX_BATCH and many["lr"] == pytest.approx(5e-3)
    _, few, why = choose(_profile(n_sequences=300, n_events=30_000))
    assert few["window_stride"] == 12 and MIN_BATCH <= few["batch_size"] < MAX_BATCH
    assert few["lr"] == pytest.approx(5e-3 * np.sqrt(few["batch_size"] / MAX_BATCH), rel=1e-3)
    assert any(line.startswith("window stride 12: only") for line in why)


def test_explicit_settings_are_kept_and_said_so():
    m, t, why = choose(_profile(), given_model={"dropout": 0.1, "n_negatives": 0},
                       given_train={"eval_protocol": "masked", "batch_size": 16})
    assert (m["dropout"], m["n_negatives"], t["eval_protocol"], t["batch_size"]) == (0.1, 0, "masked", 16)
    assert "dropout 0.1: set explicitly" in why and "batch 16: set explicitly" in why
    assert t["lr"] == pytest.approx(5e-3 * np.sqrt(16 / MAX_BATCH), rel=1e-3)  # follows the given batch
    assert choose(_profile())[1]["eval_protocol"] == "allowed"


def _log(name: str, n_users: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    users, items, ts, acts, cats = [], [], [], [], []
    for u in range(n_users):
        n = int(rng.integers(5, 60))
        users += [f"u{u}"] * n
        items += [f"i{int(k)}" for k in rng.integers(0, 400, n)]
        ts += list(range(n))
        acts += [int(a) for a in rng.choice([0, 2, 3], n, p=[0.8, 0.15, 0.05])]
        cats += [f"c{int(k)}" for k in rng.integers(0, 9, n)]
    return dataset_from_columns(name, users, items, ts, acts, categories=cats, has_actions=True)


def test_auto_configs_depend_on_the_data_never_on_its_name():
    from models.datasets import leave_one_out

    outs = []
    for name in ("beauty", "taobao", "mine"):
        ds = _log(name)
        mcfg, tcfg, profile, why = auto_configs(ds, leave_one_out(ds), base_train={"budget_min": 1.0})
        outs.append((mcfg.to_dict(), tcfg.to_dict(), why))
        assert isinstance(mcfg, ModelConfig) and isinstance(tcfg, TrainConfig) and tcfg.budget_min == 1.0
        assert mcfg.item_categories and mcfg.action_prior and profile.n_sequences == 120
    assert outs[0] == outs[1] == outs[2]


def _repeat_dataset():
    """Users cycle through a few favourite items: the next item is (almost) always a recent one."""
    rng = np.random.default_rng(1)
    users, items, ts = [], [], []
    for u in range(150):
        favs = rng.choice(300, 3, replace=False)
        n = int(rng.integers(8, 16))
        users += [f"u{u}"] * n
        items += [f"i{int(favs[k % 3])}" for k in range(n)]
        ts += list(range(n))
    return dataset_from_columns("repeats", users, items, ts)


def _barely_trained(tmp_path, ds, **cfg):
    from models.train import train

    path, _ = train(ds, ModelConfig(d_model=8, max_len=8, n_negatives=0, transition_top=0, neighbour_top=0, **cfg),
                    TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-5,
                                calibrate_items=False), tmp_path / "ck")
    return load_checkpoint(path)


def test_copy_strength_is_fitted_on_validation_and_served_by_the_saved_weights(tmp_path):
    """A barely trained model ranks users' own items poorly; the copy fit boosts them, and the saved
    checkpoint (no new code path: its repeat-recency rows) scores validation as the fit measured."""
    from models.datasets import leave_one_out
    from models.scorer import TransformerScorer
    from models.train import evaluate_cases, validation_and_training

    ds = _repeat_dataset()
    ck = _barely_trained(tmp_path, ds)
    fit = ck.metadata["copy"]
    assert fit["weight"] > 0 and fit["valid_ndcg10_after"] > fit["valid_ndcg10_before"] + 0.2, fit
    _, valid, _ = validation_and_training(leave_one_out(ds), ck.train_config)
    served = evaluate_cases(TransformerScorer(ck.model, ck.vocab, ds.items, device="cpu"), ds, valid, False)
    assert served["NDCG@10"] == pytest.approx(fit["valid_ndcg10_after"], abs=2e-3)
    assert ck.metadata["test"]["NDCG@10"] > 0.5


def test_copy_strength_stays_off_when_history_items_are_masked(tmp_path):
    ck = _barely_trained(tmp_path, _repeat_dataset())
    from models.train import fit_copy, validation_and_training
    from models.datasets import leave_one_out

    ds = _repeat_dataset()
    _, valid, _ = validation_and_training(leave_one_out(ds), ck.train_config)
    rows = ck.model.rep_recency.weight.detach().clone()
    res = fit_copy(ck, ds, valid, mask_history=True)
    assert res["weight"] == 0.0 and set(res["tried"].values()) == {res["valid_ndcg10_before"]}
    assert ck.model.rep_recency.weight.equal(rows)


def test_profile_counts_repeats_within_the_lookback():
    s = EventSeq.from_columns(["a", "b", "a", "c", "a"], [0] * 5, range(5))
    p = LogProfile.measure({"u": s}, n_items=3, lookback=2)
    assert p.repeat_share == 0.5 and p.p90_length == 5  # b->a (2 back) and c->a (2 back); a->b, a->c new
