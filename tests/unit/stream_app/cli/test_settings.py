"""stream_app.cli.settings: ``nextaction settings`` prints the settings or README.md's table, and writes it."""

from __future__ import annotations

import pytest

from models.errors import NextActionError
from stream_app.cli.settings import splice
from stream_app.settings import get_settings, settings_table


def test_settings_command_markdown_write_and_show(cli, tmp_path, monkeypatch):
    res = cli("settings", "--markdown")
    assert res.exit_code == 0 and res.output == settings_table()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- BEGIN settings -->\nstale\n<!-- END settings -->\nmore\n")
    res = cli("settings", "--write-readme", "--readme", str(readme))
    assert res.exit_code == 0 and "updated" in res.output
    assert readme.read_text() == "# x\n<!-- BEGIN settings -->\n" + settings_table() + "<!-- END settings -->\nmore\n"
    res = cli("settings", "--write-readme", "--readme", str(readme))
    assert "already up to date" in res.output
    (tmp_path / "plain.md").write_text("no markers\n")
    res = cli("settings", "--write-readme", "--readme", str(tmp_path / "plain.md"))
    assert res.exit_code == 1 and "BEGIN settings" in res.output
    monkeypatch.setenv("NEXTACTION_TOP_K", "7")
    get_settings.cache_clear()
    try:
        res = cli("settings")
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0 and "TOP_K" in res.output and " 7 " in res.output


def test_splice_needs_both_markers():
    with pytest.raises(NextActionError, match="BEGIN settings"):
        splice("<!-- BEGIN settings -->\nno end\n", "| x |\n")
