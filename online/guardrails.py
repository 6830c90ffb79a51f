"""Guardrails of online learning: unsafe steps, flooding users, and a model that got worse.

* :class:`StepGuard` -- is a training step safe to apply, and the last good weights to go back to.
* :class:`UserRateLimit` -- at most ``per_minute`` examples per user per minute of *event* time.
* :class:`ShadowComparator` -- the online model against a frozen shadow copy on the same examples:
  roll back when the online one is clearly worse.

>>> import math
>>> guard = StepGuard()
>>> guard.is_safe(0.7, 1.3), guard.is_safe(math.nan, 1.0), guard.reason
(True, False, 'loss_not_finite')
>>> limit = UserRateLimit(per_minute=2)
>>> [limit.allow("bot", ts) for ts in (0, 1_000, 2_000, 60_500)]   # the first is over 60 s old: its slot frees up
[True, True, False, True]
>>> cmp = ShadowComparator(window=4, margin=0.1, min_examples=2)
>>> for _ in range(2):
...     cmp.update_ranks(online_rank=None, shadow_rank=1)   # NDCG@10: online 0.0, shadow 1.0
>>> cmp.should_rollback()
True
"""

from __future__ import annotations

import copy
import math
from collections import Counter, OrderedDict, deque
from typing import Any, Iterable

import torch
from river import stats, utils

from online.prequential import ndcg_at


def total_grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all gradients together (``inf``/``nan`` when one is not finite); what
    ``torch.nn.utils.clip_grad_norm_`` returns before it clips."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads))


def _scalar(x: float | torch.Tensor) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


class StepGuard:
    """Says whether a step is safe, and keeps the last good weights.

    A step (its loss and the total gradient norm *before* clipping) is refused, with :attr:`reason`:

    * ``"loss_not_finite"`` / ``"grad_not_finite"``: NaN or infinite;
    * ``"grad_above_max"``: grad norm above the absolute bound ``max_grad_norm`` (default 1e3: the
      offline training clips at 1.0 (``models.config`` ``grad_clip``), so 1e3 is an explosion
      whatever the history);
    * ``"grad_spike"``: grad norm above ``spike_factor`` (default 10) times the running median of the
      last ``window`` (default 200) finite grad norms, once ``warmup`` (default 20) were seen.

    Every finite grad norm enters the median's window, refused or not: one spike cannot move a
    median, but a lasting change of scale (a drift, a new learning rate) does after about
    ``window / 2`` steps, so the guard cannot lock the trainer out for good.

    :meth:`remember` copies the model's ``state_dict`` tensors (and, optionally, the optimizer's
    state) on their device; :meth:`restore` copies them back *in place* (the parameters stay the same
    objects, so an optimizer holding them keeps working).

    >>> model = torch.nn.Linear(2, 1)
    >>> guard = StepGuard()
    >>> guard.remember(model)
    >>> before = model.weight.detach().clone()
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(float("nan"))
    >>> guard.restore(model)
    >>> torch.equal(model.weight, before)
    True
    """

    def __init__(self, *, spike_factor: float = 10.0, max_grad_norm: float = 1e3, window: int = 200,
                 warmup: int = 20) -> None:
        if not spike_factor > 1:
            raise ValueError(f"StepGuard: spike_factor must be > 1 (got {spike_factor!r})")
        if not max_grad_norm > 0:
            raise ValueError(f"StepGuard: max_grad_norm must be > 0 (got {max_grad_norm!r})")
        if not 1 <= warmup <= window:
            raise ValueError(f"StepGuard: need 1 <= warmup <= window (got {warmup!r}, {window!r})")
        self.spike_factor, self.max_grad_norm, self.window, self.warmup = spike_factor, max_grad_norm, window, warmup
        self._median = stats.RollingQuantile(q=0.5, window_size=window)
        self._seen = 0  # finite grad norms in the median's window (capped at window)
        self.reason: str | None = None  # why the latest step was refused (None: it was safe)
        self.checked = 0
        self.refused: Counter[str] = Counter()
        self._weights: dict[str, torch.Tensor] | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self.restored = 0

    @property
    def median_grad_norm(self) -> float | None:
        """The running median the spike rule compares with (``None`` before any finite grad norm)."""
        return self._median.get() if self._seen else None

    def is_safe(self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor) -> bool:
        """Is a step with this loss and (pre-clipping) total grad norm safe to apply? (Scalar tensors
        are accepted; reading one waits for the device.)"""
        self.checked += 1
        loss, grad_norm = _scalar(loss), _scalar(grad_norm)
        if not math.isfinite(loss):
            reason: str | None = "loss_not_finite"
        elif not math.isfinite(grad_norm):
            reason = "grad_not_finite"
        elif grad_norm > self.max_grad_norm:
            reason = "grad_above_max"
        elif self._seen >= self.warmup and grad_norm > self.spike_factor * self._median.get():
            reason = "grad_spike"
        else:
            reason = None
        if math.isfinite(grad_norm):
            self._median.update(grad_norm)
            self._seen = min(self._seen + 1, self.window)
        self.reason = reason
        if reason is not None:
            self.refused[reason] += 1
        return reason is None

    # --- the last good weights -------------------------------------------------------------------------
    @property
    def has_snapshot(self) -> bool:
        return self._weights is not None

    def remember(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy the model's current weights (and the optimizer's state) as the last good ones."""
        self._weights = {k: t.detach().clone() for k, t in model.state_dict().items()}
        self._optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy the remembered weights back into ``model`` in place (and the optimizer's state, when
        one was remembered and ``optimizer`` is given)."""
        if self._weights is None:
            raise RuntimeError("StepGuard.restore: nothing remembered yet")
        state = model.state_dict()
        if state.keys() != self._weights.keys():
            missing, extra = self._weights.keys() - state.keys(), state.keys() - self._weights.keys()
            raise ValueError(f"StepGuard.restore: not the remembered model (missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)})")
        with torch.no_grad():
            for k, t in state.items():
                t.copy_(self._weights[k])
        if optimizer is not None and self._optimizer_state is not None:
            optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
        self.restored += 1


class UserRateLimit:
    """At most ``per_minute`` examples per user in any 60 s of event time (an exact sliding window).

    ``allow(user_id, ts_ms)`` keeps the timestamps of the user's allowed examples of the last minute
    (at most ``per_minute``) and refuses an example when there are already ``per_minute`` of them.
    Time is the event's (epoch ms), so a replay of old logs is limited exactly as it was live; an
    event older than the user's newest allowed one counts as at that time. Only the ``max_users``
    most recently seen users are kept (the least recently seen is forgotten, and starts afresh when
    it comes back): memory is at most ``max_users * per_minute`` timestamps.

    Defaults: ``per_minute=60`` (a person rarely sustains one event a second; a scraper does),
    ``max_users=100_000``.

    Counters: ``allowed``, ``refused`` (examples), ``forgotten`` (users dropped beyond ``max_users``).
    """

    def __init__(self, per_minute: int = 60, max_users: int = 100_000) -> None:
        for name, v in (("per_minute", per_minute), ("max_users", max_users)):
            if not v >= 1:
                raise ValueError(f"UserRateLimit: {name} must be >= 1 (got {v!r})")
        self.per_minute, self.max_users = per_minute, max_users
        self._users: OrderedDict[str, deque[int]] = OrderedDict()
        self.allowed = 0
        self.refused = 0
        self.forgotten = 0

    def forget(self, user_id: str) -> bool:
        """Drop what is kept about ``user_id`` (a privacy deletion); True if anything was."""
        return self._users.pop(user_id, None) is not None

    def allow(self, user_id: str, ts_ms: int) -> bool:
        """May this example of ``user_id`` at event time ``ts_ms`` be learned from?"""
        times = self._users.get(user_id)
        if times is None:
            times = self._users[user_id] = deque()
            if len(self._users) > self.max_users:
                self._users.popitem(last=False)
                self.forgotten += 1
        else:
            self._users.move_to_end(user_id)
        ts = int(ts_ms)
        if times and ts < times[-1]:
            ts = times[-1]
        cutoff = ts - 60_000
        while times and times[0] <= cutoff:
            times.popleft()
        if len(times) >= self.per_minute:
            self.refused += 1
            return False
        times.append(ts)
        self.allowed += 1
        return True

    def __len__(self) -> int:
        """Users kept."""
        return len(self._users)


class ShadowComparator:
    """Rolling means of the online (served) model's and a frozen shadow model's scores on the same
    examples; :meth:`should_rollback` when the online one is clearly worse.

    Rollback when ``online_mean < shadow_mean - margin``, the margin being **absolute** (in the
    score's units: NDCG@10 is in [0, 1], and a relative margin would be erratic when both means are
    near 0), and only once ``min_examples`` examples are in the window. Higher scores are better.

    Defaults: ``window=1000``, ``min_examples=500``, ``margin=0.02``. Online and shadow are scored on
    the same examples, so the per-example NDCG differences have a std well below the 0.5 bound
    (mostly 0: both rank the target alike); at a std of 0.3 the mean difference over 500 examples
    has a standard error of 0.013 (0.009 over 1,000), and 0.02 lies beyond it: noise alone rarely
    triggers a rollback, while a drop of a few NDCG points is caught within a window.

    Feed :meth:`update` scores, or :meth:`update_ranks` the target's 1-based ranks in each model's
    top-k (NDCG@k by :func:`online.prequential.ndcg_at`, the prequential metric's definition).
    Call :meth:`reset` after a rollback.
    """

    def __init__(self, window: int = 1000, margin: float = 0.02, min_examples: int = 500) -> None:
        if not 1 <= min_examples <= window:
            raise ValueError(f"ShadowComparator: need 1 <= min_examples <= window (got {min_examples!r}, {window!r})")
        if not (margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"ShadowComparator: margin must be finite and >= 0 (got {margin!r})")
        self.window, self.margin, self.min_examples = window, margin, min_examples
        self.resets = 0
        self._new()

    def _new(self) -> None:
        self._online = utils.Rolling(stats.Mean, window_size=self.window)
        self._shadow = utils.Rolling(stats.Mean, window_size=self.window)

    def update(self, online_score: float, shadow_score: float) -> None:
        """One example's score under the online model and under the shadow model."""
        self._online.update(float(online_score))
        self._shadow.update(float(shadow_score))

    def update_ranks(self, online_rank: int | None, shadow_rank: int | None, k: int = 10) -> None:
        """One example as the target's 1-based rank in each model's top-k (``None``: not in it)."""
        self.update(ndcg_at(online_rank, k), ndcg_at(shadow_rank, k))

    @property
    def n(self) -> int:
        """Examples in the window."""
        return len(self._online.window)

    @property
    def online_mean(self) -> float:
        return self._online.get()

    @property
    def shadow_mean(self) -> float:
        return self._shadow.get()

    def should_rollback(self) -> bool:
        """Is the online model worse than the shadow by more than ``margin``, over enough examples?"""
        return self.n >= self.min_examples and self.online_mean < self.shadow_mean - self.margin

    def reset(self) -> None:
        """Start over (after a rollback, or when a new shadow is frozen)."""
        self._new()
        self.resets += 1
