"""Fixtures of the CLI tests: fresh settings per test, the CLI run in-process, a faked replay."""

from __future__ import annotations

import os
import sys
import types

import pytest
from typer.testing import CliRunner


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch, tmp_path):
    """Each test reads settings afresh from its own environment."""
    from stream_app.settings import get_settings

    for name in [k for k in list(os.environ) if k.startswith("NEXTACTION_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NEXTACTION_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class Cli:
    """``cli(*args, env=None)`` runs ``nextaction ARGS`` in this process (typer's CliRunner) and returns
    its result; ``cli.flat(text)`` is CLI output with rich's box drawing and line wrapping removed."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str, env: dict[str, str] | None = None):
        from stream_app.cli import app

        return self.runner.invoke(app, list(args), env=env)

    @staticmethod
    def flat(text: str) -> str:
        return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def fake_replay(monkeypatch):
    """A stand-in ``stream_app.replay`` recording what the CLI asked for; the broker check is skipped."""
    calls: dict = {}
    mod = types.ModuleType("stream_app.replay")

    def synthetic(n_events, n_users, seed, n_items=None):
        calls["synthetic"] = (n_events, n_users, seed)
        calls["n_items"] = n_items
        return iter([{"user_id": f"u{i}", "item_id": "i", "action": "view", "ts": 1_700_000_000_000 + i}
                     for i in range(n_events)])

    def taobao_csv(path, rebase_time):
        calls["taobao"] = (str(path), rebase_time)
        return iter([{"user_id": "u", "item_id": "i", "action": "view", "ts": 1_700_000_000_000}] * 5)

    def generic_csv(path, mapping, rebase_time, ts_unit):
        calls["csv"] = (str(path), mapping, rebase_time, ts_unit)
        return iter([{"user_id": "u", "item_id": "i", "action": "view", "ts": 1_700_000_000_000}])

    async def produce(settings, events, rate, progress):
        events = list(events)
        calls["produce"] = (settings.topic_events, rate, progress, events)
        return len(events)

    mod.synthetic, mod.taobao_csv, mod.generic_csv, mod.produce = synthetic, taobao_csv, generic_csv, produce
    monkeypatch.setitem(sys.modules, "stream_app.replay", mod)
    import stream_app

    monkeypatch.setattr(stream_app, "replay", mod, raising=False)
    monkeypatch.setattr("stream_app.kafka_admin.require_broker", lambda settings, timeout=5.0: 1)
    return calls
