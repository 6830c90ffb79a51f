"""Process-wide tuning of a worker (and of its inference process), applied once at start.

>>> import logging; logging.getLogger().setLevel(logging.DEBUG)
>>> reset_root_log_level("warn"); logging.getLogger().level == logging.INFO
True
"""

from __future__ import annotations

import gc
import logging


def reset_root_log_level(level_name: str) -> None:
    """Undo Faust's root logger at DEBUG when the worker runs with ``-l warn``/``error``/``crit``.

    With a level of WARN or above, Faust keeps its terminal spinner and sets the *root* logger to
    DEBUG, so every ``log.debug`` in aiokafka/faust builds a LogRecord (+28 % worker CPU per event,
    measured). Unless the configured level is ``debug``, the root logger is raised to at least INFO.
    """
    root = logging.getLogger()
    if str(level_name).lower() != "debug" and root.level < logging.INFO:
        root.setLevel(logging.INFO)


def freeze_heap() -> None:
    """Move everything allocated during start-up (Faust, aiokafka, the model, torch) out of the
    garbage collector's reach (``gc.freeze``): per-event garbage is young and short-lived, but every
    full collection would otherwise traverse the whole start-up heap again (setting ``gc_freeze``)."""
    gc.collect()
    gc.freeze()
