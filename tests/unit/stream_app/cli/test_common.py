"""stream_app.cli.common: the option validators name the bad value on every command, and nextaction's own
errors (a bad setting) are one line and exit status 1."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("args, message", [
    (["replay", "synthetic", "--rate", "0"], "--rate must be > 0, got 0.0"),
    (["replay", "synthetic", "--events", "-5"], "--events must be > 0, got -5"),
    (["replay", "synthetic", "--events", "many"], "Invalid value for '--events' / '-n': Input should be a valid integer"),
    (["replay", "taobao", "/nonexistent/UserBehavior.csv"], "no such file: /nonexistent/UserBehavior.csv"),
    (["tail", "predictions", "--max", "0"], "--max must be > 0, got 0"),
    (["tail", "predictions", "--timeout", "-1"], "--timeout must be > 0, got -1.0"),
    (["kafka", "start", "--timeout", "0"], "--timeout must be > 0, got 0.0"),
    (["demo", "--rate", "-3"], "--rate must be > 0, got -3.0"),
    (["demo", "--items", "0"], "--items must be > 0, got 0"),
])
def test_bad_option_values_are_named(cli, args, message):
    res = cli(*args)
    assert res.exit_code == 2
    assert message in cli.flat(res.output)


def test_bad_setting_in_environment_is_named(cli):
    res = cli("kafka", "status", env={"NEXTACTION_KAFKA_PORT": "0"})
    assert res.exit_code == 1
    assert "'kafka_port' = '0': must be >= 1" in cli.flat(res.output)
