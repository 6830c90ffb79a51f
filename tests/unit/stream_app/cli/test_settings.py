"""stream_app.cli.settings: ``nextaction settings`` shows the settings in effect, prints the compact table,
and writes the settings reference docs/settings.md, which must be what the code generates."""

from __future__ import annotations

import re

from stream_app.cli.settings import DOCS, groups, reference, type_text
from stream_app.settings import SettingsType, get_settings, settings_table


def test_docs_settings_md_is_generated_from_settings():
    assert DOCS.read_text(encoding="utf-8") == reference(), (
        "docs/settings.md differs from stream_app/settings.py: regenerate it with `nextaction settings --write-docs`")


def test_the_reference_lists_every_setting_once_with_its_variable_type_default_and_meaning():
    text = reference()
    rows = [line for line in text.splitlines() if line.startswith("| `NEXTACTION_")]
    fields = SettingsType.model_fields
    assert [r.split("`")[1] for r in rows] == [f"NEXTACTION_{n.upper()}" for g in groups() for n in g[1]]
    assert sorted(r.split("`")[1] for r in rows) == sorted(f"NEXTACTION_{n.upper()}" for n in fields)
    assert all(len(re.split(r"(?<!\\)\|", r)) == 6 for r in rows)  # 4 cells: escaped pipes stay inside
    assert "| `NEXTACTION_WINDOW_EVENTS` | integer | `50` | per-user history: at most this many events ... |" in rows
    assert "| `NEXTACTION_CHECKPOINT` | path | unset |" in text and "| `NEXTACTION_GROUP_INSTANCE_ID` | text | empty |" in text
    assert "| `NEXTACTION_KAFKA_SASL_PASSWORD` | secret text | unset |" in text
    assert "| `NEXTACTION_DEVICE` | `auto` \\| `cpu` \\| `cuda` | `auto` |" in text
    assert "| `NEXTACTION_KAFKA_HOME` | path | `~/.cache/nextaction/kafka` |" in text  # not this machine's home
    titles = [t for t, _ in groups()]
    assert titles[0] == "Kafka" and "online learning (`nextaction trainer`; stream_app/training.py, online/trainer.py)" \
        in titles and "## Online learning (`nextaction trainer`; " in text and "## Operations" in text
    assert type_text(float) == "number" and type_text(bool) == "boolean"


def test_settings_command_markdown_write_docs_and_show(cli, tmp_path, monkeypatch):
    res = cli("settings", "--markdown")
    assert res.exit_code == 0 and res.output == settings_table()
    docs = tmp_path / "settings.md"
    res = cli("settings", "--write-docs", "--docs", str(docs))
    assert res.exit_code == 0 and "written" in res.output and docs.read_text() == reference()
    res = cli("settings", "--write-docs", "--docs", str(docs))
    assert "already up to date" in cli.flat(res.output)
    docs.write_text("stale\n")
    res = cli("settings", "--write-docs", "--docs", str(docs))
    assert "written" in res.output and docs.read_text() == reference()
    monkeypatch.setenv("NEXTACTION_TOP_K", "7")
    get_settings.cache_clear()
    try:
        res = cli("settings")
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0 and "TOP_K" in res.output and " 7 " in res.output
