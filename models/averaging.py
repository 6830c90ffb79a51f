"""An exponential moving average of a model's weights (Polyak averaging), for validation and saving.

Training steps with a high learning rate bounce around a minimum; the average of the recent weights
sits nearer its centre. :func:`models.train.train` validates and checkpoints the averaged weights
when ``TrainConfig.ema_epochs > 0`` (the average's half-life, in epochs).

>>> import torch
>>> m = torch.nn.Linear(1, 1, bias=False)
>>> _ = m.weight.data.fill_(0.0)
>>> avg = WeightAverage(m, half_life_steps=1.0)
>>> _ = m.weight.data.fill_(1.0); avg.update(m)
>>> with avg.swapped_in(m):
...     round(m.weight.item(), 3)   # the first update is bias-corrected: the average of one step
1.0
>>> _ = m.weight.data.fill_(3.0); avg.update(m)
>>> with avg.swapped_in(m):
...     round(m.weight.item(), 3)   # half-life of one step: the newer weights count twice the older
2.333
>>> m.weight.item()                   # the training weights are back
3.0
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from models.errors import ConfigError


class WeightAverage:
    """``avg <- avg + (1 - decay) * (w - avg)`` after each step, ``decay = 0.5 ** (1 / half_life_steps)``,
    bias-corrected as Adam's moments are (the first steps are not pulled towards the initial weights)."""

    def __init__(self, model: torch.nn.Module, half_life_steps: float):
        if not (math.isfinite(half_life_steps) and half_life_steps > 0):
            raise ConfigError("half_life_steps", half_life_steps, "must be finite and > 0")
        self.decay = 0.5 ** (1.0 / half_life_steps)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._avg = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        self._weight = 0.0  # 1 - decay ** steps: the bias correction

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average (after ``optimizer.step()``)."""
        d = self.decay
        torch._foreach_mul_(self._avg, d)
        torch._foreach_add_(self._avg, [p.detach().float() for p in self._params], alpha=1.0 - d)
        self._weight = self._weight * d + (1.0 - d)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the training weights come back after."""
        if self._weight == 0.0:  # nothing averaged yet
            yield
            return
        saved = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            for p, a in zip(self._params, self._avg):
                p.copy_((a / self._weight).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    p.copy_(s)
