"""The stream's own exceptions (the base hierarchy is :mod:`models.errors`).

>>> raise EventRejected("bad_action", "action must be one of view, click", "jump")
Traceback (most recent call last):
...
stream_app.errors.EventRejected: bad_action: action must be one of view, click (got 'jump')
"""

from __future__ import annotations

import reprlib

from models.errors import NextActionError, short

#: Bounded repr of a rejected value: JSON nested 1000 deep (orjson allows 1024) would overflow the
#: plain ``repr`` (RecursionError), and a huge container would be rendered whole only to be cut.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxstring = 3, 4, 4, 4, 70


class EventRejected(NextActionError, ValueError):
    """An input event failed validation; ``reason`` is a machine-readable code for the DLQ."""

    def __init__(self, reason: str, detail: str, value: object = None) -> None:
        self.reason, self.detail, self.value = reason, detail, value
        msg = f"{reason}: {detail}"
        if value is not None:
            msg += f" (got {short(_repr.repr(value) if isinstance(value, (list, dict, tuple)) else value)})"
        super().__init__(msg)


class BrokerError(NextActionError, RuntimeError):
    """The Kafka broker could not be installed, started, stopped or reached."""
