"""Guardrails: unsafe steps and weight restore, per-user rate limits, shadow comparison."""

from __future__ import annotations

import math

import pytest
import torch

from online.guardrails import ShadowComparator, StepGuard, UserRateLimit, total_grad_norm


# --- StepGuard --------------------------------------------------------------------------------------
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def train_step(model, opt, x, y) -> tuple[float, float]:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return float(loss.detach()), total_grad_norm(model.parameters())


def test_finite_steps_are_safe_nan_loss_and_inf_grad_are_not():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard()
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    loss, norm = train_step(model, opt, x, y)
    assert math.isfinite(norm) and norm > 0 and guard.is_safe(loss, norm) and guard.reason is None

    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    loss, norm = train_step(model, opt, x_nan, y)
    assert math.isnan(loss) and not guard.is_safe(loss, norm) and guard.reason == "loss_not_finite"

    loss, _ = train_step(model, opt, x, y)
    model[0].weight.grad[0, 0] = float("inf")
    norm = total_grad_norm(model.parameters())
    assert norm == math.inf and not guard.is_safe(loss, norm) and guard.reason == "grad_not_finite"
    assert guard.refused == {"loss_not_finite": 1, "grad_not_finite": 1} and guard.checked == 3
    assert not guard.is_safe(torch.tensor(float("nan"), requires_grad=True), torch.tensor(1.0))  # tensors too


def test_exploding_grad_norms_are_refused():
    guard = StepGuard(spike_factor=10.0, max_grad_norm=1e3, window=50, warmup=10)
    assert not guard.is_safe(0.5, 2e3) and guard.reason == "grad_above_max"  # the absolute bound, always
    assert guard.is_safe(0.5, 500.0)  # no median yet: only the absolute bound
    guard = StepGuard(spike_factor=10.0, max_grad_norm=1e3, window=50, warmup=10)
    for n in range(20):
        assert guard.is_safe(1.0, 1.0 + 0.01 * n)
    assert guard.median_grad_norm == pytest.approx(1.095, abs=0.01)
    assert guard.is_safe(1.0, 10.0)  # 9x the median: fine
    assert not guard.is_safe(1.0, 12.0) and guard.reason == "grad_spike"
    assert guard.is_safe(1.0, 1.05)  # one spike does not move the median


def test_a_lasting_change_of_scale_is_accepted_after_half_a_window():
    guard = StepGuard(window=40, warmup=10)
    for _ in range(40):
        guard.is_safe(1.0, 1.0)
    verdicts = [guard.is_safe(1.0, 50.0) for _ in range(40)]
    first_ok = verdicts.index(True)
    assert 0 < first_ok <= 21 and all(verdicts[first_ok:])


def test_restore_brings_back_the_exact_remembered_weights_in_place():
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    guard = StepGuard()
    for _ in range(3):
        train_step(model, opt, x, y)
        opt.step()
    guard.remember(model, opt)
    good = {k: t.clone() for k, t in model.state_dict().items()}
    good_opt = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                for k, s in opt.state_dict()["state"].items()}
    params = list(model.parameters())

    for _ in range(3):  # more steps, then a poisoned one
        train_step(model, opt, x, y)
        opt.step()
    with torch.no_grad():
        model[2].weight.fill_(float("nan"))
    assert any(not torch.equal(good[k], t) for k, t in model.state_dict().items())

    guard.restore(model, opt)
    assert all(torch.equal(good[k], t) for k, t in model.state_dict().items())
    assert list(model.parameters()) == params and all(p1 is p2 for p1, p2 in zip(model.parameters(), params))
    restored_opt = opt.state_dict()["state"]
    assert all(torch.equal(good_opt[k]["exp_avg"], restored_opt[k]["exp_avg"]) for k in good_opt)
    # the optimizer still drives the same parameters
    before = model[0].weight.detach().clone()
    train_step(model, opt, x, y)
    opt.step()
    assert not torch.equal(before, model[0].weight) and guard.restored == 1


def test_the_snapshot_is_a_copy_not_a_view():
    model = small_model()
    guard = StepGuard()
    guard.remember(model)
    w = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    guard.restore(model)
    assert torch.equal(model[0].weight, w)


def test_restore_errors():
    guard = StepGuard()
    with pytest.raises(RuntimeError):
        guard.restore(small_model())
    guard.remember(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        guard.restore(small_model())


def test_total_grad_norm():
    model = torch.nn.Linear(2, 1, bias=False)
    assert total_grad_norm(model.parameters()) == 0.0  # no gradients yet
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    assert total_grad_norm(model.parameters()) == pytest.approx(5.0)


# --- UserRateLimit ----------------------------------------------------------------------------------
def test_a_bot_gets_per_minute_through_in_a_minute():
    limit = UserRateLimit(per_minute=30, max_users=100)
    t0 = 1_700_000_000_000
    allowed = sum(limit.allow("bot", t0 + n * 60) for n in range(1000))  # 1,000 in 60 s
    assert allowed == 30 and limit.refused == 970 and limit.allowed == 30
    # the next minute frees up again (sliding on event time)
    assert limit.allow("bot", t0 + 60_000)


def test_a_normal_user_is_never_refused():
    limit = UserRateLimit(per_minute=30, max_users=100)
    t0 = 1_700_000_000_000
    for n in range(2000):  # one event every 5 s for almost 3 hours, with a bot beside it
        assert limit.allow("alice", t0 + n * 5_000)
        limit.allow("bot", t0 + n * 5_000)
        limit.allow("bot", t0 + n * 5_000 + 1)
    assert limit.refused == 0  # the bot at 24/min is under the limit too
    for n in range(30):  # a burst of 30 in a second after a quiet minute: still within the limit
        assert limit.allow("carol", t0 + n * 30)


def test_event_time_makes_replays_limited_like_live():
    limit = UserRateLimit(per_minute=5, max_users=10)
    old = 1_500_000_000_000  # an old log, replayed fast
    assert [limit.allow("u", old + n * 20_000) for n in range(10)] == [True] * 10  # 3 per minute
    assert sum(limit.allow("v", old) for _ in range(10)) == 5
    assert not limit.allow("v", old - 5_000)  # out of order: counts at the newest time


def test_memory_is_bounded_least_recently_seen_forgotten():
    limit = UserRateLimit(per_minute=3, max_users=100)
    for n in range(10_000):
        limit.allow(f"user{n}", n)
        assert len(limit) <= 100
    assert limit.forgotten == 9_900
    assert all(len(q) <= 3 for q in limit._users.values())
    limit = UserRateLimit(per_minute=1, max_users=2)
    assert limit.allow("a", 0) and limit.allow("b", 0)
    assert not limit.allow("a", 1)  # a is now the most recently seen
    limit.allow("c", 2)  # forgets b, not a
    assert not limit.allow("a", 3) and limit.allow("b", 3)  # b starts afresh


def test_rate_limit_bad_arguments():
    with pytest.raises(ValueError):
        UserRateLimit(per_minute=0)
    with pytest.raises(ValueError):
        UserRateLimit(max_users=0)


# --- ShadowComparator -------------------------------------------------------------------------------
def test_online_better_or_equal_never_rolls_back():
    cmp = ShadowComparator(window=100, margin=0.02, min_examples=50)
    for n in range(1000):
        rank = 1 + n % 12
        cmp.update_ranks(rank, rank)  # equal
        assert not cmp.should_rollback()
        cmp.update_ranks(1, rank)  # better
        assert not cmp.should_rollback()


def test_online_clearly_worse_for_a_window_rolls_back_then_reset():
    cmp = ShadowComparator(window=100, margin=0.05, min_examples=50)
    for n in range(100):
        cmp.update(0.3, 0.4)
    assert cmp.n == 100 and cmp.online_mean == pytest.approx(0.3) and cmp.should_rollback()
    cmp.reset()
    assert cmp.n == 0 and not cmp.should_rollback() and cmp.resets == 1


def test_not_before_min_examples():
    cmp = ShadowComparator(window=100, margin=0.05, min_examples=50)
    for n in range(49):
        cmp.update(0.0, 1.0)
        assert not cmp.should_rollback()
    cmp.update(0.0, 1.0)
    assert cmp.should_rollback()


def test_margin_is_absolute_and_the_window_rolls():
    cmp = ShadowComparator(window=10, margin=0.1, min_examples=10)
    for _ in range(10):
        cmp.update(0.45, 0.5)  # 0.05 worse: within the margin
    assert not cmp.should_rollback()
    for _ in range(10):
        cmp.update(0.35, 0.5)  # 0.15 worse over the whole (rolled) window
    assert cmp.should_rollback()
    for _ in range(10):
        cmp.update(0.5, 0.5)  # recovered: the bad examples rolled out
    assert not cmp.should_rollback()


def test_update_ranks_uses_ndcg_at_k():
    cmp = ShadowComparator(window=10, margin=0.0, min_examples=1)
    cmp.update_ranks(3, 1)
    assert cmp.online_mean == 0.5 and cmp.shadow_mean == 1.0
    cmp.update_ranks(None, 11)
    assert cmp.online_mean == 0.25 and cmp.shadow_mean == 0.5
    cmp.update_ranks(2, 2, k=1)
    assert cmp.online_mean == pytest.approx(1 / 6)


def test_comparator_bad_arguments():
    with pytest.raises(ValueError):
        ShadowComparator(window=10, min_examples=11)
    with pytest.raises(ValueError):
        ShadowComparator(margin=-0.1)
