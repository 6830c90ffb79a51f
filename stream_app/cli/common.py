"""What every command group of the CLI shares: the consoles, :func:`errors` (nextaction's own errors
as one red line and exit status 1), option validators and the settings.

>>> positive("--rate")(2.5)
2.5
>>> try:
...     positive("--rate")(0)
... except typer.BadParameter as exc:
...     print(exc)
--rate must be > 0, got 0
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from models.errors import NextActionError
from stream_app.settings import SettingsType, get_settings

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn nextaction's own errors into one red line and exit status 1 (tracebacks are for bugs)."""
    try:
        yield
    except NextActionError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def current_settings() -> SettingsType:
    """The process-wide settings (``NEXTACTION_*``, read once)."""
    return get_settings()


def positive(name: str) -> Callable:
    """An option callback: ``name`` must be > 0 (or unset)."""
    def check(value: float | int | None):
        if value is not None and value <= 0:
            raise typer.BadParameter(f"{name} must be > 0, got {value}")
        return value
    return check


def existing_file(path: Path) -> Path:
    """An argument callback: ``path`` must be a file."""
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {path}")
    return path
