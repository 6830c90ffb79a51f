"""Shared helpers of the predictor benchmarks (predictor_throughput.py, cost_scaling.py).

* a random-init :class:`~models.model.NextActionModel` of a given size + synthetic histories;
* a timer that repeats a callable until a time budget (with a device sync);
* the machine description and the ``benchmarks/RESULTS.md`` section writer, which replaces only the
  text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` so other sections survive.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
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


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def machine(device: torch.device) -> str:
    """One line: CPU model and cores (lscpu), memory, load average, torch threads, GPU if any."""
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem_gb = float("nan")
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return (f"CPU `{cpu}`, {cores} cores available, {mem_gb:.0f} GiB RAM, load average {load} (1/5/15 min), "
            f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads; GPU: {gpu}")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def publish(section: str, text: str, *, write: bool) -> None:
    """Print a results section and, if ``write``, put it into RESULTS.md."""
    print(text)
    if write:
        write_section(section, text)
        print(f"wrote section {section!r} of {RESULTS}")


def write_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``name`` section of RESULTS.md, leaving every other section as it was."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        if b < len(text) and text[b] == "\n":
            b += 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(f".md.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
