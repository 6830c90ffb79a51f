"""stream_app.cli.kafka: ``nextaction kafka status|stop|start`` without a broker."""

from __future__ import annotations

from stream_app.ports import free_port


def test_kafka_status_when_down_exits_1(cli):
    port = free_port()  # bound here and closed again: nothing listens on it
    res = cli("kafka", "status", env={"NEXTACTION_KAFKA_PORT": str(port),
                                      "NEXTACTION_BROKER_URL": f"kafka://127.0.0.1:{port}"})
    assert res.exit_code == 1
    assert "not running" in res.output and f"127.0.0.1:{port}" in res.output


def test_kafka_stop_when_not_running(cli):
    res = cli("kafka", "stop")
    assert res.exit_code == 0 and "was not running" in res.output


def test_same_kafka_and_controller_port_is_rejected(cli):
    res = cli("kafka", "start", env={"NEXTACTION_KAFKA_PORT": "19555", "NEXTACTION_KAFKA_CONTROLLER_PORT": "19555"})
    assert res.exit_code == 1
    assert "'kafka_controller_port' = 19555: must differ from kafka_port" in cli.flat(res.output)
