"""models.transitions: the item-to-item table, how the model scores it, and fitting it after training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig, TrainConfig
from models.encoding import ItemVocab, collate, encode
from models.model import NextActionModel
from models.schema import EventSeq
from models.transitions import count_transitions
from models.errors import CheckpointError, ConfigError

ITEMS = [f"i{k}" for k in range(12)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)
F = VOCAB.first_item


def test_counts_keep_the_top_successors_and_skip_special_rows():
    seqs = [np.array([F, F + 1, F + 2, F + 1]), np.array([F, F + 2, F + 2]), np.array([F, F + 1, 0, F + 3]),
            np.array([2, F + 4])]  # 0 = padding, 2 = a hash bucket: never sources nor successors
    t = count_transitions(seqs, len(VOCAB), top=1, first_item=F)
    assert t.successors(F) == ([F + 1], [2.0])  # F -> F+1 twice beats F -> F+2 once
    assert t.successors(F + 2) == ([F + 1], [1.0])  # tie F+1 / F+2: the smaller index
    assert t.successors(F + 1)[0] == [F + 2] and t.successors(2) == ([], []) and t.successors(0) == ([], [])
    t2 = count_transitions(seqs, len(VOCAB), top=5, first_item=F)
    assert t2.successors(F) == ([F + 1, F + 2], [2.0, 1.0]) and t2.nnz == 5
    np.testing.assert_allclose(t2.with_feature("log").val, np.log1p(t2.val))
    p = t2.with_feature("prob")
    assert p.successors(F)[1] == pytest.approx([2 / 3, 1 / 3])
    assert count_transitions([], len(VOCAB), top=3).nnz == 0
    with pytest.raises(ConfigError, match="transition_top"):
        count_transitions(seqs, len(VOCAB), top=0)
    with pytest.raises(ConfigError, match="transition_feature"):
        t.with_feature("sqrt")


def _model(weight: float = 2.0) -> tuple[NextActionModel, object]:
    torch.manual_seed(0)
    m = NextActionModel(ModelConfig(n_items=len(VOCAB), n_hash_buckets=4, d_model=16, max_len=6, dropout=0.0,
                                    transition_weight=weight)).eval()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(F, len(VOCAB), 9) for _ in range(30)]
    table = count_transitions(seqs, len(VOCAB), top=4, first_item=F).with_feature("log")
    return m, table


def _hists():
    rng = np.random.default_rng(2)
    return [EventSeq.from_columns([ITEMS[i] for i in rng.integers(0, len(ITEMS), n)], rng.integers(0, 5, n),
                                  1_700_000_000_000 + 60_000 * np.arange(n)) for n in (1, 3, 6, 9)]


def _scores(m):
    with torch.no_grad():
        return m.score_last(collate([encode(h, VOCAB, m.cfg) for h in _hists()]))["item_scores"]


def test_the_model_adds_weight_times_the_last_items_row():
    m, table = _model(weight=2.0)
    base = _scores(m)  # no table installed yet
    m.set_transitions(table)
    with_table = _scores(m)
    expect = base.clone()
    for b, h in enumerate(_hists()):
        succ, vals = table.successors(int(VOCAB.indices(h.items[-1:])[0]))
        expect[b, succ] += 2.0 * torch.tensor(vals)
    torch.testing.assert_close(with_table, expect)
    assert (with_table != base).any()
    m.cfg = dataclasses.replace(m.cfg, transition_weight=0.0)  # weight 0: the table is off
    torch.testing.assert_close(_scores(m), base)


def test_checkpoint_round_trip_and_a_table_that_does_not_fit(tmp_path, rewrite_weights):
    m, table = _model()
    m.set_transitions(table)
    path = save_checkpoint(tmp_path / "ck", m, VOCAB)
    ck = load_checkpoint(path)
    assert ck.model.uses_transitions and ck.model.trans_idx.dtype == torch.int32
    torch.testing.assert_close(_scores(ck.model), _scores(m))

    rewrite_weights(path, lambda s: s.update(trans_ptr=s["trans_ptr"][:-1]))
    with pytest.raises(CheckpointError, match="transition table does not fit n_items"):
        load_checkpoint(path)
    older = ("trans_ptr", "trans_idx", "trans_val", "item_category")  # written before the table existed
    rewrite_weights(path, lambda s: [s.pop(k) for k in older])
    old = load_checkpoint(path)
    assert not old.model.uses_transitions and old.model.trans_ptr.numel() == 0


def _chain_dataset():
    """Users walk a fixed item chain: every item has exactly one successor."""
    from models.datasets.core import dataset_from_columns

    rng = np.random.default_rng(0)
    n_items = 60
    users, items, ts = [], [], []
    for u in range(80):
        start, n = int(rng.integers(n_items)), int(rng.integers(4, 8))
        users += [f"u{u}"] * n
        items += [f"i{(start + 7 * k) % n_items}" for k in range(n)]
        ts += list(range(n))
    return dataset_from_columns("chain", users, items, ts)


def test_training_fits_the_weight_on_validation_and_serves_the_table(tmp_path):
    """On the chain a barely trained model ranks poorly while the table knows every transition,
    so validation picks a weight > 0 and the saved model serves its table."""
    from models.train import train

    path, _ = train(_chain_dataset(), ModelConfig(d_model=8, max_len=8, n_negatives=0),
                    TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-4), tmp_path / "ck")
    ck = load_checkpoint(path)
    fit = ck.metadata["transitions"]
    assert fit["weight"] > 0 and fit["valid_ndcg10_after"] > fit["valid_ndcg10_before"] + 0.2
    assert ck.model_config.transition_weight == fit["weight"] and ck.model.uses_transitions
    assert fit["nnz"] == ck.model.trans_idx.numel() > 0
    test = ck.metadata["test"]["NDCG@10"]
    assert test > 0.5  # the test targets follow the chain too


def test_refit_gives_an_untabled_checkpoint_its_table(tmp_path, monkeypatch):
    """A checkpoint trained without a table (``transition_top = 0``) gets one, fitted on the
    validation cases its training used, from ``nextaction fit-transitions`` (refit_transitions)."""
    from typer.testing import CliRunner

    from models.train import train
    from stream_app.cli import app

    ds = _chain_dataset()
    path, _ = train(ds, ModelConfig(d_model=8, max_len=8, transition_top=0),
                    TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-4), tmp_path / "ck")
    before = load_checkpoint(path)
    assert "transitions" not in before.metadata and not before.model.uses_transitions
    before.model.cfg = dataclasses.replace(before.model.cfg, transition_top=100)  # what a refit may keep
    save_checkpoint(path, before.model, before.vocab, before.train_config, before.metadata)
    monkeypatch.setattr("models.datasets.load", lambda name, *a, **k: ds)  # the CLI's dataset by name
    res = CliRunner().invoke(app, ["fit-transitions", "--dataset", "chain", "--checkpoint", str(path)])
    assert res.exit_code == 0, res.output
    after = load_checkpoint(path)
    assert after.model.uses_transitions and after.metadata["transitions"]["weight"] > 0
    assert after.version != before.version and after.metadata["best_epoch"] == before.metadata["best_epoch"]


def test_rescore_items_equals_the_full_scan_at_those_columns():
    """The exact rescoring of candidates (dot + bias + repeat + transition scores) is what the full
    fp32 scan gives there: checked on history items (repeat scores) and the last item's successors."""
    m, table = _model(weight=2.0)
    m.set_transitions(table)
    batch = collate([encode(h, VOCAB, m.cfg) for h in _hists()])
    with torch.no_grad():
        last, _ = m.prefill(batch, heads=False)
        full = m.item_logits(last.h, last.rep, last.hist, last.item)  # (B, V)
        cand = torch.arange(F, len(VOCAB)).repeat(len(_hists()), 1)  # every known item
        cand = cand[:, torch.randperm(cand.shape[1])]
        torch.testing.assert_close(m.rescore_items(last.h, last.rep, last.hist, last.item, cand),
                                   full.gather(1, cand), rtol=0, atol=1e-5)
        for k in (1, 5, len(ITEMS)):
            exact_s, exact_i, _ = m.top_items(last.h, last.rep, last.hist, last.item, k)
            ref_s, ref_i = torch.topk(full[:, F:], k, dim=1)
            assert torch.equal(exact_i, ref_i + F) and torch.equal(exact_s, ref_s)
            s, i, _ = m.top_items(last.h, last.rep, last.hist, last.item, k, coarse=torch.bfloat16, margin=len(ITEMS))
            assert torch.equal(i, exact_i)  # every item is a candidate: the exact order
            torch.testing.assert_close(s, exact_s, rtol=0, atol=1e-5)


def test_the_item_temperature_is_fitted_with_the_table_of_the_training_part(tmp_path, monkeypatch):
    """The validation targets must not be in the table the temperature is fitted with (it would be fitted
    on scores that already know the answer); the saved model serves the table of every event."""
    import models.train as mt
    from models.datasets import leave_one_out

    seen = {}
    real = mt.calibrate_items

    def spy(ck, ds, cases, device="cpu", **kw):
        seen["val"] = ck.model.trans_val.detach().clone()
        return real(ck, ds, cases, device, **kw)

    monkeypatch.setattr(mt, "calibrate_items", spy)
    ds = _chain_dataset()
    path, _ = mt.train(ds, ModelConfig(d_model=8, max_len=8, n_negatives=0),
                       TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-4), tmp_path / "ck")
    ck = load_checkpoint(path)
    assert ck.model.uses_transitions
    split, _, train_seqs = mt.validation_and_training(leave_one_out(ds), ck.train_config)
    feat = ck.model.cfg.transition_feature
    during = mt.transition_table(ck, train_seqs).with_feature(feat)
    final = mt.transition_table(ck, mt.training_sequences(split, set())).with_feature(feat)
    assert not np.allclose(during.val.sum(), final.val.sum())  # the two tables differ on this log
    assert np.allclose(seen["val"].numpy(), during.val) and np.allclose(ck.model.trans_val.numpy(), final.val)
