"""Drift detection on a loss stream, and the adaptation it triggers.

The loss-like stream: exponential values (mean = std, like a per-example log loss), mean 1.0 before
a jump. The bounds below hold with a margin over what was measured with these seeds (in brackets).
"""

from __future__ import annotations

import math
import random

import pytest

from online.drift import Adaptation, DriftMonitor

# detector: (max detections in 3 x 20,000 stationary values, max values from a +50% jump to its detection)
BOUNDS = {"adwin": (1, 300), "page_hinkley": (3, 500)}  # measured: adwin 0, 112-176; page_hinkley 1, 198-275


def losses(rng: random.Random, n: int, mean: float):
    return (rng.expovariate(1.0 / mean) for _ in range(n))


@pytest.mark.parametrize("detector", sorted(BOUNDS))
def test_stationary_noisy_stream_raises_few_alarms(detector):
    detections = 0
    for seed in range(3):
        m = DriftMonitor(detector)
        found = sum(m.update(x) for x in losses(random.Random(seed), 20_000, 1.0))
        assert m.n == 20_000 and m.detections == found
        detections += found
    assert detections <= BOUNDS[detector][0]


@pytest.mark.parametrize("detector", sorted(BOUNDS))
def test_mean_jump_is_detected_within_a_bounded_delay(detector):
    for seed in range(5):
        rng = random.Random(100 + seed)
        m = DriftMonitor(detector)
        assert not any(m.update(x) for x in losses(rng, 2000, 1.0))
        delay = next((i + 1 for i, x in enumerate(losses(rng, 5000, 1.5)) if m.update(x)), None)
        assert delay is not None and delay <= BOUNDS[detector][1], (seed, delay)
        assert m.detections == 1 and m.last_detection == 2000 + delay - 1


def test_a_loss_decrease_is_not_a_drift_unless_asked():
    for direction, want in (("up", 0), ("both", 1)):
        rng = random.Random(1)
        m = DriftMonitor("adwin", direction=direction)
        for x in losses(rng, 3000, 2.0):
            m.update(x)
        assert sum(m.update(x) for x in losses(rng, 3000, 1.0)) == want
        assert m.ignored == 1 - want
        assert m.adaptation.active == bool(want)


def test_adaptation_is_active_for_exactly_steps_steps():
    a = Adaptation(lr_multiplier=3.0, recent_fraction=0.8, steps=5, base_recent_fraction=0.4)
    assert a.current() == (1.0, 0.4) and not a.active
    a.trigger()
    seen = []
    for _ in range(8):
        seen.append(a.current())
        a.step()
    assert seen == [(3.0, 0.8)] * 5 + [(1.0, 0.4)] * 3


def test_a_detection_during_an_adaptation_restarts_it():
    a = Adaptation(steps=4)
    a.trigger()
    a.step()
    a.step()
    a.trigger()
    active = 0
    while a.active:
        a.step()
        active += 1
    assert active == 4 and a.triggered == 2


def test_adaptation_defaults():
    a = Adaptation()
    a.trigger()
    assert (a.lr_multiplier, a.recent_fraction, a.steps, a.base_recent_fraction) == (2.0, 0.9, 200, 0.5)
    assert a.current() == (2.0, 0.9)


def test_monitor_triggers_its_adaptation():
    ad = Adaptation(steps=3)
    m = DriftMonitor(adaptation=ad)
    rng = random.Random(4)
    for x in losses(rng, 2000, 1.0):
        m.update(x)
    assert not ad.active
    next(i for i, x in enumerate(losses(rng, 5000, 3.0)) if m.update(x))
    assert ad.active and ad.remaining == 3 and ad.triggered == m.detections == 1


def test_non_finite_values_are_skipped():
    m = DriftMonitor()
    assert m.update(math.nan) is False and m.update(math.inf) is False and m.n == 0
    m.update(1.0)
    assert m.n == 1


def test_params_override_defaults_and_reset_forgets():
    m = DriftMonitor("page_hinkley", threshold=10.0)
    assert m.params == {"min_instances": 30, "delta": 0.1, "threshold": 10.0, "mode": "up"}
    assert DriftMonitor("page_hinkley", direction="both").params["mode"] == "both"
    assert DriftMonitor("adwin", delta=0.01)._detector.delta == 0.01
    rng = random.Random(0)
    for x in losses(rng, 500, 1.0):
        m.update(x)
    m.reset()
    assert m.n == 500 and m._detector.drift_detected is False


def test_bad_arguments():
    with pytest.raises(ValueError):
        DriftMonitor("ddm")
    with pytest.raises(ValueError):
        DriftMonitor(direction="down")
    with pytest.raises(ValueError):
        Adaptation(recent_fraction=1.5)
    with pytest.raises(ValueError):
        Adaptation(lr_multiplier=0.0)
