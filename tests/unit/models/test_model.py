"""NextActionModel: shapes, causality, incremental == full recomputation, learns a pattern."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.encoding import ItemVocab, collate, encode, encode_last
from models.kv_state import KVState
from models.model import NextActionModel, top_probs
from models.schema import ACTIONS, EventSeq

torch.set_num_threads(1)  # tiny models: threads only add sync overhead (and thrash on a shared CPU)
ITEMS = [f"i{k}" for k in range(12)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)


def _cfg(**kw) -> ModelConfig:
    base = dict(n_items=len(VOCAB), n_hash_buckets=4, max_len=8, d_model=32, n_heads=2, dropout=0.0,
                n_device_buckets=8, n_location_buckets=8)
    base.update(kw)
    return ModelConfig(**base)


def _seq(n: int, seed: int = 0) -> EventSeq:
    rng = np.random.default_rng(seed)
    return EventSeq.from_columns([ITEMS[rng.integers(len(ITEMS))] for _ in range(n)], rng.integers(0, 5, n),
                                 1_700_000_000_000 + np.cumsum(rng.integers(1_000, 10 ** 7, n)),
                                 devices=["ios"] * n, locations=["de"] * n)


def _batch(cfg, seqs, max_len=None):
    return collate([encode(s, VOCAB, cfg, max_len=max_len) for s in seqs])


@pytest.mark.parametrize("backbone", ["llama", "gpt2", "bert", "gru"])
def test_shapes_and_loss(backbone):
    torch.manual_seed(0)
    cfg = _cfg(backbone=backbone)
    m = NextActionModel(cfg)
    b = _batch(cfg, [_seq(9, 1), _seq(3, 2), _seq(1, 3)], max_len=cfg.max_len + 1)  # training windows
    out, loss = m(b)
    assert out["hidden"].shape == (3, cfg.max_len, 32)
    assert out["action_logits"].shape == (3, cfg.max_len, len(ACTIONS))
    assert out["gap_pred"].shape == (3, cfg.max_len)
    assert int(out["n_targets"]) == 8 + 2 + 0 and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    if backbone == "gru":  # causal only: masked pretraining needs bidirectional attention
        with pytest.raises(ValueError, match="causal only"):
            m(b, objective="masked")
    else:
        _, mloss = m(b, objective="masked")
        assert torch.isfinite(mloss)
    m.eval()
    s = m.score_last(_batch(cfg, [_seq(5, 4), _seq(2, 5)]))
    assert s["item_scores"].shape == (2, len(VOCAB)) and s["action_probs"].shape == (2, 5)
    assert s["gap_log_s"].shape == (2,)
    assert torch.allclose(s["action_probs"].sum(-1), torch.ones(2))
    assert torch.isinf(s["item_scores"][:, :2]).all()  # padding and mask are never predicted


@pytest.mark.parametrize("backbone", ["llama", "gpt2", "bert", "gru"])
def test_causality(backbone):
    """Changing a future event never changes an earlier position's output (all heads)."""
    torch.manual_seed(0)
    cfg = _cfg(backbone=backbone)
    m = NextActionModel(cfg).eval()
    s = _seq(8, 7)
    changed = EventSeq.from_columns(s.items[:5] + ["i11", "i0", "i3"], list(s.actions[:5]) + [4, 4, 4],
                                    list(s.ts[:5]) + [int(s.ts[4]) + 5, int(s.ts[4]) + 9, int(s.ts[4]) + 99],
                                    devices=["web"] * 8)
    changed = EventSeq(changed.items, changed.actions, changed.ts, s.devices[:5] + ["web"] * 3,
                       s.locations, s.categories)
    b1, b2 = _batch(cfg, [s]), _batch(cfg, [changed])
    with torch.no_grad():
        h1, h2 = m.hidden(b1), m.hidden(b2)
        torch.testing.assert_close(h1[:, :5], h2[:, :5])
        assert not torch.allclose(h1[:, 5:], h2[:, 5:])
        # the full prediction for a prefix is unchanged by what follows it
        p1 = m.score_last(_batch(cfg, [s[:5]]))
        p2 = m.score_last(_batch(cfg, [changed[:5]]))
        torch.testing.assert_close(p1["item_scores"], p2["item_scores"])
        if backbone == "gru":
            return
        # the masked objective's bidirectional pass does see the future
        hb1, hb2 = m.hidden(b1, bidirectional=True), m.hidden(b2, bidirectional=True)
        assert not torch.allclose(hb1[:, :5], hb2[:, :5])


def test_gru_baseline_is_served_by_full_recomputation():
    """The GRU4Rec-style baseline runs through the same predictor, with the KV cache off; the config
    refuses it the masked objective."""
    from models.serving import TransformerPredictor
    from models.errors import ConfigError

    torch.manual_seed(0)
    m = NextActionModel(_cfg(backbone="gru")).eval()
    p = TransformerPredictor(m, VOCAB, version="gru", device="cpu", num_threads=1)
    assert not p.incremental and not p.cache.enabled
    hist = [_seq(6, 1), _seq(2, 2)]
    preds = p.predict(hist, k=3, users=["a", "b"])
    with torch.no_grad():
        ref = m.score_last(_batch(m.cfg, hist))["item_scores"][:, VOCAB.first_item:]
    assert [[i for i, _ in pr.top_items] for pr in preds] == [[VOCAB.items[int(j)] for j in row]
                                                              for row in ref.topk(3).indices]
    with pytest.raises(ConfigError, match="causal only"):
        _cfg(backbone="gru", objective="masked_then_causal")


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    cfg = _cfg()
    m = NextActionModel(cfg).eval()
    s = _seq(4, 9)
    with torch.no_grad():
        alone = m.score_last(_batch(cfg, [s]))
        padded = m.score_last(_batch(cfg, [s, _seq(8, 10)]))
    torch.testing.assert_close(alone["item_scores"][0], padded["item_scores"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_incremental_equals_full_recomputation(backbone):
    """prefill + one step per event == score_last on the whole history, for a batch of users
    with different lengths, including split/stack of per-user states (as an LRU cache does)."""
    torch.manual_seed(0)
    cfg = _cfg(backbone=backbone)
    m = NextActionModel(cfg).eval()
    users = [_seq(8, 11), _seq(5, 12), _seq(7, 13)]
    start = [2, 1, 4]
    _, state = m.prefill(_batch(cfg, [u[:k] for u, k in zip(users, start)]))
    per_user = state.split()
    n = [k for k in start]
    for _ in range(4):
        active = [i for i, u in enumerate(users) if n[i] < len(u)]
        st = KVState.stack([per_user[i] for i in active])
        tok = collate([encode_last(users[i][: n[i] + 1], VOCAB, cfg) for i in active])
        out, st = m.step(tok, st)
        with torch.no_grad():
            full = m.score_last(_batch(cfg, [users[i][: n[i] + 1] for i in active]))
        for key in ("item_scores", "action_probs", "gap_log_s"):
            torch.testing.assert_close(out[key], full[key], atol=1e-4, rtol=1e-4)
        for j, i in enumerate(active):
            per_user[i] = st.split()[j]
            n[i] += 1
    assert per_user[0].nbytes() > 0


def test_step_on_full_window_needs_evict_and_stays_close():
    torch.manual_seed(0)
    cfg = _cfg()
    m = NextActionModel(cfg).eval()
    s = _seq(12, 21)
    _, state = m.prefill(_batch(cfg, [s[:8]]))
    with pytest.raises(ValueError, match="max_len"):
        m.step(collate([encode_last(s[:9], VOCAB, cfg)]), state)
    out, state = m.step(collate([encode_last(s[:9], VOCAB, cfg)]), state, evict=True)
    assert int(state.lengths[0]) == cfg.max_len and int(state.positions[0]) == 9
    with torch.no_grad():
        full = m.score_last(_batch(cfg, [s[:9]]))
    # sliding-window approximation: close, not identical (cached states remember the evicted token)
    assert torch.corrcoef(torch.stack([out["item_scores"][0, 2:], full["item_scores"][0, 2:]]))[0, 1] > 0.9


def test_item_rows_with_categories_are_cached_for_serving_and_follow_weight_changes():
    vocab = ItemVocab([f"i{k}" for k in range(15)], n_hash_buckets=4)
    torch.manual_seed(0)
    m = NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=8, max_len=4,
                                    item_categories=True, n_category_buckets=8)).eval()
    m.set_item_categories(np.arange(len(vocab)) % 5)
    with torch.inference_mode():
        a = m.item_vectors()
        assert m.item_vectors() is a  # cached
    with torch.no_grad():
        m.cat_emb.weight.add_(1.0)  # an update (e.g. a reload) bumps the version: recomputed
        b = m.item_vectors()
    assert b is not a
    torch.testing.assert_close(b, m.item_emb.weight + m.cat_emb(m.item_category))


def test_a_delta_grows_the_tables_and_the_serving_caches_follow():
    from models.delta import ModelDelta

    vocab = ItemVocab([f"i{k}" for k in range(15)], n_hash_buckets=4)
    torch.manual_seed(0)
    m = NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=8, n_heads=2, max_len=4,
                                    item_categories=True, n_category_buckets=8, transition_weight=1.0)).eval()
    m.set_item_categories(np.arange(len(vocab)) % 5)
    m.set_untrained_items([7], [vocab.bucket("i3")])
    with torch.inference_mode():
        rows, (table, _) = m.item_vectors(), m._item_table(torch.bfloat16)
    weight = m.item_emb.weight
    d = ModelDelta("v", 1, 0, [7, 19, 20], ["i1", "n0", "n1"], np.ones((3, 8)), [1.0, 2.0, 3.0], [0, 4, 8],
                   trans_rows=[20], trans_ptr=[0, 2], trans_idx=[7, 19], trans_val=[0.5, 0.25],
                   action_bias=np.arange(5.0), calibration=(1.5, (0.0, 0.1, 0.2, 0.3, 0.4)))
    m.apply_delta(d)
    assert m.cfg.n_items == 21 and m.item_emb.weight is weight and m.item_emb.weight.shape == (21, 8)
    assert m.item_bias.shape == (21,) and m.item_category.tolist()[19:] == [4, 8]
    assert m.item_input.tolist()[6:] == list(range(6, 21))  # delta rows read their own row (7 read a bucket)
    assert m.trans_ptr.tolist() == [0] * 21 + [2] and m.uses_transitions  # a table where there was none
    assert (m.cfg.action_temperature, m.cfg.action_bias[1]) == (1.5, 0.1)
    assert m.action_head.bias.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with torch.inference_mode():
        rows2, (table2, bias2) = m.item_vectors(), m._item_table(torch.bfloat16)
    assert rows2.shape == (21, 8) and table2.shape == (21, 8) and bias2[20].item() == 3.0
    torch.testing.assert_close(rows2, m.item_emb.weight + m.cat_emb(m.item_category))
    assert torch.equal(rows2[:7], rows[:7]) and not torch.equal(rows2[7], rows[7]) and table2 is not table
    with pytest.raises(ValueError, match=r"trans_idx must be item rows in \[6, 21\)"):
        m.apply_delta(ModelDelta("v", 2, 1, [], [], np.zeros((0, 8)), [], [], trans_rows=[8], trans_ptr=[0, 1],
                                 trans_idx=[21], trans_val=[1.0]))
    assert m.cfg.n_items == 21 and m.trans_ptr[-1].item() == 2  # refused: unchanged


def _pattern_seqs(n_users: int, length: int, rng) -> list[EventSeq]:
    """Deterministic item cycles (i -> i+1 mod 12) and an action funnel view→click→cart→purchase."""
    out = []
    for _ in range(n_users):
        a0, i0 = rng.integers(4), rng.integers(12)
        items = [ITEMS[(i0 + t) % 12] for t in range(length)]
        acts = [(a0 + t) % 4 + (1 if (a0 + t) % 4 == 3 else 0) for t in range(length)]  # 0,1,2,4
        ts = 1_700_000_000_000 + np.arange(length) * 60_000
        out.append(EventSeq.from_columns(items, acts, ts))
    return out


@pytest.mark.slow  # trains for 80 steps (1-2 s, more on a shared CPU)
def test_learns_synthetic_pattern_quickly():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = _cfg(max_len=8, d_model=32, dropout=0.0)
    m = NextActionModel(cfg)
    seqs = _pattern_seqs(256, 9, rng)
    batch = _batch(cfg, seqs, max_len=cfg.max_len + 1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for _ in range(80):  # ~4 s on one idle core
        _, loss = m(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert time.perf_counter() - t0 < 120  # generous: the CI CPU is shared
    m.eval()
    test = _pattern_seqs(64, 6, rng)
    with torch.no_grad():
        out = m.score_last(_batch(cfg, test))
    # ground truth: the next item and action after each test history
    nxt_item = [VOCAB.index(ITEMS[(ITEMS.index(s.items[-1]) + 1) % 12]) for s in test]
    funnel = {0: 1, 1: 2, 2: 4, 4: 0}
    nxt_act = [funnel[int(s.actions[-1])] for s in test]
    item_acc = (out["item_scores"].argmax(-1).numpy() == np.array(nxt_item)).mean()
    act_acc = (out["action_probs"].argmax(-1).numpy() == np.array(nxt_act)).mean()
    assert item_acc >= 0.95, item_acc
    assert act_acc >= 0.95, act_acc


def test_sampled_softmax_and_no_repeat_head_train():
    torch.manual_seed(0)
    cfg = _cfg(n_negatives=5, repeat_head=False)
    m = NextActionModel(cfg)
    _, loss = m(_batch(cfg, [_seq(9, 1), _seq(4, 2)], max_len=cfg.max_len + 1))
    loss.backward()
    assert torch.isfinite(loss)
    cfg2 = _cfg(n_negatives=5)
    _, loss2 = NextActionModel(cfg2)(_batch(cfg2, [_seq(9, 1)], max_len=cfg2.max_len + 1))
    assert torch.isfinite(loss2)


def test_action_prior_is_a_per_current_action_logit_row_on_every_serving_path():
    """``action_prior``: next-action logits get the learned row of the *current* event's action —
    the same in training positions, score_last, prefill and step."""
    torch.manual_seed(0)
    cfg = _cfg(action_prior=True)
    m = NextActionModel(cfg).eval()
    users = [_seq(6, 21), _seq(4, 22)]
    before = m.score_last(_batch(cfg, users))["action_probs"]
    with torch.no_grad():
        m.action_prior.weight.normal_(0, 2.0)
        full = m.score_last(_batch(cfg, users))
        outputs, _ = m(_batch(cfg, users))
    assert not torch.allclose(before, full["action_probs"])
    ar = torch.arange(2)
    last = torch.tensor([5, 3])
    torch.testing.assert_close(torch.softmax(outputs["action_logits"][ar, last], -1), full["action_probs"],
                               atol=1e-5, rtol=1e-5)  # training positions see the same prior
    pre, state = m.prefill(_batch(cfg, [u[:-1] for u in users]))
    out, _ = m.step(collate([encode_last(u, VOCAB, cfg) for u in users]), state)
    torch.testing.assert_close(out["action_probs"], full["action_probs"], atol=1e-4, rtol=1e-4)


def test_a_bf16_scan_with_exact_rescoring_gives_the_fp32_top_k():
    """A catalogue of 5,000 items with a coarse bf16 scan (what serving does on bf16 CPUs and CUDA):
    the top 10 of the best 10 + 32, rescored in fp32, are the fp32 scan's top 10 with its scores;
    the bf16 scores alone are not (they are rounded to ~3 significant digits)."""
    vocab = ItemVocab((f"it{k}" for k in range(5000)), n_hash_buckets=16)
    cfg = ModelConfig(n_items=len(vocab), n_hash_buckets=16, d_model=32, max_len=20, dropout=0.0,
                      item_categories=True, n_category_buckets=64)
    torch.manual_seed(3)
    m = NextActionModel(cfg).eval()
    m.set_item_categories(np.arange(len(vocab)) % 65)
    with torch.no_grad():
        m.item_emb.weight.mul_(4.0)  # spread the scores, as training does
    rng = np.random.default_rng(4)
    hists = [EventSeq.from_columns([f"it{i}" for i in rng.integers(0, 5000, n)], rng.integers(0, 5, n),
                                   1_700_000_000_000 + 60_000 * np.arange(n)) for n in rng.integers(1, 20, 64)]
    batch = collate([encode(h, vocab, cfg) for h in hists])
    first = vocab.first_item
    with torch.inference_mode():  # as served: the bf16 table is cached across calls
        ref_s, ref_i = torch.topk(m.score_last(batch)["item_scores"][:, first:], 10, dim=1)
        out = m.score_last(batch, k=10, coarse=torch.bfloat16)
        assert torch.equal(out["top_items"], ref_i + first)
        torch.testing.assert_close(out["top_scores"], ref_s, rtol=0, atol=1e-5)
        last, _ = m.prefill(batch, heads=False)
        coarse = m.item_logits(last.h, last.rep, last.hist, last.item, dtype=torch.bfloat16)[:, first:]
        assert (coarse.float().gather(1, ref_i) != ref_s).any()  # the rescoring is what makes it exact
        _, no_margin, _ = m.top_items(last.h, last.rep, last.hist, last.item, 10, coarse=torch.bfloat16, margin=0)
        assert not torch.equal(no_margin, ref_i + first)  # and the margin: bf16 alone misorders some
        assert torch.equal(m.score_last(batch, k=10, coarse=torch.bfloat16)["top_items"], out["top_items"])
    with torch.no_grad():  # an online update changes the rows: the cached copies follow
        m.cat_emb.weight.add_(1.0)
        m.item_bias[first + 7] += 1000.0
    with torch.inference_mode():
        out = m.score_last(batch, k=10, coarse=torch.bfloat16)
        assert torch.equal(out["top_items"], torch.topk(m.score_last(batch)["item_scores"][:, first:], 10).indices + first)
        assert bool((out["top_items"] == first + 7).any())


def _catalogue_model(n_items: int = 5000, seed: int = 3):
    """A model over ``n_items`` known items with spread scores, repeat head and a transition table,
    and a batch of 64 histories of 1..19 events: what the probabilities are checked on."""
    from models.transitions import count_transitions

    vocab = ItemVocab((f"it{k}" for k in range(n_items)), n_hash_buckets=16)
    cfg = ModelConfig(n_items=len(vocab), n_hash_buckets=16, d_model=32, max_len=20, dropout=0.0,
                      transition_weight=2.0)
    torch.manual_seed(seed)
    m = NextActionModel(cfg).eval()
    rng = np.random.default_rng(seed)
    hists = [EventSeq.from_columns([f"it{i}" for i in rng.integers(0, 60, n)], rng.integers(0, 5, n),
                                   1_700_000_000_000 + 60_000 * np.arange(n)) for n in rng.integers(1, 20, 64)]
    with torch.no_grad():
        m.item_emb.weight.mul_(4.0)  # spread the scores, as training does
        m.item_bias.normal_(0, 1.0)
        m.rep_recency.weight.normal_(0, 1.0)  # repeat scores that matter
    m.set_transitions(count_transitions([vocab.indices(h.items) for h in hists], len(vocab), top=20)
                      .with_feature("log"))
    assert m.uses_transitions
    return m, vocab, hists, collate([encode(h, vocab, cfg) for h in hists])


def test_top_items_carry_the_full_softmax_probability_of_the_next_item():
    """The contract (docs/contract.md): each top item's probability is its softmax probability over
    every known item, repeat and transition scores included, the normaliser computed in the same
    pass; on the fp32 path it is exact (to fp32 rounding), on every serving path (full, prefill,
    step); the items not returned hold the rest of the mass."""
    m, vocab, hists, batch = _catalogue_model()
    first = vocab.first_item
    with torch.inference_mode():
        full = m.score_last(batch)
        known = full["item_scores"][:, first:].double()
        ref = torch.log_softmax(known, 1)  # the distribution training's full softmax fits
        torch.testing.assert_close(full["item_log_norm"].double(), torch.logsumexp(known, 1), rtol=0, atol=1e-4)
        ref_p, ref_i = torch.topk(ref.exp(), 10, dim=1)
        out = m.score_last(batch, k=10)
        probs = top_probs(out["top_scores"], out["item_log_norm"])  # (64, 10) float64
        assert torch.equal(out["top_items"], ref_i + first)
        np.testing.assert_allclose(probs, ref_p.numpy(), rtol=1e-5, atol=1e-9)
        assert probs.max() <= 1.0 and (probs > 0).all() and (probs.sum(1) <= 1 + 1e-6).all()
        assert (np.diff(probs, axis=1) <= 0).all()  # best first
        everything = m.score_last(batch, k=len(vocab))  # every known item: the probabilities sum to 1
        np.testing.assert_allclose(top_probs(everything["top_scores"], everything["item_log_norm"]).sum(1), 1.0,
                                   rtol=0, atol=1e-5)
        longer = [j for j, h in enumerate(hists) if len(h) >= 2]  # the KV-cache path: prefill, then step
        _, state = m.prefill(collate([encode(hists[j][:-1], vocab, m.cfg) for j in longer]))
        step = m.step(collate([encode_last(hists[j], vocab, m.cfg) for j in longer]), state, heads=False)[0]
        inc = m.heads(step, 10)
        assert torch.equal(inc["top_items"], out["top_items"][longer])
        np.testing.assert_allclose(top_probs(inc["top_scores"], inc["item_log_norm"]), probs[longer], rtol=1e-4,
                                   atol=1e-6)


def test_a_bf16_scan_normaliser_is_within_its_documented_bound():
    """With a bf16 catalogue scan, the normaliser adds the rescored candidates' exact terms to the
    other items' scanned terms: its error is at most (the largest scan error among the other items)
    x (their share of the probability mass), and so is each probability's relative error."""
    m, vocab, _, batch = _catalogue_model(seed=5)
    first = vocab.first_item
    with torch.inference_mode():
        last, _ = m.prefill(batch, heads=False)
        exact = m.item_logits(last.h, last.rep, last.hist, last.item)[:, first:].double()
        coarse = m.item_logits(last.h, last.rep, last.hist, last.item, dtype=torch.bfloat16)[:, first:].double()
        s, idx, log_norm = m.top_items(last.h, last.rep, last.hist, last.item, 10, coarse=torch.bfloat16)
        true_norm = torch.logsumexp(exact, 1)
        cand = torch.topk(coarse, 10 + 32, dim=1).indices  # the candidates it rescored
        rest = torch.ones_like(exact, dtype=torch.bool).scatter_(1, cand, False)
        delta = ((coarse - exact).abs() * rest).amax(1)
        rest_mass = (torch.softmax(exact, 1) * rest).sum(1)
        err = (log_norm.double() - true_norm).abs()
        assert bool((err <= delta * rest_mass + 1e-5).all()), (err.max(), (delta * rest_mass).max())
        assert float(err.max()) > 0  # the bf16 scan does leave an error (else the test proves nothing)
        probs = torch.exp(s.double() - log_norm.double()[:, None])
        ref = torch.exp(exact.gather(1, idx - first) - true_norm[:, None])
        torch.testing.assert_close(probs, ref, rtol=float(err.max()) * 1.01 + 1e-6, atol=0)


def test_an_item_temperature_flattens_the_probabilities_and_keeps_the_ranking():
    """``item_temperature`` (fitted on validation: models.calibration.ItemTemperatureFit) serves
    ``softmax(scores / T)`` on every path: the full scores, the fp32 and the bf16-scan top-K, the KV
    cache's step; the top items and their order do not change."""
    import dataclasses

    m, vocab, hists, batch = _catalogue_model(seed=3)
    first = vocab.first_item
    with torch.inference_mode():
        raw = m.score_last(batch)["item_scores"][:, first:].double()
        before = m.score_last(batch, k=10)
        m.cfg = dataclasses.replace(m.cfg, item_temperature=3.0)
        ref_p, ref_i = torch.topk(torch.softmax(raw / 3.0, 1), 10, dim=1)
        full = m.score_last(batch)
        torch.testing.assert_close(full["item_scores"][:, first:].double(), raw / 3.0, rtol=1e-5, atol=1e-5)
        out = m.score_last(batch, k=10)
        assert torch.equal(out["top_items"], before["top_items"]) and torch.equal(out["top_items"], ref_i + first)
        probs = top_probs(out["top_scores"], out["item_log_norm"])
        np.testing.assert_allclose(probs, ref_p.numpy(), rtol=1e-5, atol=1e-9)
        assert probs[:, 0].mean() < top_probs(before["top_scores"], before["item_log_norm"])[:, 0].mean()
        coarse = m.score_last(batch, k=10, coarse=torch.bfloat16)
        np.testing.assert_allclose(top_probs(coarse["top_scores"], coarse["item_log_norm"]), ref_p.numpy(),
                                   rtol=2e-2, atol=1e-6)
        longer = [j for j, h in enumerate(hists) if len(h) >= 2]
        _, state = m.prefill(collate([encode(hists[j][:-1], vocab, m.cfg) for j in longer]))
        step = m.step(collate([encode_last(hists[j], vocab, m.cfg) for j in longer]), state, heads=False)[0]
        inc = m.heads(step, 10)
        np.testing.assert_allclose(top_probs(inc["top_scores"], inc["item_log_norm"]), probs[longer], rtol=1e-4,
                                   atol=1e-6)
