"""stream_app.settings: every setting is documented (the reference docs/settings.md generated from them:
tests/unit/stream_app/cli/test_settings.py)."""

from __future__ import annotations

from stream_app.settings import CACHE_ROOT, SettingsType, settings_table


def test_every_setting_has_a_row_with_its_default_and_meaning():
    rows = settings_table().splitlines()[2:]
    fields = SettingsType.model_fields
    assert [r.split(" | ")[0].strip("| `") for r in rows] == [n.upper() for n in fields]
    assert all(info.description for info in fields.values())
    assert "| `KAFKA_HOME` | `~/.cache/nextaction/kafka` |" in settings_table()  # not this machine's home
    assert str(CACHE_ROOT) not in settings_table()
    assert "| `CHECKPOINT` | unset |" in settings_table() and "| `GC_FREEZE` | `true` |" in settings_table()
