"""models.serving: incremental (KV cache) == full recomputation, LRU bounds, swap, fallback, devices.

A tiny seeded model is written to a real checkpoint in ``tmp_path`` with models.checkpoint and served
through :class:`TransformerPredictor`. The reference for every comparison is the model's own
``score_last`` on ``collate(encode(history))`` — full recomputation, computed independently of the
serving code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.encoding import ItemVocab, collate, encode
from models.model import NextActionModel
from models.schema import EventSeq
from models.devices import cpu_has_native_bf16, resolve_score_dtype
from models.errors import ConfigError
from models.kv_cache import KVCache, window_key
from models.serving import TransformerPredictor, length_buckets

ITEMS = [f"i{k}" for k in range(40)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)
MAX_LEN = 8
T0 = 1_700_000_000_000


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> ModelConfig:
    base = dict(n_items=len(VOCAB), n_hash_buckets=4, max_len=MAX_LEN, d_model=32, n_heads=2, dropout=0.0,
                n_device_buckets=8, n_location_buckets=8)
    base.update(kw)
    return ModelConfig(**base)


def _model(seed: int = 0, **kw) -> NextActionModel:
    torch.manual_seed(seed)
    m = NextActionModel(_cfg(**kw)).eval()
    with torch.no_grad():  # make the otherwise zero-initialised parts matter too
        m.item_bias.normal_(0, 0.5)
        if m.cfg.repeat_head:
            m.rep_recency.weight.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "v1", _model(0), VOCAB)


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "v2", _model(1), VOCAB)


def _reference(model: NextActionModel, histories: list[EventSeq], k: int):
    """Full recomputation: (top ids, their probabilities: the softmax over the known items, action
    probs, gap log) per history."""
    with torch.no_grad():
        o = model.score_last(collate([encode(h, VOCAB, model.cfg) for h in histories]))
    s, i = torch.topk(torch.softmax(o["item_scores"][:, VOCAB.first_item:].double(), 1), k, dim=1)
    return i.numpy(), s.numpy(), o["action_probs"].numpy(), o["gap_log_s"].numpy()


def _assert_matches(model, histories, preds, k, atol=1e-4):
    ids, scores, probs, gaps = _reference(model, histories, k)
    for b, p in enumerate(preds):
        assert [it for it, _ in p.top_items] == [ITEMS[i] for i in ids[b]]
        np.testing.assert_allclose([s for _, s in p.top_items], scores[b], atol=atol, rtol=1e-4)
        np.testing.assert_allclose(p.action_probs, probs[b], atol=atol)
        np.testing.assert_allclose(np.log1p(p.next_gap_s), np.clip(gaps[b], 0, 30), atol=atol)


def _event(rng, ts: int) -> dict:
    return dict(item=ITEMS[int(rng.integers(len(ITEMS)))], action=int(rng.integers(5)), ts=ts,
                device=["ios", "web", ""][int(rng.integers(3))], location=["de", "fr"][int(rng.integers(2))])


@pytest.mark.parametrize("score_dtype", ["float32", "bfloat16"])
def test_incremental_equals_full_over_interleaved_stream(ckpt, score_dtype):
    """Interleaved users in random batch sizes (a user's consecutive events often share a batch),
    windows overflowing max_len, and out-of-order events (a rebuild): every output equals full
    recomputation (an fp32 scan), with either catalogue-scan precision."""
    p = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1, score_dtype=score_dtype)
    assert len(p.version) == 12 and int(p.version, 16) >= 0
    rng = np.random.default_rng(7)
    users = [f"u{u}" for u in range(6)]
    hist = {u: EventSeq.empty() for u in users}
    ts, n_ooo, k = T0, 0, 5
    for _ in range(14):
        batch, ids = [], []
        for _ in range(int(rng.integers(1, 12))):
            u = users[int(rng.integers(len(users)))]
            ts += int(rng.integers(1_000, 5_000_000))
            e = _event(rng, ts)
            if len(hist[u]) >= 3 and rng.random() < 0.1:  # late event: inserted before the end
                e["ts"] = int(hist[u].ts[-2]) - 1
                n_ooo += 1
            hist[u] = hist[u].appended(e["item"], e["action"], e["ts"], e["device"], e["location"])
            batch.append(hist[u])
            ids.append(u)
        preds = p.predict(batch, k, users=ids)
        _assert_matches(p.model, batch, preds, k)
    info = p.cache_info()
    assert max(len(h) for h in hist.values()) > 2 * MAX_LEN  # windows overflowed
    assert n_ooo > 0 and info["steps"] > 30 and info["prefills"] > len(users)
    assert info["entries"] <= len(users)  # one entry per user


def test_incremental_equals_full_with_a_transition_table(tmp_path):
    """The transition scores of the last item are added on the step, prefill and full paths alike."""
    from models.transitions import count_transitions

    model = _model(3, transition_weight=1.5)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(VOCAB.first_item, len(VOCAB), 20) for _ in range(40)]
    model.set_transitions(count_transitions(seqs, len(VOCAB), top=6, first_item=VOCAB.first_item).with_feature("prob"))
    p = TransformerPredictor.from_checkpoint(save_checkpoint(tmp_path / "ck", model, VOCAB), device="cpu",
                                             num_threads=1)
    assert p.model.uses_transitions
    hist = {u: EventSeq.empty() for u in ("a", "b", "c")}
    ts, k = T0, 6
    for _ in range(12):
        batch, ids = [], []
        for u in rng.permutation(list(hist))[: int(rng.integers(1, 4))]:
            ts += 60_000
            e = _event(rng, ts)
            hist[u] = hist[u].appended(e["item"], e["action"], e["ts"], e["device"], e["location"])
            batch.append(hist[u])
            ids.append(str(u))
        _assert_matches(p.model, batch, p.predict(batch, k, users=ids), k)
    assert p.stats["steps"] > 5 and p.stats["prefills"] >= 3


def test_out_of_order_event_forces_rebuild(ckpt):
    p = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1)
    rng = np.random.default_rng(1)
    h = EventSeq.empty()
    for t in range(4):
        e = _event(rng, T0 + 60_000 * t)
        h = h.appended(e["item"], e["action"], e["ts"], e["device"], e["location"])
        p.predict([h], 3, users=["u"])
    assert p.stats["steps"] == 3 and p.stats["prefills"] == 1
    late = h.appended("i5", "cart", T0 + 90_000)  # between events 1 and 2
    assert late.items[-1] != "i5"
    preds = p.predict([late], 3, users=["u"])
    assert p.stats["prefills"] == 2 and p.stats["steps"] == 3  # rebuilt from the history, not stepped
    _assert_matches(p.model, [late], preds, 3)
    # the same history again (a batcher retry): a rebuild too, with the same outputs
    again = p.predict([late], 3, users=["u"])
    assert p.stats["prefills"] == 3 and again[0].top_items == preds[0].top_items


def test_same_user_twice_in_one_batch_and_without_user_ids(ckpt):
    p = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1)
    rng = np.random.default_rng(3)
    h = EventSeq.empty()
    seqs = []
    for t in range(6):
        e = _event(rng, T0 + 1_000 * t)
        h = h.appended(e["item"], e["action"], e["ts"], e["device"], e["location"])
        seqs.append(h)
    preds = p.predict(seqs[:3], 4)  # one batch, one user, three consecutive events; no user ids
    _assert_matches(p.model, seqs[:3], preds, 4)
    assert p.stats["steps"] == 2  # rounds: event 2 stepped from event 1's state, event 3 from event 2's
    preds = p.predict(seqs[3:], 4)
    _assert_matches(p.model, seqs[3:], preds, 4)
    assert p.stats["steps"] == 5 and len(p.cache) == 1  # stale states are replaced, not accumulated


def test_evict_mode_stays_close_and_refreshes(ckpt):
    p = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1, overflow="evict", refresh_every=4)
    rng = np.random.default_rng(5)
    h = EventSeq.empty()
    for t in range(3 * MAX_LEN):
        e = _event(rng, T0 + 30_000 * t)
        h = h.appended(e["item"], e["action"], e["ts"], e["device"], e["location"])
        pr = p.predict([h], 5, users=["u"])[0]
        entry = next(iter(p.cache._d.values()))
        assert entry.n == min(len(h), MAX_LEN) and entry.since_prefill <= 4
        ids, scores, probs, _ = _reference(p.model, [h], 5)
        # sliding-window approximation: close to full recomputation, exact before the window fills
        tol = 1e-4 if len(h) <= MAX_LEN else 0.05
        np.testing.assert_allclose(pr.action_probs, probs[0], atol=tol)
    assert p.stats["steps"] > p.stats["prefills"] > 1


def test_lru_is_bounded_by_users_and_bytes(ckpt):
    p = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1, cache_users=3)
    hs = [EventSeq.from_columns([ITEMS[u]], ["view"], [T0 + u]) for u in range(10)]
    p.predict(hs, 2, users=[f"u{u}" for u in range(10)])
    assert len(p.cache) == 3 and p.cache.stats["evictions"] == 7
    assert p.forget_user("u9") and not p.forget_user("u0") and len(p.cache) == 2
    per_user = p.cache.nbytes // 2
    assert per_user == p.bytes_per_token()  # one cached token each

    q = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1, cache_bytes=int(2.5 * per_user))
    q.predict(hs, 2)
    assert len(q.cache) == 2 and q.cache.nbytes <= q.cache.max_bytes

    c = KVCache(max_entries=0, max_bytes=10)
    assert not c.enabled
    off = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1, incremental=False)
    _assert_matches(off.model, hs, off.predict(hs, 2), 2)
    assert len(off.cache) == 0 and off.stats["full"] == 10


def test_swap_gives_a_fresh_cache_and_the_new_version(ckpt, ckpt2):
    p1 = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1, max_stale_deltas=3)
    h = EventSeq.from_columns(ITEMS[:3], ["view", "click", "cart"], [T0, T0 + 1_000, T0 + 2_000])
    p1.predict([h[:2]], 3, users=["u"])
    assert len(p1.cache) == 1
    p2 = p1.successor(ckpt2)
    assert p2.version != p1.version and len(p2.cache) == 0
    assert (p2.num_threads, p2.overflow, p2.cache.max_entries, p2.max_stale_deltas) == (
        p1.num_threads, p1.overflow, p1.cache.max_entries, 3)
    assert p2.deltas == 0  # a full version starts a new lineage
    pr = p2.predict([h], 3, users=["u"])
    assert p2.stats["steps"] == 0 and p2.stats["prefills"] == 1  # rebuilt with the new model
    _assert_matches(p2.model, [h], pr, 3)
    with pytest.raises(Exception, match="does not exist"):
        p1.successor(ckpt.parent / "nope")


def test_device_auto_threads_and_arguments(ckpt):
    p = TransformerPredictor.from_checkpoint(ckpt, device="auto", num_threads=1)
    assert p.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if p.device.type == "cpu":
        assert torch.get_num_threads() == 1 and p.num_threads == 1
    assert length_buckets(MAX_LEN) == (8,) and length_buckets(50) == (8, 16, 32, 50)
    with pytest.raises(ValueError, match="k must be"):
        p.predict([EventSeq.empty()], 0)
    with pytest.raises(ValueError, match="users has 2 entries"):
        p.predict([EventSeq.empty()], 3, users=["a", "b"])
    with pytest.raises(Exception, match="kv_overflow"):
        TransformerPredictor.from_checkpoint(ckpt, device="cpu", overflow="sometimes")
    with pytest.raises(ConfigError, match="serve_score_dtype.*'float16'"):
        TransformerPredictor.from_checkpoint(ckpt, device="cpu", score_dtype="float16")
    assert p.score_dtype is (None if p.device.type == "cpu" else torch.bfloat16)  # 40 items: an fp32 scan on CPU
    assert resolve_score_dtype("auto", "cpu", 1 << 30) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert p.predict([], 3) == []
    empty = p.predict([EventSeq.empty()], 3)[0]  # no history: still a well-formed prediction
    assert len(empty.top_items) == 3 and abs(sum(empty.action_probs) - 1) < 1e-9
    h = EventSeq.from_columns(["i1", "i2"], ["view", "view"], [T0, T0 + 5])
    assert window_key(h, 1, 8) == window_key(h[:1], 1, 8) != window_key(h, 2, 8)


def test_bad_arguments_name_the_setting_or_the_argument():
    """A value a setting supplies (stream_app.predictors.SERVING_OPTIONS) is reported under the
    setting's name; other arguments raise a plain ValueError naming the argument."""
    m = _model(0)

    def make(**kw):
        return TransformerPredictor(m, VOCAB, version="t", device="cpu", **{"num_threads": 1, **kw})

    for kw, setting in (({"num_threads": 0}, "serve_threads"), ({"refresh_every": 0}, "kv_refresh_every"),
                        ({"cache_users": -1}, "kv_cache_users"), ({"cache_bytes": -(1 << 20)}, "kv_cache_mb"),
                        ({"overflow": "sometimes"}, "kv_overflow"),
                        ({"max_stale_deltas": -1}, "kv_max_stale_deltas")):
        with pytest.raises(ConfigError, match=f"^'{setting}'") as exc:
            make(**kw)
        assert exc.value.name == setting
    for kw, arg in (({"max_rounds": 0}, "max_rounds"), ({"score_budget": 0}, "score_budget"),
                    ({"buckets": (4,)}, "buckets")):
        with pytest.raises(ValueError, match=arg) as exc:
            make(**kw)
        assert not isinstance(exc.value, ConfigError)
    assert make(incremental=False, cache_users=-1).cache.max_entries == 0  # no cache: its bounds are unused
    with pytest.raises(ValueError, match="max_entries must be >= 0"):
        KVCache(max_entries=-1, max_bytes=0)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        KVCache(max_entries=0, max_bytes=-1)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device on this machine (torch.cuda.is_available() is False): "
                           "CPU/CUDA agreement is checked only where a GPU is present")
def test_cpu_and_cuda_paths_agree(ckpt):
    cpu = TransformerPredictor.from_checkpoint(ckpt, device="cpu", num_threads=1)
    gpu = TransformerPredictor.from_checkpoint(ckpt, device="cuda")
    rng = np.random.default_rng(11)
    h = EventSeq.empty()
    seqs = []
    for t in range(2 * MAX_LEN):
        e = _event(rng, T0 + 45_000 * t)
        h = h.appended(e["item"], e["action"], e["ts"], e["device"], e["location"])
        seqs.append(h)
    for s in seqs:  # incremental on both devices (bf16 on CUDA)
        a, b = cpu.predict([s], 5, users=["u"])[0], gpu.predict([s], 5, users=["u"])[0]
        np.testing.assert_allclose(a.action_probs, b.action_probs, atol=3e-2)
        assert len({i for i, _ in a.top_items} & {i for i, _ in b.top_items}) >= 3
        on_gpu = dict(b.top_items)  # the same probabilities, to bf16 precision
        assert all(abs(p - on_gpu[i]) < 3e-2 for i, p in a.top_items if i in on_gpu)
    full_c, full_g = cpu.predict_full(seqs, 5), gpu.predict_full(seqs, 5)
    for a, b in zip(full_c, full_g):
        np.testing.assert_allclose(a.action_probs, b.action_probs, atol=3e-2)
        np.testing.assert_allclose(a.next_gap_s, b.next_gap_s, rtol=0.1, atol=0.5)
    for p in gpu.predict_full(seqs, len(ITEMS)):  # every item: the catalogue's probabilities sum to 1
        assert abs(sum(s for _, s in p.top_items) - 1) < 1e-3
    assert gpu.stats["steps"] > 0
