"""Where a model runs: the device, the CPU threads, and the catalogue-scan precision.

>>> resolve_device("cpu")
'cpu'
>>> resolve_device("tpu")
Traceback (most recent call last):
...
models.errors.ConfigError: 'device' = 'tpu': must be one of ('auto', 'cpu', 'cuda')
"""

from __future__ import annotations

import functools
import os

import torch

from models.config import DEVICES, SCORE_DTYPES
from models.errors import ConfigError

#: ``score_dtype='auto'`` on CPU scans in bf16 only for fp32 item tables larger than this (32k items at d=64).
AUTO_BF16_MIN_TABLE_BYTES = 8 << 20


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is a ConfigError."""
    if name not in DEVICES:
        raise ConfigError("device", name, f"must be one of {DEVICES}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA requested but torch.cuda.is_available() is False")
    return name


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_cpu_threads() -> int:
    """All cores but one (the Faust event loop needs a core), at least 1."""
    return max(1, available_cores() - 1)


def resolve_score_dtype(name: str, device_type: str, table_bytes: int | None = None) -> torch.dtype | None:
    """The catalogue-scan dtype for ``score_dtype`` (None = one exact fp32 scan).

    ``auto``: bf16 on CUDA, and on CPUs with native bf16 dot products (AVX512-BF16 or AMX, read from
    ``/proc/cpuinfo``) for an fp32 item table of more than :data:`AUTO_BF16_MIN_TABLE_BYTES`
    (``table_bytes``; measured on the dev CPU, d=64, batch 128: 1.4x faster at 100k items, 1.7x at
    1M, but 1.1x *slower* at 10k, where the fp32 table stays in cache); fp32 elsewhere (emulated
    bf16 is slower).

    >>> resolve_score_dtype("float32", "cuda") is None, resolve_score_dtype("bfloat16", "cpu")
    (True, torch.bfloat16)
    >>> resolve_score_dtype("auto", "cpu", table_bytes=1 << 20) is None  # a small catalogue: fp32
    True
    """
    if name not in SCORE_DTYPES:
        raise ConfigError("serve_score_dtype", name, f"must be one of {SCORE_DTYPES}")
    if name == "float32":
        return None
    if name == "bfloat16" or device_type == "cuda":
        return torch.bfloat16
    big = table_bytes is None or table_bytes > AUTO_BF16_MIN_TABLE_BYTES
    return torch.bfloat16 if big and cpu_has_native_bf16() else None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16; Linux).
    Read once per process (every predictor and hot-swap successor asks)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
