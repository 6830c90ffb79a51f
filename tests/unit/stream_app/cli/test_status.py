"""stream_app.cli.status: ``nextaction status`` exits 1 with one line naming the broker it could not
reach (the report itself against a real broker and worker: tests/integration/test_status.py)."""

from __future__ import annotations

from stream_app.ports import free_port


def test_status_exits_1_naming_the_broker_when_it_does_not_answer(cli):
    port = free_port()  # nothing listens there
    res = cli("status", "--timeout", "3", "--interval", "0.2", env={"NEXTACTION_BROKER_URL": f"kafka://127.0.0.1:{port}"})
    assert res.exit_code == 1, res.output
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in cli.flat(res.output)


def test_status_rejects_a_non_positive_interval(cli):
    res = cli("status", "--interval", "0")
    assert res.exit_code == 2 and "--interval must be > 0" in cli.flat(res.output)
