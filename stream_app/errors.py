"""Every exception nextaction raises on purpose, in one place.

Each error names what was wrong and the value that made it wrong, so an operator can act on the
message alone.

>>> raise ConfigError("window_events", -3, "must be a positive integer")
Traceback (most recent call last):
...
stream_app.errors.ConfigError: setting 'window_events' = -3: must be a positive integer
"""

from __future__ import annotations


class NextActionError(Exception):
    """Base class of all errors raised by nextaction."""


class ConfigError(NextActionError, ValueError):
    """A setting (env var, CLI option or config field) has an unusable value."""

    def __init__(self, name: str, value: object, problem: str) -> None:
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"setting {name!r} = {value!r}: {problem}")


class EventRejected(NextActionError, ValueError):
    """An input event failed validation; ``reason`` is a machine-readable code for the DLQ."""

    def __init__(self, reason: str, detail: str, value: object = None) -> None:
        self.reason, self.detail, self.value = reason, detail, value
        msg = f"{reason}: {detail}"
        if value is not None:
            msg += f" (got {_short(value)})"
        super().__init__(msg)


class BrokerError(NextActionError, RuntimeError):
    """The Kafka broker could not be installed, started, stopped or reached."""


class CheckpointError(NextActionError, ValueError):
    """A model checkpoint is missing, corrupt, or does not match the code or config."""


class DatasetError(NextActionError, ValueError):
    """A dataset file is missing or does not have the expected format."""


class PredictorError(NextActionError, RuntimeError):
    """A predictor failed on a batch (after retries the affected events are dead-lettered)."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
