"""The base exceptions of nextaction: the bottom layer, importable from every package.

Each error names what was wrong and the value that made it wrong, so an operator can act on the
message alone. Errors that belong to one domain of a higher layer (an event that fails validation,
an unreachable broker) subclass :class:`NextActionError` beside their code.

>>> raise ConfigError("window_events", -3, "must be a positive integer")
Traceback (most recent call last):
...
models.errors.ConfigError: 'window_events' = -3: must be a positive integer
"""

from __future__ import annotations


class NextActionError(Exception):
    """Base class of all errors raised by nextaction."""


class ConfigError(NextActionError, ValueError):
    """A setting, config field or option has an unusable value (``name`` says which)."""

    def __init__(self, name: str, value: object, problem: str) -> None:
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"{name!r} = {short(value)}: {problem}")


class CheckpointError(NextActionError, ValueError):
    """A model checkpoint is missing, corrupt, or does not match the code or config."""


class DatasetError(NextActionError, ValueError):
    """A dataset file is missing or does not have the expected format."""


class MissingDependencyError(NextActionError, ImportError):
    """An optional feature was asked for but the package it needs is not installed (the message names it)."""


class PredictorError(NextActionError, RuntimeError):
    """A predictor failed on a batch or broke its contract (the batch is retried, then dead-lettered)."""


def short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters.

    >>> short("x" * 100, 10)
    "'xxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
