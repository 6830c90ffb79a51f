"""models.explain: attribution by occlusion (batched == one by one), the deliberately built case where one
past event drives the prediction, empty histories, and faithfulness on a small trained model.

The trained model is real: a small Transformer trained here (a few seconds of Adam on CPU) on a rule
it must learn from the data: the next action is ``purchase`` when the user put something in the cart
earlier in the window, else ``view``. Nothing about the rule is given to the explanation code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.encoding import ItemVocab, collate, encode
from models.explain import (ContextWeight, EventWeight, Explanation, _action_probs, explain, explain_batch,
                            explain_gradient, explain_one_by_one, format_why, target_probs)
from models.model import NextActionModel
from models.schema import ACTION_INDEX, EventSeq

ITEMS = [f"i{k}" for k in range(30)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)
T0 = 1_700_000_000_000
LEN = 6  # training windows: 6 events, then the target action


def _model(seed: int = 0, **kw) -> NextActionModel:
    base = dict(n_items=len(VOCAB), n_hash_buckets=4, max_len=8, d_model=16, n_heads=2, dropout=0.0,
                n_device_buckets=8, n_location_buckets=8)
    base.update(kw)
    torch.manual_seed(seed)
    return NextActionModel(ModelConfig(**base)).eval()


def _history(rng, n: int, cart_at: int | None = None, devices: bool = False) -> EventSeq:
    acts = ["view"] * n
    if cart_at is not None:
        acts[cart_at] = "cart"
    ts = T0 + np.cumsum(rng.integers(10_000, 3_600_000, n))
    dev = [str(rng.choice(["ios", "web", "android"])) for _ in range(n)] if devices else None
    loc = [str(rng.choice(["de", "fr"])) for _ in range(n)] if devices else None
    return EventSeq.from_columns([ITEMS[k] for k in rng.integers(0, 30, n)], acts, ts, devices=dev, locations=loc)


# ----------------------------------------------------------------------------- the action head
def test_action_probs_equal_score_last_with_prior_and_calibration():
    m = _model(action_prior=True, action_temperature=0.8, action_bias=(0.1, -0.2, 0.3, 0.0, 0.5))
    with torch.no_grad():
        m.action_prior.weight.normal_()  # a non-zero prior: the path must be the model's
    rng = np.random.default_rng(1)
    hs = [_history(rng, n, devices=True) for n in (1, 3, 8, 11)]
    batch = collate([encode(h, VOCAB, m.cfg) for h in hs])
    with torch.no_grad():
        ref = m.score_last(batch)["action_probs"]
        ours = target_probs(m, batch, "action")
        ref_items = torch.exp(m.score_last(batch)["item_scores"] - m.score_last(batch)["item_log_norm"][:, None])
        ours_items = target_probs(m, batch, "item")
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_items[:, m.first_item:], ref_items[:, m.first_item:], atol=1e-6, rtol=1e-4)
    assert _action_probs(m, torch.zeros(2, 16), torch.zeros(2, dtype=torch.long)).shape == (2, 5)


# ----------------------------------------------------------------------------- batched == one by one
@pytest.mark.parametrize("target", ["action", "item"])
@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_batched_occlusion_agrees_with_one_by_one(target, backbone):
    m = _model(seed=3, backbone=backbone, action_prior=True)
    rng = np.random.default_rng(2)
    # 1 event, a short window, a window that starts at the user's first event, one cut from a longer history
    hs = [_history(rng, n, devices=True) for n in (1, 2, 5, 8, 13)]
    batched = explain_batch(m, VOCAB, hs, target=target, top=8, max_rows=7)  # several passes of mixed lengths
    for h, b in zip(hs, batched):
        ref = explain_one_by_one(m, VOCAB, h, target=target, top=8)
        assert b.label == ref.label
        assert b.prob == pytest.approx(ref.prob, abs=1e-6)
        np.testing.assert_allclose(b.weights, ref.weights, atol=2e-6)
        assert [c.feature for c in b.context] == [c.feature for c in ref.context] == ["hour", "dow", "device",
                                                                                         "location"]
        np.testing.assert_allclose([c.weight for c in b.context], [c.weight for c in ref.context], atol=2e-6)
        assert [e.offset_in_history for e in b.events] == [e.offset_in_history for e in ref.events]
        assert len(b.weights) == min(len(h), 8)
        assert any(abs(w) > 1e-5 for w in b.weights)  # removals change something (the test can fail)


def test_explanation_names_events_by_weight_and_offsets_count_back_from_the_newest():
    m = _model(seed=4)
    h = _history(np.random.default_rng(5), 6)
    e = explain(m, VOCAB, h, top=2)
    pos = [j for j in np.argsort(-np.asarray(e.weights), kind="stable") if e.weights[j] > 0][:2]
    assert [ev.offset_in_history for ev in e.events] == [len(h) - 1 - j for j in pos]
    for ev in e.events:
        k = len(h) - 1 - ev.offset_in_history
        assert (ev.item_id, ev.ts) == (h.items[k], int(h.ts[k]))
    assert explain(m, VOCAB, h, top=0).events == []


def test_empty_history_has_no_attributions():
    m = _model()
    for method in ("occlusion", "gradient"):
        e = explain(m, VOCAB, EventSeq.empty(), method=method)
        assert (e.events, e.context, e.weights) == ([], [], [])
    out = explain_batch(m, VOCAB, [EventSeq.empty(), _history(np.random.default_rng(0), 3)])
    assert out[0].weights == [] and len(out[1].weights) == 3


def test_bad_arguments_name_the_value():
    m = _model()
    h = _history(np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="'lime'"):
        explain(m, VOCAB, h, method="lime")
    with pytest.raises(ValueError, match="'user'"):
        explain(m, VOCAB, h, target="user")
    with pytest.raises(ValueError, match="-1"):
        explain(m, VOCAB, h, top=-1)


def test_context_only_for_features_the_model_reads_and_knows():
    m = _model(features=("item", "action", "gap", "hour"))
    h = _history(np.random.default_rng(0), 4, devices=True)
    assert [c.feature for c in explain(m, VOCAB, h).context] == ["hour"]
    m2 = _model()
    h2 = _history(np.random.default_rng(0), 4)  # no device, no location known
    assert [c.feature for c in explain(m2, VOCAB, h2).context] == ["hour", "dow"]
    assert explain(m2, VOCAB, h2, context=False).context == []


def test_format_why_names_only_supporting_context():
    e = Explanation("action", "cart", 0.5, "occlusion", [0.2], [EventWeight(0, "X", "view", 0, 0.2)],
                    [ContextWeight("device", "mobile", -0.1), ContextWeight("location", "de", 0.01)], now_ts=0)
    assert format_why(e) == "likely to add to cart: viewed X now; de"
    assert e.to_json()["context"] == {"device": {"value": "mobile", "weight": -0.1},
                                      "location": {"value": "de", "weight": 0.01}}


# ----------------------------------------------------------------------------- a small trained model
def _train_cart_rule(seed: int = 0, steps: int = 120) -> NextActionModel:
    """A model trained on: next action = purchase iff a cart event is in the window (loss on the last position)."""
    m = _model(seed=seed, backbone="gpt2", features=("item", "action", "gap"))
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        hs, ys = [], []
        for _ in range(32):
            cart = rng.random() < 0.5
            hs.append(_history(rng, LEN, int(rng.integers(0, LEN)) if cart else None))
            ys.append(ACTION_INDEX["purchase" if cart else "view"])
        p = target_probs(m, collate([encode(h, VOCAB, m.cfg) for h in hs]), "action")
        loss = torch.nn.functional.nll_loss(torch.log(p + 1e-9), torch.tensor(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def cart_model() -> NextActionModel:
    return _train_cart_rule()


@pytest.mark.slow
def test_the_event_that_drives_the_prediction_is_named_first(cart_model):
    rng = np.random.default_rng(11)
    for at in range(LEN):
        h = _history(rng, LEN, cart_at=at)
        e = explain(cart_model, VOCAB, h, top=1)
        assert e.label == "purchase" and e.prob > 0.8, (at, e)
        assert [(ev.offset_in_history, ev.action) for ev in e.events] == [(LEN - 1 - at, "cart")], (at, e)
        assert e.events[0].weight > 0.5  # without the cart, purchase is no longer likely
        assert "added " in e.text and " to cart" in e.text


def test_gradient_weight_is_the_derivative_of_the_probability_in_the_token_input():
    """Input × gradient = d p / d alpha_t at alpha_t = 1, where token t's embedding (after the norm) is scaled by
    alpha_t: checked by central finite differences through forward passes only. (On the saturated
    cart model, p = 0.9996, the gradients vanish and name no event: the reason occlusion serves.)"""
    m = _model(seed=6, action_prior=True)
    with torch.no_grad():
        m.action_head.weight.mul_(6.0)  # a head that reacts to its input (an untrained one barely does)
    h = _history(np.random.default_rng(7), 5, devices=True)
    g = explain_gradient(m, VOCAB, h)
    w = ACTION_INDEX[g.label]
    batch = collate([encode(h, VOCAB, m.cfg)])
    eps = 1e-3

    def p_scaled(t: int, alpha: float) -> float:
        def scale(_m, _args, out):
            x = out.clone()
            x[:, t] *= alpha
            return x
        hook = m.emb_norm.register_forward_hook(scale)
        try:
            with torch.no_grad():
                return float(target_probs(m, batch, "action")[0, w].double())
        finally:
            hook.remove()

    fd = [(p_scaled(t, 1 + eps) - p_scaled(t, 1 - eps)) / (2 * eps) for t in range(5)]
    np.testing.assert_allclose(g.weights, fd, atol=1e-4, rtol=2e-2)
    assert max(abs(x) for x in fd) > 1e-3


@pytest.mark.slow
def test_removing_the_named_event_changes_the_probability_more_than_a_random_one(cart_model):
    """Faithfulness as the benchmark measures it (benchmarks/explain_faithfulness.py), on histories
    with and without a cart: the drop of the explained target's probability when the top-named
    event is removed vs when a random past event is."""
    rng = np.random.default_rng(13)
    named, rand = [], []
    for i in range(40):
        h = _history(rng, LEN, cart_at=int(rng.integers(0, LEN)) if i % 2 else None)
        e = explain(cart_model, VOCAB, h, top=1)
        j_named = int(np.argmax(e.weights))
        j_rand = int(rng.integers(0, LEN))
        named.append(abs(e.weights[j_named]))
        rand.append(abs(e.weights[j_rand]))
    assert np.mean(named) > 2 * np.mean(rand) and np.mean(named) > 0.2
