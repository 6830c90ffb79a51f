"""``nextaction settings``: the settings in effect, or (``--markdown``) README.md's settings table
generated from :class:`stream_app.settings.Settings`, which ``--write-readme`` puts between the
``<!-- BEGIN settings -->`` and ``<!-- END settings -->`` lines of README.md.

>>> splice("intro\\n<!-- BEGIN settings -->\\nold\\n<!-- END settings -->\\nend\\n", "| new |\\n")
'intro\\n<!-- BEGIN settings -->\\n| new |\\n<!-- END settings -->\\nend\\n'
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from models.errors import NextActionError
from stream_app.cli.common import console, current_settings, errors
from stream_app.settings import SettingsType, settings_table

app = typer.Typer()

BEGIN, END = "<!-- BEGIN settings -->", "<!-- END settings -->"
README = Path(__file__).resolve().parents[2] / "README.md"


def splice(text: str, table: str) -> str:
    """``text`` with the lines between the settings markers replaced by ``table``."""
    head, sep, rest = text.partition(BEGIN + "\n")
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise NextActionError(f"no {BEGIN!r} and {END!r} lines to put the settings table between")
    return head + sep + table + sep2 + tail


@app.command("settings")
def settings_cmd(
    markdown: bool = typer.Option(False, "--markdown", help="Print README.md's table (defaults, not the values "
                                                            "in effect) as markdown."),
    write_readme: bool = typer.Option(False, "--write-readme", help="Write that table into --readme."),
    readme: Path = typer.Option(README, help="The README to write."),
) -> None:
    """Show the settings (NEXTACTION_<SETTING>) in effect, or README.md's settings table."""
    with errors():
        if write_readme:
            text = readme.read_text(encoding="utf-8")
            new = splice(text, settings_table())
            if new != text:
                readme.write_text(new, encoding="utf-8")
            console.print(f"{readme}: settings table {'updated' if new != text else 'already up to date'}")
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
