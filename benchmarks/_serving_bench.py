"""Helpers of the predictor benchmarks (predictor_throughput.py, cost_scaling.py, serve_replay.py).

* a random-init :class:`~models.model.NextActionModel` of a given size + synthetic histories;
* a timer that repeats a callable until a time budget (with a device sync), and :func:`once`;
* the median.

The machine line, the command line and the ``RESULTS.md`` section writer are in :mod:`benchmarks.common`.
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

T0 = 1_700_000_000_000


def build_model(n_catalog: int, *, d_model: int = 64, n_layers: int = 2, max_len: int = 50, seed: int = 0,
                n_hash_buckets: int = 1024):
    """A random-init model over ``n_catalog`` known items (dropout off) and its vocabulary."""
    from models.config import ModelConfig
    from models.encoding import ItemVocab
    from models.model import NextActionModel

    vocab = ItemVocab((f"it{k}" for k in range(n_catalog)), n_hash_buckets=n_hash_buckets)
    cfg = ModelConfig(n_items=len(vocab), d_model=d_model, n_layers=n_layers, n_heads=2, max_len=max_len,
                      dropout=0.0, n_hash_buckets=n_hash_buckets)
    torch.manual_seed(seed)
    return NextActionModel(cfg).eval(), vocab


def histories(n_users: int, length: int, n_catalog: int, seed: int = 0) -> list:
    """``n_users`` synthetic histories of ``length`` events each (Zipf-ish items, mixed actions,
    devices, locations, log-normal gaps)."""
    from models.schema import EventSeq

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        items = np.minimum(rng.zipf(1.3, length) - 1, n_catalog - 1)
        gaps = np.exp(rng.normal(4.0, 2.0, length)).astype(np.int64) * 1000 + 1
        out.append(EventSeq.from_columns([f"it{i}" for i in items], rng.integers(0, 5, length),
                                         T0 + np.cumsum(gaps), devices=rng.choice(["ios", "android", "web"], length),
                                         locations=rng.choice(["de", "fr", "us", ""], length)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, min_time: float, max_reps: int, min_reps: int = 1
          ) -> list[float]:
    """Seconds per call, repeated until ``min_time`` total (at least ``min_reps``, at most ``max_reps``)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def once(device: torch.device, fn: Callable[..., object], *args: Any, **kwargs: Any) -> list[float]:
    """``[seconds]`` of one call ``fn(*args, **kwargs)`` (arguments bound now, not when called)."""
    return timed(partial(fn, *args, **kwargs), device, min_time=0, max_reps=1)


def med(xs: list[float]) -> float:
    return statistics.median(xs)
