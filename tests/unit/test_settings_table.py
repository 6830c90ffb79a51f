"""README.md's settings table is generated from Settings, and ``nextaction settings`` prints/writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.errors import NextActionError
from stream_app.cli import app
from stream_app.cli.settings import README, splice
from stream_app.settings import CACHE_ROOT, SettingsType, get_settings, settings_table

runner = CliRunner()


def test_readme_settings_table_is_generated_from_settings():
    text = README.read_text(encoding="utf-8")
    assert splice(text, settings_table()) == text, (
        "README.md's settings table differs from stream_app/settings.py: regenerate it with "
        "`nextaction settings --write-readme`")


def test_every_setting_has_a_row_with_its_default_and_meaning():
    rows = settings_table().splitlines()[2:]
    fields = SettingsType.model_fields
    assert [r.split(" | ")[0].strip("| `") for r in rows] == [n.upper() for n in fields]
    assert all(info.description for info in fields.values())
    assert "| `KAFKA_HOME` | `~/.cache/nextaction/kafka` |" in settings_table()  # not this machine's home
    assert str(CACHE_ROOT) not in settings_table()
    assert "| `CHECKPOINT` | unset |" in settings_table() and "| `GC_FREEZE` | `true` |" in settings_table()


def test_settings_command_markdown_write_and_show(tmp_path, monkeypatch):
    res = runner.invoke(app, ["settings", "--markdown"])
    assert res.exit_code == 0 and res.output == settings_table()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- BEGIN settings -->\nstale\n<!-- END settings -->\nmore\n")
    res = runner.invoke(app, ["settings", "--write-readme", "--readme", str(readme)])
    assert res.exit_code == 0 and "updated" in res.output
    assert readme.read_text() == "# x\n<!-- BEGIN settings -->\n" + settings_table() + "<!-- END settings -->\nmore\n"
    res = runner.invoke(app, ["settings", "--write-readme", "--readme", str(readme)])
    assert "already up to date" in res.output
    (tmp_path / "plain.md").write_text("no markers\n")
    res = runner.invoke(app, ["settings", "--write-readme", "--readme", str(tmp_path / "plain.md")])
    assert res.exit_code == 1 and "BEGIN settings" in res.output
    monkeypatch.setenv("NEXTACTION_TOP_K", "7")
    get_settings.cache_clear()
    try:
        res = runner.invoke(app, ["settings"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0 and "TOP_K" in res.output and " 7 " in res.output


def test_splice_needs_both_markers():
    with pytest.raises(NextActionError, match="BEGIN settings"):
        splice("<!-- BEGIN settings -->\nno end\n", "| x |\n")
    assert isinstance(README, Path) and README.name == "README.md"
