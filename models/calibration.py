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

__all__ = ["fit_action_calibration", "apply_action_calibration", "log_loss"]

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
