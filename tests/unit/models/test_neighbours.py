"""models.neighbours: the item co-occurrence table, how the model scores it on every serving path,
its checkpoint and online life, and fitting it after training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.encoding import ItemVocab, collate, encode
from models.errors import CheckpointError, ConfigError
from models.model import NextActionModel
from models.neighbours import count_neighbours
from models.schema import EventSeq
from tests.unit.models.paths import assert_every_path_scores_as_the_full_pass

ITEMS = [f"i{k}" for k in range(12)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)
F = VOCAB.first_item


def _seqs(seed: int = 1, n: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(F, len(VOCAB), int(rng.integers(2, 8))) for _ in range(n)]


def test_the_table_is_the_item_knn_cosine_and_keeps_the_top_rows():
    """Every kept entry is the cosine of the binary user x item columns that ItemKNN scores with."""
    from models.baselines import ItemKNN
    from models.datasets.core import dataset_from_columns

    seqs = _seqs()
    users = [f"u{u}" for u, s in enumerate(seqs) for _ in s]
    items = [VOCAB.items[i - F] for s in seqs for i in s]
    ds = dataset_from_columns("t", users, items, list(range(len(items))))
    knn = ItemKNN().fit(ds, {u: ds.sequences[u] for u in ds.sequences})
    S = knn.S.toarray()  # dataset item order
    col = {int(VOCAB.indices([it])[0]): j for j, it in enumerate(ds.items)}
    full = count_neighbours(seqs, len(VOCAB), top=len(VOCAB), first_item=F)
    for a in range(F, len(VOCAB)):
        nbrs, sims = full.successors(a)
        assert a not in nbrs and sims == sorted(sims, reverse=True)
        for b, v in zip(nbrs, sims):
            assert v == pytest.approx(S[col[a], col[b]], rel=1e-5)
        assert len(nbrs) == int((S[col[a]] > 0).sum())  # every co-consumed item, and only those
    top2 = count_neighbours(seqs, len(VOCAB), top=2, first_item=F)
    assert all(top2.successors(a)[0] == full.successors(a)[0][:2] for a in range(F, len(VOCAB)))
    assert count_neighbours([np.array([0, 2, F])], len(VOCAB), top=3, first_item=F).nnz == 0  # specials skipped
    with pytest.raises(ConfigError, match="neighbour_top"):
        count_neighbours(seqs, len(VOCAB), top=0)


def _model(weight: float = 1.5, window: int = 2, transitions: bool = True) -> NextActionModel:
    from models.transitions import count_transitions

    torch.manual_seed(0)
    m = NextActionModel(ModelConfig(n_items=len(VOCAB), n_hash_buckets=4, d_model=16, max_len=6, dropout=0.0,
                                    transition_weight=0.5 if transitions else 0.0, neighbour_window=window,
                                    neighbour_weight=weight)).eval()
    if transitions:
        m.set_transitions(count_transitions(_seqs(3), len(VOCAB), top=4, first_item=F).with_feature("log"))
    m.set_neighbours(count_neighbours(_seqs(), len(VOCAB), top=5, first_item=F))
    return m


def _hists() -> list[EventSeq]:
    rng = np.random.default_rng(2)
    return [EventSeq.from_columns([ITEMS[i] for i in rng.integers(0, len(ITEMS), n)], rng.integers(0, 5, n),
                                  1_700_000_000_000 + 60_000 * np.arange(n)) for n in (1, 3, 6, 9)]


def _scores(m: NextActionModel) -> torch.Tensor:
    with torch.no_grad():
        return m.score_last(collate([encode(h, VOCAB, m.cfg) for h in _hists()]))["item_scores"]


@pytest.mark.parametrize("window", [1, 2, 4])
def test_the_model_adds_weight_times_the_rows_of_the_last_window_events(window):
    m = _model(window=window)
    with_table = _scores(m)
    table = count_neighbours(_seqs(), len(VOCAB), top=5, first_item=F)
    m.cfg = dataclasses.replace(m.cfg, neighbour_weight=0.0)  # weight 0: the table is off
    expect = _scores(m)
    for b, h in enumerate(_hists()):
        for i in VOCAB.indices(h.items[-min(window, m.cfg.max_len):]):  # a repeated item counts twice
            nbrs, sims = table.successors(int(i))
            expect[b, nbrs] += 1.5 * torch.tensor(sims)
    torch.testing.assert_close(with_table, expect)
    assert (with_table != _scores(m)).any()


def test_incremental_steps_and_the_top_k_paths_score_the_neighbours_as_the_full_pass():
    """prefill + step (the KV state's last items), the exact and the bf16 top-K with exact rescoring
    all give what one full pass over the history gives."""
    assert_every_path_scores_as_the_full_pass(_model(), VOCAB, _hists())


def test_checkpoint_round_trip_an_old_checkpoint_and_a_table_that_does_not_fit(tmp_path, rewrite_weights):
    m = _model()
    path = save_checkpoint(tmp_path / "ck", m, VOCAB)
    ck = load_checkpoint(path)
    assert ck.model.uses_neighbours and ck.model.cfg.neighbour_window == 2
    torch.testing.assert_close(_scores(ck.model), _scores(m))

    rewrite_weights(path, lambda s: s.update(nbr_idx=s["nbr_idx"][:-1]))
    with pytest.raises(CheckpointError, match="neighbour table does not fit n_items"):
        load_checkpoint(path)
    rewrite_weights(path, lambda s: [s.pop(k) for k in ("nbr_ptr", "nbr_idx", "nbr_val")])  # before the table
    old = load_checkpoint(path)
    assert not old.model.uses_neighbours and old.model.uses_transitions


def test_a_row_given_to_a_new_item_loses_its_neighbours_in_the_trainer_and_in_every_worker():
    """The trainer reuses a row for a new item: its own list and its place in other lists score 0,
    and a worker applying the delta (which sees the row's id change) does the same."""
    from models.delta import apply_delta, make_delta

    trainer, worker = _model(transitions=False), _model(transitions=False)
    t_vocab, w_vocab = ItemVocab(VOCAB.items, 4), ItemVocab(VOCAB.items, 4)
    row = F + 3
    assert trainer.nbr_ptr[row + 1] > trainer.nbr_ptr[row] and bool((trainer.nbr_idx == row).any())
    t_vocab.set_items([row], ["new"])
    trainer.clear_neighbours([row])
    a, b = int(trainer.nbr_ptr[row]), int(trainer.nbr_ptr[row + 1])
    assert (trainer.nbr_val[a:b] == 0).all() and (trainer.nbr_val[trainer.nbr_idx == row] == 0).all()
    assert (trainer.nbr_val > 0).sum() > 0  # the other entries stay
    reused = apply_delta(worker, w_vocab, make_delta(trainer, t_vocab, "base", 1, 0, [row]))
    assert list(reused) == [row]
    torch.testing.assert_close(worker.nbr_val, trainer.nbr_val)


def test_growing_the_catalogue_keeps_the_table_scored():
    from models.delta import add_items

    m = _model(transitions=False)
    vocab = ItemVocab(VOCAB.items, 4)
    before = _scores(m)
    rows = add_items(m, vocab, ["brand-new"])
    assert rows == [len(VOCAB)] and m.nbr_ptr.numel() == m.cfg.n_items + 1 and m.uses_neighbours
    after = _scores(m)
    torch.testing.assert_close(after[:, : before.shape[1]], before)  # the new row has no neighbours yet


def _cluster_dataset():
    """Users consume the items of one group of six in a random order: which items go together is
    plain co-occurrence, while what follows what is noise."""
    from models.datasets.core import dataset_from_columns

    rng = np.random.default_rng(0)
    users, items, ts = [], [], []
    for u in range(150):
        g = int(rng.integers(10))
        seq = rng.permutation(6)[: int(rng.integers(4, 7))]
        users += [f"u{u}"] * len(seq)
        items += [f"g{g}i{k}" for k in seq]
        ts += list(range(len(seq)))
    return dataset_from_columns("clusters", users, items, ts)


def test_training_fits_the_window_and_weight_on_validation_and_serves_the_table(tmp_path):
    """A barely trained model does not know the groups; the table does, so validation picks a weight
    > 0 and the saved model serves the table counted on every event but the test targets."""
    from models.config import TrainConfig
    from models.train import train

    path, _ = train(_cluster_dataset(), ModelConfig(d_model=8, max_len=8, n_negatives=0, transition_top=0),
                    TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-4), tmp_path / "ck")
    ck = load_checkpoint(path)
    fit = ck.metadata["neighbours"]
    assert fit["weight"] > 0 and fit["valid_ndcg10_after"] > fit["valid_ndcg10_before"] + 0.1
    assert fit["window"] in (1, 2) and ck.model_config.neighbour_window == fit["window"]
    assert ck.model_config.neighbour_weight == fit["weight"] and ck.model.uses_neighbours
    assert fit["nnz"] == ck.model.nbr_idx.numel() > 0
    assert ck.metadata["test"]["HR@10"] > 0.6  # the test targets are in the user's group too


def test_a_log_without_co_occurrence_keeps_the_table_off(tmp_path):
    """Every user sees one item only: no two items share a user, the table is empty, weight 0 wins."""
    from models.config import TrainConfig
    from models.datasets.core import dataset_from_columns
    from models.train import train

    users = [f"u{u}" for u in range(60) for _ in range(5)]
    items = [f"i{u % 30}" for u in range(60) for _ in range(5)]
    ds = dataset_from_columns("solo", users, items, list(range(len(items))))
    path, _ = train(ds, ModelConfig(d_model=8, max_len=8, n_negatives=0),
                    TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1), tmp_path / "ck")
    ck = load_checkpoint(path)
    assert ck.metadata["neighbours"]["weight"] == 0.0 and not ck.model.uses_neighbours
    assert ck.model.nbr_ptr.numel() == 0


def test_a_refit_reports_what_the_served_model_scores_whatever_its_temperature(tmp_path):
    """Refitting a calibrated checkpoint: the table's terms are divided by the item temperature too,
    so the fit searches on uncalibrated scores; the validation NDCG@10 it reports is then the one the
    served model has (it was not, with the temperature in the base scores only)."""
    from models.config import TrainConfig
    from models.train import evaluate_cases, fit_neighbours, train, validation_and_training
    from models.datasets import leave_one_out
    from models.scorer import TransformerScorer

    ds = _cluster_dataset()
    tcfg = TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-4)
    path, _ = train(ds, ModelConfig(d_model=8, max_len=8, n_negatives=0, transition_top=0), tcfg, tmp_path / "ck",
                    eval_test=False)
    ck = load_checkpoint(path)
    ck.model.cfg = dataclasses.replace(ck.model.cfg, item_temperature=4.0, neighbour_weight=0.0)
    split, valid, train_seqs = validation_and_training(leave_one_out(ds), tcfg)
    fit = fit_neighbours(ck, ds, valid, train_seqs, mask_history=False)
    assert fit["weight"] > 0 and ck.model.cfg.item_temperature == 4.0  # the calibration is kept
    served = evaluate_cases(TransformerScorer(ck.model, ck.vocab, ds.items), ds, valid, False)["NDCG@10"]
    assert served == pytest.approx(fit["valid_ndcg10_after"], abs=2e-4)


def test_a_refit_of_a_trained_checkpoint_starts_without_its_tables(tmp_path):
    """``nextaction fit-transitions`` on a checkpoint that already serves both tables fits them as
    training did: from the model alone, not on top of the served neighbour table (counted on the
    validation targets too, which would make the transition weight look better than it is)."""
    from models.config import TrainConfig
    from models.train import refit_transitions, train

    ds = _cluster_dataset()
    path, _ = train(ds, ModelConfig(d_model=8, max_len=8, n_negatives=0),
                    TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=1, lr=1e-4), tmp_path / "ck",
                    eval_test=False)
    trained = load_checkpoint(path).metadata
    assert trained["neighbours"]["weight"] > 0
    refit = refit_transitions(ds, path)
    for table in ("transitions", "neighbours"):
        keys = ("weight", "valid_ndcg10_before", "valid_ndcg10_after")
        assert {k: refit[table][k] for k in keys} == {k: trained[table][k] for k in keys}, table
