"""models.delta: a trainer's rows reach a served model exactly (round trip through the bytes), the
chain refuses what does not follow, row reuse, the KV cache's staleness bound, merge, message size.

Real models and real checkpoints throughout: the trainer side is a checkpoint loaded, changed and
saved again; the served side is a :class:`TransformerPredictor` of the original checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.delta import MAX_MESSAGE_BYTES, ModelDelta, add_items, apply_delta, make_delta, merge
from models.encoding import ItemVocab, collate, encode
from models.model import NextActionModel
from models.schema import EventSeq
from models.serving import TransformerPredictor
from models.transitions import count_transitions

T0 = 1_700_000_000_000
K = 6


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_ckpt(make_checkpoint, tmp_path_factory):
    """A 40-item checkpoint with item categories, a transition table (weight 1) and calibration."""
    ck = load_checkpoint(make_checkpoint(0, items=40, item_categories=True, n_category_buckets=8,
                                         transition_weight=1.0))
    model, vocab = ck.model, ck.vocab
    rng = np.random.default_rng(0)
    seqs = [rng.integers(vocab.first_item, len(vocab), 30) for _ in range(30)]
    model.set_transitions(count_transitions(seqs, len(vocab), top=5, first_item=vocab.first_item).with_feature("log"))
    model.set_item_categories(np.r_[np.zeros(vocab.first_item, np.int64),
                                    rng.integers(0, 9, len(vocab) - vocab.first_item)])
    model.cfg = dataclasses.replace(model.cfg, action_temperature=1.2, action_bias=(0.1, 0.0, -0.1, 0.2, 0.0))
    return save_checkpoint(tmp_path_factory.mktemp("delta") / "base", model, vocab)


def _serve(path, **kw) -> TransformerPredictor:
    return TransformerPredictor.from_checkpoint(path, device="cpu", num_threads=1, **kw)


def _histories(ids: list[list[str]]) -> list[EventSeq]:
    return [EventSeq.from_columns(h, [k % 5 for k in range(len(h))], T0 + 60_000 * np.arange(len(h)),
                                  devices=["ios"] * len(h)) for h in ids]


def _same(a, b, atol=1e-5):
    assert [i for i, _ in a.top_items] == [i for i, _ in b.top_items]
    np.testing.assert_allclose([s for _, s in a.top_items], [s for _, s in b.top_items], atol=atol)
    np.testing.assert_allclose(a.action_probs, b.action_probs, atol=atol)
    assert a.next_gap_s == pytest.approx(b.next_gap_s, rel=1e-5, abs=1e-6)


def _trainer_delta(path, tmp_path):
    """The trainer's side: 2 new items (one with a category), changed rows, transition rows, action
    bias and calibration; returns (delta, the trainer's model saved as a checkpoint)."""
    ck = load_checkpoint(path)
    model, vocab = ck.model, ck.vocab
    new = add_items(model, vocab, ["new-a", "new-b"], categories=[0, 5])
    first = vocab.first_item
    changed = [first + 3, first + 12, *new]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.item_emb.weight[changed] = torch.randn(len(changed), model.cfg.d_model, generator=g) * 0.1
        model.item_bias[changed] = torch.tensor([0.3, -0.2, 200.0, 0.5])  # new-a: the best anywhere
        model.action_head.bias.copy_(torch.tensor([0.5, -0.5, 0.2, 0.0, 0.1]))
    t_rows = [first + 20, first + 3, new[1]]  # new-b -> i7 scored high
    model.set_transition_rows(t_rows, [0, 2, 3, 4], [first + 1, new[0], first + 2, first + 7], [1.5, 0.7, 0.2, 60.0])
    model.cfg = dataclasses.replace(model.cfg, action_temperature=0.9, action_bias=(0.0, 0.3, 0.0, 0.0, -0.3))
    d = make_delta(model, vocab, ck.version, seq=1, prev=0, item_rows=changed, trans_rows=t_rows,
                   meta={"examples": 7}, calibration=True)
    apply_delta(model, vocab, d)  # the trainer's model holds what the workers will: idempotent
    return d, save_checkpoint(tmp_path / "trainer", model, vocab)


def test_round_trip_through_bytes_gives_the_trainers_model(base_ckpt, tmp_path):
    d, trainer_path = _trainer_delta(base_ckpt, tmp_path)
    served = _serve(base_ckpt, max_stale_deltas=0, score_budget=1000)
    ref = _serve(trainer_path)
    hs = _histories([["i1", "new-a", "i7"], ["new-b"], ["i26"], ["i3", "i12", "new-b"], ["i0", "i1", "i2", "i3"]])
    users = [f"u{j}" for j in range(len(hs))]
    served.predict([h[:-1] for h in hs if len(h) > 1], K, users=[u for u, h in zip(users, hs) if len(h) > 1])
    base = served.version
    assert served.max_rows == 1000 // 46

    back = ModelDelta.decode(d.encode())
    assert served.apply_delta(back) and served.version == f"{base}+1" == back.label
    assert served.max_rows == 1000 // 48 and len(served.vocab) == 48 == served.cfg.n_items
    m, r = served.model, ref.model
    with torch.no_grad():
        assert torch.equal(m.item_vectors(), r.item_vectors()) and torch.equal(m.item_bias, r.item_bias)
    for name in ("item_input", "item_category", "trans_ptr", "trans_idx", "trans_val"):
        assert torch.equal(getattr(m, name), getattr(r, name)), name
    assert served.cfg == ref.cfg and served.vocab == ref.vocab

    inc = served.predict(hs, K, users=users)  # cached states are stale (max_stale_deltas=0): rebuilt
    assert served.stats["stale"] == 3 and served.stats["steps"] == 0
    for a, b, c in zip(inc, served.predict_full(hs, K), ref.predict(hs, K)):
        _same(a, c)
        _same(b, c)
    assert all(p.top_items[0][0] == "new-a" for p in inc)  # a new item is ranked at once
    assert "i7" in [i for i, _ in inc[1].top_items]  # new-b -> i7 transition row
    # the reference is a plain model: full recomputation of the served model gives the same
    with torch.no_grad():
        o = m.score_last(collate([encode(h, served.vocab, served.cfg) for h in hs]))
    np.testing.assert_allclose([p.action_probs for p in inc], o["action_probs"].numpy(), atol=1e-5)


def test_the_chain_refuses_what_does_not_follow(base_ckpt):
    p = _serve(base_ckpt)
    base, first = p.version, p.vocab.first_item
    ones = np.ones((1, p.cfg.d_model), np.float32)

    def delta(seq, prev, row=first, item="i0", b=base, emb=ones):
        return ModelDelta(b, seq, prev, [row], [item], emb * seq, [float(seq)], [0])

    before = p.model.item_emb.weight.clone()
    assert not p.apply_delta(delta(1, 0, b="ffffffffffff"))  # another full version
    assert not p.apply_delta(delta(2, 1))  # follows a delta this model never had
    assert p.version == base and torch.equal(p.model.item_emb.weight, before) and p.deltas == 0
    # it follows but does not fit: ValueError, and nothing changes (vocabulary included)
    for bad, match in ((delta(1, 0, row=len(p.vocab) + 1, item="far"), "gap"),
                       (delta(1, 0, row=first - 1, item="bucket"), "below the first item row"),
                       (delta(1, 0, emb=np.ones((1, 3), np.float32)), "width 3")):
        with pytest.raises(ValueError, match=match):
            p.apply_delta(bad)
        assert p.version == base and len(p.vocab) == 46 and torch.equal(p.model.item_emb.weight, before)
    with pytest.raises(ValueError, match="already at row"):  # "i1" keeps its row: it cannot take another
        p.apply_delta(ModelDelta(base, 1, 0, [first + 5], ["i1"], ones, [0.0], [0]))
    assert p.vocab.index("i5") == first + 5 and p.vocab.index("i1") == first + 1

    d1, d2 = delta(1, 0), delta(2, 1, row=len(p.vocab), item="n1")
    assert p.apply_delta(d1) and p.apply_delta(d2) and p.version == f"{base}+2"
    assert not p.apply_delta(d1) and not p.apply_delta(d2)  # the same delta again: refused by the chain
    assert p.version == f"{base}+2" and p.deltas == 2 and p.vocab.index("n1") == 46
    np.testing.assert_array_equal(p.model.item_emb.weight[[first, 46]].detach().numpy(), np.vstack([ones, 2 * ones]))


def test_merge_equals_applying_in_order(base_ckpt, tmp_path):
    d1, _ = _trainer_delta(base_ckpt, tmp_path)
    first = d1.item_index.min() - 3
    d2 = ModelDelta(d1.base, 2, 1, [first + 3, 47, 48], ["i3", "new-b", "new-c"], np.full((3, 32), 0.2),
                    [1.0, 2.0, 3.0], [1, 2, 3], trans_rows=[first + 20], trans_ptr=[0, 1], trans_idx=[48],
                    trans_val=[4.0], action_bias=np.zeros(5))
    seq, once = _serve(base_ckpt), _serve(base_ckpt)
    assert seq.apply_delta(d1) and seq.apply_delta(d2)
    m = merge(d1, d2)
    assert (m.label, m.prev, m.calibration) == (d2.label, 0, d1.calibration)
    assert once.apply_delta(ModelDelta.decode(m.encode())) and once.version == seq.version
    assert once.vocab == seq.vocab
    for name, t in seq.model.state_dict().items():
        assert torch.equal(t, once.model.state_dict()[name]), name
    with pytest.raises(ValueError, match="does not follow"):
        merge(d2, d1)


def test_row_reuse_gives_the_row_to_the_new_id_and_rebuilds_states_that_hold_it(base_ckpt):
    p = _serve(base_ckpt, max_stale_deltas=10)
    first = p.vocab.first_item
    row = p.vocab.index("i3")
    hs = _histories([["i1", "i3", "i2", "i4"],  # u: holds the reused row
                     ["i9", "fresh", "i8"],  # v: holds the new id while it was unknown (its hash bucket)
                     ["i5", "i6", "i8"]])  # w: neither
    users = ["u", "v", "w"]
    p.predict([h[:-1] for h in hs], K, users=users)
    d = ModelDelta(p.version, 1, 0, [row], ["fresh"], np.full((1, p.cfg.d_model), 0.05), [0.0], [2])
    assert p.apply_delta(d)
    assert p.vocab.index("fresh") == row and p.vocab.index("i3") == p.vocab.bucket("i3") < first
    assert "i3" not in p.vocab and len(p.vocab) == 46
    out = p.predict(hs, K, users=users)
    assert p.stats["stale"] == 2 and p.stats["steps"] == 1  # u and v rebuilt at once, w stepped
    for a, b in zip(out, p.predict_full(hs, K)):
        _same(a, b)


def test_cached_states_are_stepped_for_max_stale_deltas_then_rebuilt(base_ckpt):
    p = _serve(base_ckpt, max_stale_deltas=2)
    first, base = p.vocab.first_item, p.version
    h = _histories([["i1", "i2", "i1", "i4", "i2"]])[0]
    p.predict([h[:1]], K, users=["u"])
    assert (p.stats["prefills"], p.stats["steps"]) == (1, 0)
    rng = np.random.default_rng(2)
    for n in range(1, 5):
        # a delta that changes no input row of u's window: scores, action bias, transitions
        rows = [first + 10 + n, first + 30]
        d = ModelDelta(base, n, n - 1, rows, [f"i{r - first}" for r in rows],
                       rng.normal(0, 0.1, (2, p.cfg.d_model)), rng.normal(0, 1, 2), [1, 2],
                       trans_rows=[first + 1], trans_ptr=[0, 1], trans_idx=[first + 30], trans_val=[float(n)],
                       action_bias=rng.normal(0, 0.3, 5))
        assert p.apply_delta(d)
        out = p.predict([h[:n + 1]], K, users=["u"])[0]
        _same(out, p.predict_full([h[:n + 1]], K)[0])  # equal to full recomputation with the new weights
        steps, prefills, stale = p.stats["steps"], p.stats["prefills"], p.stats["stale"]
        if n <= 2:
            assert (steps, prefills, stale) == (n, 1, 0)  # survived n deltas: stepped
        elif n == 3:
            assert (steps, prefills, stale) == (2, 2, 1)  # 3 deltas old: rebuilt
        else:
            assert (steps, prefills, stale) == (3, 2, 1)  # the rebuilt state is fresh again
    entry = next(iter(p.cache._d.values()))
    assert entry.deltas == 3 and p.deltas == 4


def test_a_model_without_transitions_stores_delta_rows_and_scores_them_once_weighted(make_checkpoint):
    ck = load_checkpoint(make_checkpoint(0))
    model, vocab = ck.model, ck.vocab
    assert model.trans_ptr.numel() == 0 and model.cfg.transition_weight == 0
    first = vocab.first_item
    h = _histories([["i1", "i2"]])
    batch = collate([encode(x, vocab, model.cfg) for x in h])
    with torch.no_grad():
        before = model.score_last(batch)["item_scores"]
    d = ModelDelta(ck.version, 1, 0, [], [], np.zeros((0, 32)), [], [], trans_rows=[first + 2], trans_ptr=[0, 1],
                   trans_idx=[first + 9], trans_val=[5.0])
    assert apply_delta(model, vocab, d) == []
    assert model.trans_ptr.numel() == len(vocab) + 1 and not model.uses_transitions
    with torch.no_grad():
        assert torch.equal(model.score_last(batch)["item_scores"], before)  # stored, weight 0: not scored
        model.cfg = dataclasses.replace(model.cfg, transition_weight=1.0)
        after = model.score_last(batch)["item_scores"]
    assert after[0, first + 9] == pytest.approx(before[0, first + 9].item() + 5.0, abs=1e-5)


def test_a_delta_of_2000_rows_at_d64_fits_a_kafka_message():
    rng = np.random.default_rng(0)
    r, s, first = 2000, 200, 1026
    d = ModelDelta("0123456789ab", 12, 11, first + rng.permutation(50_000)[:r], [f"item-{k:07d}" for k in range(r)],
                   rng.normal(0, 1, (r, 64)), rng.normal(0, 1, r), rng.integers(0, 1024, r),
                   trans_rows=first + np.arange(s), trans_ptr=np.arange(s + 1) * 100,
                   trans_idx=rng.integers(first, first + 50_000, s * 100), trans_val=rng.random(s * 100),
                   action_bias=np.zeros(5), calibration=(1.1, (0.0,) * 5), meta={"examples": 12_345})
    size = len(d.encode())
    assert size < MAX_MESSAGE_BYTES < 1_048_588  # Kafka's default message.max.bytes
    approx = r * (4 * 64 + 4 + 16 + 12 + 3) + s * 100 * 8 + s * 16
    assert abs(size - approx) < 0.05 * approx  # the module docstring's size formula


def test_grown_model_keeps_training_with_its_optimizer():
    vocab = ItemVocab([f"i{k}" for k in range(6)], n_hash_buckets=2)
    cfg = ModelConfig(n_items=len(vocab), n_hash_buckets=2, d_model=8, n_heads=2, max_len=4, dropout=0.0)
    torch.manual_seed(0)
    model = NextActionModel(cfg)
    params = {id(p) for p in model.parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    h = _histories([["i1", "i2", "i3"]])

    def train_step(v):
        _, loss = model.train()(collate([encode(x, v, model.cfg, max_len=5) for x in h]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step(vocab)
    rows = add_items(model, vocab, ["n1", "n2"])
    assert rows == [10, 11] and model.item_emb.weight.shape == (12, 8) and model.item_emb.weight.requires_grad
    assert {id(p) for p in model.parameters()} == params  # the same Parameters: the optimizer still holds them
    assert model.resize_optimizer_state(opt) == 4  # Adam's two moments of item_emb.weight and item_bias
    h = _histories([["i1", "n1", "n2"]])
    before = model.item_emb.weight[11].detach().clone()
    train_step(vocab)
    assert not torch.equal(model.item_emb.weight[11], before)  # the new row trains
