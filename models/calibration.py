"""Calibration of the action head, fitted on held-out validation cases after training.

The action head is trained on every position of the training windows, but it is judged (and
used) on users' *latest* events, whose next-action mix can differ (on Taobao's leave-one-out split
the held-out last events hold ~50 % more purchases than training positions), and a network that
early-stops on item ranking is not calibrated for actions. The standard post-hoc fix (Guo et al.,
"On Calibration of Modern Neural Networks", 2017) fits a temperature on held-out data; we fit a
temperature ``T`` and one bias per action ("vector scaling" with a shared scale) by minimising the
validation log loss:

    p_calibrated = softmax(T * logits + bias)

Six numbers, stored in the checkpoint's model config (``action_temperature``, ``action_bias``) and
applied by the model itself (:meth:`models.model.NextActionModel.score_last`, prefill and step),
so offline evaluation and the stream serve the same probabilities.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> y = rng.choice(5, size=2000, p=[0.7, 0.1, 0.1, 0.05, 0.05])
>>> probs = np.full((2000, 5), 0.2)               # an uninformed head
>>> t, b = fit_action_calibration(probs, y)
>>> cal = apply_action_calibration(probs, t, b)
>>> bool(log_loss(y, cal) < log_loss(y, probs))   # an uninformed head learns the class prior
True
>>> bool(np.allclose(cal[0], np.bincount(y) / len(y), atol=0.01))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["fit_action_calibration", "apply_action_calibration", "log_loss", "ItemTemperatureFit"]

_EPS = 1e-9


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels ``y`` under ``probs`` ``[N, C]``."""
    p = np.clip(probs[np.arange(len(y)), y], _EPS, 1.0)
    return float(-np.log(p).mean())


def apply_action_calibration(probs: np.ndarray, temperature: float, bias: Sequence[float]) -> np.ndarray:
    """``softmax(T * log(probs) + bias)`` row-wise (equal to calibrating the logits themselves)."""
    z = np.log(np.clip(probs, _EPS, 1.0)) * temperature + np.asarray(bias, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_action_calibration(probs: np.ndarray, y: np.ndarray, *, l2: float = 1e-3,
                           max_iter: int = 200) -> tuple[float, tuple[float, ...]]:
    """Fit ``(temperature, bias)`` minimising the log loss of ``probs`` ``[N, C]`` against labels
    ``y`` ``[N]`` (L-BFGS in float64; a small L2 penalty keeps biases of unseen classes finite)."""
    import torch

    if probs.ndim != 2 or len(probs) != len(y) or len(y) == 0:
        raise ValueError(f"need probs [N, C] and y [N] with N > 0 (got {probs.shape} and {np.shape(y)})")
    logp = torch.tensor(np.log(np.clip(probs, _EPS, 1.0)), dtype=torch.float64)
    target = torch.as_tensor(np.asarray(y), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(probs.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp * log_t.exp() + bias, target) + l2 * (bias ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    b = bias.detach() - bias.detach().mean()  # softmax is shift-invariant: centre the biases
    return float(log_t.detach().exp()), tuple(round(float(v), 6) for v in b)


class ItemTemperatureFit:
    """The temperature ``T`` of the next-item distribution, ``p = softmax(scores / T)`` over the
    catalogue, that minimises the validation log loss of the true next items (temperature scaling,
    Guo et al. 2017). The ranking does not change; the probabilities do: a repeat or transition
    score that ranks well can be far too sharp as a probability (Taobao: mean top-1 probability
    0.66 for a top-1 hit rate of 0.05 at ``T = 1``).

    Feed it validation cases a chunk at a time (:meth:`add`: full-catalogue scores ``[n, V]`` and
    the target columns ``[n]``, ``-1`` for a target outside the catalogue), then :meth:`result`.
    The log loss is convex in ``1 / T``: a golden-section search on ``log T`` in [0.05, 200] finds it
    to 0.1 %. Cases are kept in float32 up to ``max_bytes`` (later ones are skipped: a few hundred
    cases pin one number down).

    >>> rng = np.random.default_rng(0)
    >>> logits = rng.normal(size=(400, 50))
    >>> y = np.array([rng.choice(50, p=np.exp(r) / np.exp(r).sum()) for r in logits])  # true T = 1
    >>> fit = ItemTemperatureFit()
    >>> fit.add(logits * 4.0, y)  # scores 4x too sharp
    >>> t, before, after = fit.result()
    >>> bool(3.2 < t < 5.0), bool(after < before)
    (True, True)
    """

    LOW, HIGH = 0.05, 200.0

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._s: list[np.ndarray] = []  # per chunk: scores minus each row's maximum (<= 0), float32
        self._t: list[np.ndarray] = []  # ... and each row's target score (same shift)
        self.n = self.skipped = 0
        self._bytes = 0

    def add(self, scores: np.ndarray, targets: np.ndarray) -> None:
        scores = np.asarray(scores, np.float32)
        targets = np.asarray(targets, np.int64)
        keep = targets >= 0
        s, t = scores[keep], targets[keep]
        if not len(t):
            return
        room = max(0, (self.max_bytes - self._bytes) // max(1, s.shape[1] * 4))
        if room < len(t):
            self.skipped += len(t) - room
            s, t = s[:room], t[:room]
        if not len(t):
            return
        s = s - s.max(axis=1, keepdims=True)
        self._s.append(s)
        self._t.append(s[np.arange(len(t)), t].astype(np.float64))
        self.n += len(t)
        self._bytes += s.nbytes

    def log_loss(self, temperature: float) -> float:
        """Mean validation log loss at ``temperature``."""
        total = 0.0
        for s, t in zip(self._s, self._t):
            z = np.exp(s / np.float32(temperature)).sum(axis=1, dtype=np.float64)
            total += float((np.log(z) - t / temperature).sum())
        return total / self.n

    def result(self) -> tuple[float, float, float]:
        """``(T, validation log loss at T = 1, at T)``; ``ValueError`` before any case."""
        if self.n == 0:
            raise ValueError("ItemTemperatureFit: no validation case with a target in the catalogue")
        lo, hi = np.log(self.LOW), np.log(self.HIGH)
        g = (np.sqrt(5.0) - 1.0) / 2.0
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        fa, fb = self.log_loss(float(np.exp(a))), self.log_loss(float(np.exp(b)))
        while hi - lo > 1e-3:
            if fa <= fb:
                hi, b, fb = b, a, fa
                a = hi - g * (hi - lo)
                fa = self.log_loss(float(np.exp(a)))
            else:
                lo, a, fa = a, b, fb
                b = lo + g * (hi - lo)
                fb = self.log_loss(float(np.exp(b)))
        t = float(np.exp((lo + hi) / 2.0))
        return t, self.log_loss(1.0), self.log_loss(t)
