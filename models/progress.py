"""Progress reporting, in one place for every layer: a tqdm bar on a terminal, plain periodic lines otherwise.

A progress bar redraws itself with carriage returns; written to a log file or a CI console, every redraw
becomes a line of its own (hundreds for one replay). :func:`progress` therefore draws a bar only when
the stream it writes to (stderr) is a terminal, and otherwise writes one plain line every ``every_s``
seconds and one when it closes. Both have the part of tqdm's interface the code uses: iteration,
``update``, ``set_postfix``, ``close`` and ``with``.

>>> import io
>>> out, now = io.StringIO(), iter([0.0, 1.0, 6.0, 7.0, 8.0]).__next__
>>> with progress(total=30, desc="-> events", unit="ev", stream=out, every_s=5.0, clock=now) as bar:
...     bar.update(10); bar.set_postfix(loss="0.42"); bar.update(10); bar.update(10)
>>> print(out.getvalue(), end="")
-> events: 20/30 ev (67%), 3.3 ev/s, loss=0.42
-> events: 30/30 ev (100%) in 8.0 s, 3.8 ev/s, loss=0.42
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

#: Seconds between two plain lines (no terminal).
EVERY_S = 5.0


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where progress goes) is a terminal.

    >>> import io
    >>> interactive(io.StringIO())
    False
    """
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, leave: bool = True, stream: TextIO | None = None, every_s: float = EVERY_S,
             clock: Callable[[], float] = time.monotonic) -> Any:
    """A progress reporter over ``iterable`` (or updated by hand): a tqdm bar when ``stream`` (stderr) is a
    terminal, a :class:`PlainProgress` otherwise, nothing at all when not ``enabled``."""
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if enabled and interactive(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, stream=stream, every_s=every_s,
                         clock=clock, enabled=enabled, leave=leave)


class PlainProgress:
    """Progress as plain lines: ``desc: n/total unit (pct), rate, postfix`` every ``every_s`` seconds
    while it moves, and a last line with the elapsed time when it closes (if anything was counted and
    ``leave``: tqdm's word for keeping the finished bar)."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", stream: TextIO | None = None, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True, leave: bool = True) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream, self.every_s, self.clock, self.enabled, self.leave = stream, every_s, clock, enabled, leave
        self.n = 0.0
        self.postfix: dict[str, Any] = {}
        self.start = self.last = clock()
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("PlainProgress without an iterable: call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if self.enabled and now - self.last >= self.every_s and not (self.total and self.n >= self.total):
            self.last = now
            self._line(now, final=False)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled and self.leave and self.n:
            self._line(self.clock(), final=True)

    def line(self, now: float, final: bool) -> str:
        """The line at time ``now`` (``final``: with the elapsed time)."""
        elapsed = max(now - self.start, 1e-9)
        done = f"{self.n:,.0f}" + (f"/{self.total:,.0f}" if self.total else "") + f" {self.unit}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        parts = [done + (f" in {elapsed:.1f} s" if final else ""), f"{self.n / elapsed:,.1f} {self.unit}/s"]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _line(self, now: float, final: bool) -> None:
        stream = sys.stderr if self.stream is None else self.stream
        print(self.line(now, final), file=stream, flush=True)
