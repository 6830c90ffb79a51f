"""models.train: ``train`` end to end on tiny data — a loadable checkpoint with metrics, the calibrated
action head, the input map of items never trained on, the plateau anneal, item categories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.config import ModelConfig, TrainConfig
from models.schema import EventSeq
from models.errors import ConfigError

torch.set_num_threads(1)  # tiny models: threads only add sync overhead (and thrash on a shared CPU)


def test_train_end_to_end_on_synthetic(tmp_path):
    """train() on a tiny synthetic dataset writes a loadable checkpoint with metrics."""
    from models.datasets import load
    from models.train import train

    ds = load("synthetic", n_users=60, n_items=20, min_len=6, max_len=12)
    path, hist = train(ds, ModelConfig(d_model=16, max_len=10),
                       TrainConfig(epochs=2, batch_size=32, progress=False, warmup_steps=2), tmp_path / "ck")
    ck = load_checkpoint(path)
    assert ck.metadata["dataset"] == ds.name and "test" in ck.metadata and ck.metadata["best_epoch"] >= 1
    assert [h["phase"] for h in hist] == ["causal", "causal", "test"]
    assert "NDCG@10" in hist[0]["valid"]


def test_train_calibrates_the_action_head_on_validation_and_serves_it(tmp_path):
    """After training, the action head's temperature and biases are fitted on the validation cases,
    stored in the checkpoint config, lower the validation log loss, and are what the model serves."""
    import dataclasses

    from models.calibration import apply_action_calibration
    from models.datasets import load
    from models.encoding import collate, encode
    from models.train import train

    ds = load("synthetic", n_users=120, n_items=20, min_len=6, max_len=12)
    path, _ = train(ds, ModelConfig(d_model=16, max_len=10),
                    TrainConfig(epochs=2, batch_size=32, progress=False, warmup_steps=2), tmp_path / "ck")
    ck = load_checkpoint(path)
    cal = ck.metadata["action_calibration"]
    assert cal["n_cases"] >= 50 and cal["valid_log_loss_after"] <= cal["valid_log_loss_before"] + 1e-6
    cfg = ck.model.cfg
    assert len(cfg.action_bias) == 5 and cfg.action_temperature == pytest.approx(cal["temperature"], abs=1e-4)
    batch = collate([encode(h, ck.vocab, cfg) for h in list(ds.sequences.values())[:8]])
    with torch.no_grad():
        served = ck.model.eval().score_last(batch)["action_probs"].numpy()
        ck.model.cfg = dataclasses.replace(cfg, action_temperature=1.0, action_bias=())
        raw = ck.model.score_last(batch)["action_probs"].numpy()
    np.testing.assert_allclose(served, apply_action_calibration(raw, cfg.action_temperature, cfg.action_bias),
                               atol=1e-5)
    with pytest.raises(ConfigError, match="action_bias"):
        dataclasses.replace(cfg, action_bias=(1.0, 2.0))
    # the next-item probabilities' temperature, fitted last (the same checkpoint)
    item_cal = ck.metadata["item_calibration"]
    assert item_cal["n_cases"] >= 50 and item_cal["valid_log_loss_after"] <= item_cal["valid_log_loss_before"] + 1e-6
    assert cfg.item_temperature == pytest.approx(item_cal["temperature"], abs=1e-4)
    with pytest.raises(ConfigError, match="item_temperature"):
        dataclasses.replace(cfg, item_temperature=0.0)


def test_items_never_seen_in_training_read_their_hash_bucket_as_input(tmp_path):
    """A catalogue item that no training sequence holds has an embedding row trained only as an
    output negative; as *input* it reads its hash bucket (trained by ``unknown_item_rate``), exactly
    as an unknown item id does — and the mapping survives the checkpoint round trip."""
    from models.datasets.core import dataset_from_columns
    from models.encoding import collate, encode
    from models.train import train

    rng = np.random.default_rng(0)
    users, items, ts, acts = [], [], [], []
    for u in range(60):
        n = int(rng.integers(5, 10))
        users += [f"u{u}"] * n
        items += [f"i{k}" for k in rng.integers(0, 12, n)]
        ts += list(range(n))
        acts += list(rng.choice([0, 2], n))  # view, cart
    users += ["late"] * 3  # "cold" appears only as this user's last (test) event: never trained on
    items += ["i1", "i2", "cold"]
    ts += [0, 1, 2]
    acts += [0] * 3
    ds = dataset_from_columns("toy", users, items, ts, acts)
    path, _ = train(ds, ModelConfig(d_model=16, max_len=10, n_hash_buckets=8),
                    TrainConfig(epochs=1, batch_size=32, progress=False, warmup_steps=2), tmp_path / "ck")
    ck = load_checkpoint(path)
    v, model = ck.vocab, ck.model
    cold, warm = v.index("cold"), v.index("i1")
    assert int(model.item_input[cold]) == v.bucket("cold") != cold and int(model.item_input[warm]) == warm
    trained = [v.index(f"i{k}") for k in range(12)]  # unknown_item_rate 0: buckets = mean trained item
    torch.testing.assert_close(model.item_emb.weight[v.bucket("cold")], model.item_emb.weight[trained].mean(0))

    def out(item):
        h = EventSeq.from_columns(["i1", "i2", item], ["view"] * 3, [0, 1, 2])
        with torch.no_grad():
            return model.score_last(collate([encode(h, v, model.cfg)]))["action_probs"]  # items: + repeat score

    unknown = next(f"new{k}" for k in range(1000) if v.bucket(f"new{k}") == v.bucket("cold"))
    torch.testing.assert_close(out("cold"), out(unknown))  # same input as an unseen id in its bucket
    assert not torch.allclose(out("cold"), out("i3"))


def test_a_plateau_at_a_high_lr_anneals_before_stopping(tmp_path, monkeypatch):
    """Validation that never improves: after ``patience`` flat evaluations with the lr still high
    the schedule decays to 0 over ``patience`` more epochs, and only then does training stop."""
    import models.train as mt
    from models.datasets import load

    monkeypatch.setattr(mt, "evaluate_cases", lambda *a, **k: {"NDCG@10": 0.1, "HR@10": 0.2})
    monkeypatch.setattr(mt, "STILL_LEARNING", 1.0)  # however the loss falls (next test)
    ds = load("synthetic", n_users=40, n_items=20, min_len=6, max_len=12)
    _, hist = mt.train(ds, ModelConfig(d_model=8, max_len=10, transition_top=0),
                       TrainConfig(epochs=50, patience=2, batch_size=32, progress=False, warmup_steps=1),
                       tmp_path / "ck")
    causal = [h for h in hist if h["phase"] == "causal"]
    assert len(causal) == 1 + 2 + 2  # best, two flat evaluations, the anneal's two epochs
    assert "anneal_from_lr" in causal[2] and causal[2]["anneal_from_lr"] > 0.9 * TrainConfig().lr
    assert causal[-1]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_a_flat_validation_while_the_loss_still_falls_steeply_is_no_plateau(tmp_path, monkeypatch):
    """The same flat validation, but any fall of the training loss over the patience window counts
    as still learning: no anneal and no stop while the loss falls; the epochs that waited say so."""
    import models.train as mt
    from models.datasets import load

    monkeypatch.setattr(mt, "evaluate_cases", lambda *a, **k: {"NDCG@10": 0.1, "HR@10": 0.2})
    monkeypatch.setattr(mt, "STILL_LEARNING", 0.0)
    ds = load("synthetic", n_users=40, n_items=20, min_len=6, max_len=12)
    _, hist = mt.train(ds, ModelConfig(d_model=8, max_len=10, transition_top=0),
                       TrainConfig(epochs=8, patience=2, batch_size=32, progress=False, warmup_steps=1, lr=3e-3),
                       tmp_path / "ck")
    causal = [h for h in hist if h["phase"] == "causal"]
    waited = [i for i, h in enumerate(causal) if h.get("plateau_wait")]
    assert waited and waited[0] == 2  # the first epoch with two flat evaluations behind it
    for i in waited:
        assert causal[i]["loss"] < causal[i - 2]["loss"] and "anneal_from_lr" not in causal[i]
    assert len(causal) > 1 + 2 + 2  # it went on past where the plateau rule would have ended it


def test_item_categories_are_tied_into_the_item_rows_and_saved(tmp_path):
    """``item_categories``: training sets each item's category bucket from the catalogue, every item
    row (input and scored) adds its category's embedding, and the mapping survives the round trip."""
    from models.datasets.core import dataset_from_columns
    from models.encoding import collate, encode
    from models.train import train

    rng = np.random.default_rng(0)
    users, items, ts, cats = [], [], [], []
    for u in range(60):
        n = int(rng.integers(5, 10))
        ks = rng.integers(0, 12, n)
        users += [f"u{u}"] * n
        items += [f"i{k}" for k in ks]
        cats += [f"c{k % 3}" for k in ks]  # three categories
        ts += list(range(n))
    ds = dataset_from_columns("toy", users, items, ts, categories=cats)
    path, _ = train(ds, ModelConfig(d_model=16, max_len=10, item_categories=True, n_category_buckets=64),
                    TrainConfig(epochs=1, batch_size=32, progress=False, warmup_steps=2), tmp_path / "ck")
    ck = load_checkpoint(path)
    m, v = ck.model, ck.vocab
    b = {k: int(m.item_category[v.index(f"i{k}")]) for k in range(12)}
    assert all(b[k] > 0 for k in b) and b[0] == b[3] == b[6] and len({b[0], b[1], b[2]}) == 3
    with torch.no_grad():
        rows = m.item_vectors()
        torch.testing.assert_close(rows, m.item_emb.weight + m.cat_emb(m.item_category))
        h = EventSeq.from_columns(["i1", "i4"], ["view"] * 2, [0, 1])
        batch = collate([encode(h, v, m.cfg)])
        again = load_checkpoint(path).model.score_last(batch)["item_scores"]
        torch.testing.assert_close(m.score_last(batch)["item_scores"], again)


def test_the_checkpoint_holds_the_averaged_weights_it_was_validated_with(tmp_path, monkeypatch):
    """``ema_epochs > 0``: the saved weights are the bias-corrected moving average of the weights after
    each step (recomputed here from every step's weights), not the last step's."""
    import models.averaging
    from models.datasets import load
    from models.train import train

    steps: list[dict[str, torch.Tensor]] = []

    class Recording(models.averaging.WeightAverage):
        def update(self, model):
            steps.append({n: p.detach().clone() for n, p in model.named_parameters()})
            super().update(model)

    monkeypatch.setattr(models.averaging, "WeightAverage", Recording)
    ds = load("synthetic", n_users=60, n_items=20, min_len=6, max_len=12)
    cfg = ModelConfig(d_model=16, max_len=10)
    path, _ = train(ds, cfg, TrainConfig(epochs=1, batch_size=16, progress=False, warmup_steps=2, ema_epochs=0.5),
                    tmp_path / "ck")
    saved = dict(load_checkpoint(path).model.named_parameters())
    n = len(steps)
    assert n >= 3
    decay = 0.5 ** (1.0 / (0.5 * n))  # half-life: half an epoch of n steps
    w = torch.tensor([(1 - decay) * decay ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
    name = next(k for k in saved if "layers" in k and saved[k].dim() == 2)  # a weight no fit after training touches
    expected = sum(float(w[i]) * steps[i][name].double() for i in range(n)) / float(w.sum())
    torch.testing.assert_close(saved[name].double(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(saved[name], steps[-1][name], atol=1e-4)  # not the last step's weights
