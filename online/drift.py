"""Drift detection on a loss stream (river), and the trainer's adaptation after a detection.

:class:`DriftMonitor` feeds each loss value (e.g. the prequential action log loss of each example,
:func:`online.prequential.score`, or a per-step mean loss) to a river detector and says when the
loss distribution changed. By default only *increases* count (``direction="up"``): a loss that drops
(a better model was loaded) is no reason to adapt.

* ``"adwin"`` (default): :class:`river.drift.ADWIN` with river's defaults (``delta=0.002``,
  ``clock=32``: the cut is checked every 32 values, so delays come in steps of 32). It adapts to the
  scale and variance of the stream by itself. Measured on loss-like streams (exponential, mean 1 =
  std 1): no false alarm in 400,000 stationary values; a +50% jump of the mean detected after
  48-176 values, a +30% jump after 112-752 (10 to 15 seeds).
* ``"page_hinkley"``: :class:`river.drift.PageHinkley` with ``mode="up"``, ``delta=0.1``,
  ``threshold=100`` (river's ``delta=0.005, threshold=50`` raised a false alarm every ~3,000
  values of that stream); its parameters are in the units of the values, so tune them to the loss
  scale. Measured on the same stream: about one false alarm per 50,000 values; a +50% jump detected
  after 180-320 values.

``**params`` override the detector's parameters. For ADWIN the direction of a change is read from
the detector's mean estimate: the window it keeps after the cut (the recent values) against the
mean before this value.

:class:`Adaptation` is the trainer's policy after a detection: for the next ``steps`` training steps
use a learning rate ``lr_multiplier`` times the base one and a larger share of recent examples in
each replay sample (``recent_fraction`` instead of ``base_recent_fraction``, see
:meth:`online.replay.ReplayBuffer.sample`), then return to normal. A detection during an
adaptation restarts it (``steps`` more, not added up).

>>> import random
>>> rng = random.Random(0)
>>> m = DriftMonitor("adwin", adaptation=Adaptation(lr_multiplier=2.0, recent_fraction=0.9, steps=2))
>>> any(m.update(rng.expovariate(1.0)) for _ in range(2000))   # stationary: mean 1
False
>>> m.adaptation.current()
(1.0, 0.5)
>>> next(i for i in range(5000) if m.update(rng.expovariate(1 / 3.0)))  # the mean triples
15
>>> m.detections, m.adaptation.current()
(1, (2.0, 0.9))
>>> m.adaptation.step(); m.adaptation.step(); m.adaptation.current()
(1.0, 0.5)
"""

from __future__ import annotations

import math
from typing import Any, Literal

from river import drift

DETECTORS = ("adwin", "page_hinkley")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "adwin": {},  # river's: delta=0.002, clock=32, max_buckets=5, min_window_length=5, grace_period=10
    "page_hinkley": {"min_instances": 30, "delta": 0.1, "threshold": 100.0, "mode": "up"},
}


class Adaptation:
    """After a drift: ``steps`` training steps with ``lr_multiplier`` x the learning rate and
    ``recent_fraction`` of recent examples; otherwise ``(1.0, base_recent_fraction)``.

    Defaults: ``lr_multiplier=2.0`` (a doubling moves faster toward the new regime while staying far
    from the spikes :class:`online.guardrails.StepGuard` refuses), ``recent_fraction=0.9`` (mostly
    the new regime, a little replay against forgetting), ``base_recent_fraction=0.5``,
    ``steps=200`` (several detection delays' worth of mini-batches).

    The trainer reads :meth:`current` for a step and calls :meth:`step` once the step is done;
    :meth:`trigger` (called by :class:`DriftMonitor` on a detection) starts the ``steps`` countdown.
    """

    def __init__(self, lr_multiplier: float = 2.0, recent_fraction: float = 0.9, steps: int = 200, *,
                 base_recent_fraction: float = 0.5) -> None:
        if not (lr_multiplier > 0 and math.isfinite(lr_multiplier)):
            raise ValueError(f"Adaptation: lr_multiplier must be finite and > 0 (got {lr_multiplier!r})")
        for name, v in (("recent_fraction", recent_fraction), ("base_recent_fraction", base_recent_fraction)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"Adaptation: {name} must be in [0, 1] (got {v!r})")
        if steps < 0:
            raise ValueError(f"Adaptation: steps must be >= 0 (got {steps!r})")
        self.lr_multiplier, self.recent_fraction, self.steps = lr_multiplier, recent_fraction, steps
        self.base_recent_fraction = base_recent_fraction
        self.remaining = 0  # adapted steps left
        self.triggered = 0

    @property
    def active(self) -> bool:
        return self.remaining > 0

    def trigger(self) -> None:
        """A drift was detected: the next ``steps`` steps are adapted (restarts a running adaptation)."""
        self.triggered += 1
        self.remaining = self.steps

    def current(self) -> tuple[float, float]:
        """``(lr_multiplier, recent_fraction)`` for the next training step."""
        if self.remaining > 0:
            return self.lr_multiplier, self.recent_fraction
        return 1.0, self.base_recent_fraction

    def step(self) -> None:
        """One training step is done."""
        if self.remaining > 0:
            self.remaining -= 1


class DriftMonitor:
    """A river drift detector over a loss stream (see the module docstring).

    Arguments:
        detector: ``"adwin"`` or ``"page_hinkley"``.
        direction: ``"up"`` (only loss increases are detections) or ``"both"``.
        adaptation: triggered on each detection (an :class:`Adaptation` with its defaults if omitted).
        **params: the detector's parameters, over this module's defaults.
    """

    def __init__(self, detector: Literal["adwin", "page_hinkley"] = "adwin", *,
                 direction: Literal["up", "both"] = "up", adaptation: Adaptation | None = None,
                 **params: Any) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"DriftMonitor: detector must be one of {DETECTORS} (got {detector!r})")
        if direction not in ("up", "both"):
            raise ValueError(f"DriftMonitor: direction must be 'up' or 'both' (got {direction!r})")
        self.detector, self.direction = detector, direction
        self.params = {**_DEFAULTS[detector], **params}
        if detector == "page_hinkley" and "mode" not in params:
            self.params["mode"] = "up" if direction == "up" else "both"
        self.adaptation = adaptation if adaptation is not None else Adaptation()
        self._detector = self._make()
        self.n = 0  # values seen
        self.detections = 0
        self.ignored = 0  # changes detected in the other direction (direction="up": loss decreases)
        self.last_detection: int | None = None  # index (0-based, in values seen) of the latest detection

    def _make(self) -> drift.ADWIN | drift.PageHinkley:
        return drift.ADWIN(**self.params) if self.detector == "adwin" else drift.PageHinkley(**self.params)

    def update(self, value: float) -> bool:
        """Add one loss value; ``True`` when a drift is detected at it (and the adaptation is triggered).

        Non-finite values are not fed to the detector (they would poison its statistics; the step
        guard deals with them) and return ``False``."""
        value = float(value)
        if not math.isfinite(value):
            return False
        d = self._detector
        before = d.estimation if self.detector == "adwin" else None
        d.update(value)
        self.n += 1
        if not d.drift_detected:
            return False
        if self.direction == "up" and before is not None and d.estimation <= before:
            self.ignored += 1
            return False
        self.detections += 1
        self.last_detection = self.n - 1
        self.adaptation.trigger()
        return True

    def reset(self) -> None:
        """Forget the stream so far (e.g. when a different model version starts serving); counters stay."""
        self._detector = self._make()
