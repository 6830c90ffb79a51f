"""Which predictor a worker (or its inference process) serves in *this* process, from the settings.

* :func:`load_local` at start: ``settings.checkpoint``'s Transformer, hash-verified and warmed up; a
  missing, unset or bad checkpoint never stops the worker: a loud ``!!!`` warning, and the baseline
  :class:`~online.baseline.PopularityMarkovPredictor` (which learns from the stream) serves instead.
  A wrong *setting* (``device=cuda`` without a GPU) raises :class:`~models.errors.ConfigError`.
* :func:`load_successor` for a hot swap: the checkpoint an update names, checked against the hash
  the update announced, built like the current predictor (:meth:`~models.predictor.Predictor.successor`)
  or, for one that serves no checkpoint, by ``build``; raises on any problem (the caller keeps serving).

Whether the model runs in a child process is decided one level up (:mod:`stream_app.pipeline`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from models.errors import CheckpointError
from models.predictor import Predictor
from online.baseline import PopularityMarkovPredictor
from stream_app.settings import SettingsType

log = logging.getLogger(__name__)

#: ``Settings`` field → (``TransformerPredictor`` option, conversion).
SERVING_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "device": ("device", str),
    "serve_threads": ("num_threads", int),  # 0 = the predictor's default (all cores but one)
    "serve_compile": ("compile", bool),
    "kv_cache_users": ("cache_users", int),
    "kv_cache_mb": ("cache_bytes", lambda mb: int(mb) << 20),
    "kv_overflow": ("overflow", str),
    "kv_refresh_every": ("refresh_every", int),
    "kv_max_stale_deltas": ("max_stale_deltas", int),
    "serve_score_dtype": ("score_dtype", str),
    "explain_top": ("explain_top", int),  # explanations (models/explain.py): 0 = off
    "exclude_seen": ("exclude_seen", bool),  # rank only items outside the user's window
    "text_items": ("text_items", bool),  # cold-start items from text (models/text.py)
    "item_text_catalogue": ("text_catalogue", lambda p: str(p) if p else None),
}


def serving_options(settings: SettingsType) -> dict[str, Any]:
    """``TransformerPredictor`` options from ``settings`` (see :data:`SERVING_OPTIONS`).

    >>> from stream_app.settings import Settings
    >>> serving_options(Settings(device="cpu", kv_cache_mb=64))["cache_bytes"]
    67108864
    >>> "num_threads" in serving_options(Settings(serve_threads=0))
    False
    """
    opts = {}
    for name, (option, convert) in SERVING_OPTIONS.items():
        value = getattr(settings, name)
        if name == "serve_threads" and value == 0:
            continue
        opts[option] = convert(value)
    return opts


def load_transformer(settings: SettingsType, path: str | Path) -> Predictor:
    """The Transformer at ``path`` with the settings' serving options (verified; not warmed up)."""
    from models.serving import TransformerPredictor  # noqa: PLC0415 - torch only when a model is served

    if not Path(path).exists():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    return TransformerPredictor.from_checkpoint(path, **serving_options(settings))


def load_local(settings: SettingsType) -> Predictor:
    """The predictor served at start in this process (module docstring); never raises for a checkpoint."""
    path = settings.checkpoint
    if path is None:  # without importing torch (start-up -5 s)
        log.warning("!!! no model checkpoint configured (setting 'checkpoint' / NEXTACTION_CHECKPOINT is unset): "
                    "serving the BASELINE predictor (popularity + Markov), not the Transformer")
        return PopularityMarkovPredictor()
    from models.devices import resolve_device  # noqa: PLC0415

    resolve_device(settings.device)  # a wrong device setting is a config error, not a fallback
    t0 = time.perf_counter()
    try:
        pred = load_transformer(settings, path)
        pred.warm_up()
    except Exception as exc:  # noqa: BLE001 - any failure to load must not crash-loop the worker
        log.warning("!!! model checkpoint %s is unusable (%s: %s): FALLING BACK to the BASELINE predictor "
                    "(popularity + Markov); fix or replace the checkpoint", path, type(exc).__name__, exc,
                    exc_info=not isinstance(exc, CheckpointError))
        return PopularityMarkovPredictor()
    log.info("serving %r from %s (loaded in %.1f s)", pred, path, time.perf_counter() - t0)
    return pred


def load_successor(current: Predictor, path: str | Path, sha256: str | None,
                   build: Callable[[Path], Predictor]) -> Predictor:
    """The warmed-up predictor for the checkpoint at ``path`` (module docstring). Raises
    :class:`~models.errors.CheckpointError` when the checkpoint's content hash is not ``sha256``."""
    from models.checkpoint import read_manifest  # noqa: PLC0415 - files are hash-checked by the load below

    if sha256 is not None:
        actual = str(read_manifest(path)["content_hash"])
        if actual.lower() != sha256.lower():
            raise CheckpointError(f"checkpoint {str(path)!r} has content hash {actual}, the update announced {sha256}")
    new = current.successor(path, sha256) or build(Path(path))
    if sha256 is not None and not sha256.lower().startswith(str(new.version).lower()):  # changed while loading
        raise CheckpointError(f"checkpoint {str(path)!r} loaded as version {new.version}, the update announced {sha256}")
    new.warm_up()
    return new
