"""``nextaction settings``: the settings in effect; ``--markdown`` prints the compact table of every
setting (name, default, meaning: :func:`stream_app.settings.settings_table`); ``--write-docs`` writes
the settings reference docs/settings.md (:func:`reference`: every setting by group, its environment
variable, type, default and meaning), generated from :class:`stream_app.settings.Settings` (a test
fails when the file is out of date).

>>> print(reference().splitlines()[0])
# Settings reference
>>> type_text(int), type_text(Literal["a", "b"]), type_text(Path | None)
('integer', '`a` \\\\| `b`', 'path')
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Literal, get_args, get_origin

import typer
from pydantic import SecretStr
from rich.markup import escape
from rich.table import Table

from stream_app.cli.common import console, current_settings, errors
from stream_app.settings import SettingsType, _default_text, settings_table

app = typer.Typer()

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
PREFIX = "NEXTACTION_"


def type_text(annotation: object) -> str:
    """A field's type as the reference shows it (``Optional`` is said by the default, ``unset``)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args and len(args) < len(get_args(annotation)):  # X | None
        return type_text(args[0])
    return {int: "integer", float: "number", bool: "boolean", str: "text", Path: "path",
            SecretStr: "secret text"}.get(annotation, str(annotation))  # type: ignore[call-overload]


def groups() -> list[tuple[str, list[str]]]:
    """``[(group title, [field names])]`` in the order of the ``# --- title ---`` comments of
    :class:`stream_app.settings.Settings`' source."""
    out: list[tuple[str, list[str]]] = [("Settings", [])]
    for line in inspect.getsource(SettingsType).splitlines():
        head = re.match(r"\s*# --- (.+?) -+$", line)
        if head:
            out.append((head.group(1).replace("``", "`"), []))
            continue
        field = re.match(r"    ([a-z_][a-z0-9_]*): ", line)
        if field and field.group(1) in SettingsType.model_fields:
            out[-1][1].append(field.group(1))
    return [(title, names) for title, names in out if names]


def reference() -> str:
    """docs/settings.md: every setting of :class:`~stream_app.settings.Settings`, by group."""
    fields = SettingsType.model_fields
    lines = ["# Settings reference", "",
             "Generated from `stream_app/settings.py` by `nextaction settings --write-docs`; do not edit by hand "
             "(tests/unit/stream_app/cli/test_settings.py fails when this file is out of date).", "",
             f"Every setting is an environment variable `{PREFIX}<NAME>`, read once when a process starts "
             "(the worker, the trainer, each CLI command); nothing else reads the environment. A bad value "
             "stops the process at start with the setting's name and the value. `nextaction settings` shows "
             "the values in effect (bold: set in the environment). `unset` means the setting has no value "
             "unless you give one.", ""]
    listed: set[str] = set()
    for title, names in groups():
        lines += [f"## {title[0].upper()}{title[1:]}", "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        for name in names:
            info = fields[name]
            meaning = (info.description or "").replace("|", "\\|")
            default = "empty" if info.default == "" else _default_text(info.default)
            lines.append(f"| `{PREFIX}{name.upper()}` | {type_text(info.annotation)} | {default} | {meaning} |")
            listed.add(name)
        lines.append("")
    missing = [n for n in fields if n not in listed]
    if missing:  # a field declared outside the grouped part of the class
        raise RuntimeError(f"settings {missing} are in no group of stream_app/settings.py")
    return "\n".join(lines)


@app.command("settings")
def settings_cmd(
    markdown: bool = typer.Option(False, "--markdown", help="Print every setting's default and meaning as a "
                                                            "markdown table (defaults, not the values in effect)."),
    write_docs: bool = typer.Option(False, "--write-docs", help="Write the settings reference (--docs)."),
    docs: Path = typer.Option(DOCS, help="Where --write-docs writes the reference."),
) -> None:
    """Show the settings (NEXTACTION_<SETTING>) in effect, or generate their documentation."""
    with errors():
        if write_docs:
            text = reference()
            old = docs.read_text(encoding="utf-8") if docs.exists() else None
            if text != old:
                docs.write_text(text, encoding="utf-8")
            console.print(f"{docs}: settings reference {'already up to date' if text == old else 'written'}")
        elif markdown:
            print(settings_table(), end="")
        else:
            _show(current_settings())


def _show(settings: SettingsType) -> None:
    table = Table(show_lines=False)
    for col in ("NEXTACTION_…", "value", "meaning"):
        table.add_column(col)
    for name, info in type(settings).model_fields.items():
        value = getattr(settings, name)
        shown = escape("unset" if value is None else str(value))
        table.add_row(name.upper(), shown if value == info.default else f"[bold]{shown}[/]",
                      escape(info.description or ""))
    console.print(table)
    console.print("[dim]bold: set in the environment[/]")
