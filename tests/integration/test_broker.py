"""stream_app.broker against the real thing: start/stop/status, port clashes, a restart that keeps its
data, and a produce/consume round trip through the session broker (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from stream_app import broker, kafka_admin
from stream_app.errors import BrokerError
from stream_app.kafka_security import client_kwargs
from stream_app.settings import Settings

pytestmark = pytest.mark.integration


def _own_broker(settings) -> bool:
    return broker.BrokerPaths.of(settings).pid_file.is_file()


def test_start_is_idempotent_and_status_answers(kafka_broker):
    if not _own_broker(kafka_broker):
        pytest.skip("NEXTACTION_TEST_BROKER_URL: the broker is not ours to start")
    before = broker.status(kafka_broker)
    again = broker.start(kafka_broker, timeout=30)
    assert again.started is False
    assert again.pid == before.pid
    st = broker.status(kafka_broker)
    assert st.running and st.answering and st.brokers == 1
    assert st.bootstrap == f"127.0.0.1:{kafka_broker.kafka_port}"
    assert st.log.is_file() and "Kafka Server started" in st.log.read_text()
    props = broker.BrokerPaths.of(kafka_broker).properties.read_text()
    for line in ("process.roles=broker,controller", "group.initial.rebalance.delay.ms=0",
                 "transaction.state.log.min.isr=1", "transaction.state.log.replication.factor=1",
                 f"controller.quorum.voters=1@127.0.0.1:{kafka_broker.kafka_controller_port}"):
        assert line in props


def test_produce_consume_round_trip(app_settings):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = app_settings.topic_events
    kafka_admin.ensure_topics(app_settings, [topic], partitions=2)
    sent = {f"u{i}": f'{{"n": {i}}}'.encode() for i in range(50)}

    async def run() -> dict[str, bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=app_settings.bootstrap_servers, **client_kwargs(app_settings), acks="all")
        await producer.start()
        try:
            for key, value in sent.items():
                await producer.send(topic, value, key=key.encode())
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=app_settings.bootstrap_servers, **client_kwargs(app_settings),
                                    group_id=app_settings.app_id, auto_offset_reset="earliest")
        await consumer.start()
        got: dict[str, bytes] = {}
        try:
            async with asyncio.timeout(30):
                while len(got) < len(sent):
                    for recs in (await consumer.getmany(timeout_ms=500)).values():
                        got.update((r.key.decode(), r.value) for r in recs)
        finally:
            await consumer.stop()
        return got

    assert asyncio.run(run()) == sent


@pytest.mark.slow  # ~2 s: the probe of the port's holder waits for its answer
def test_start_refuses_a_port_held_by_another_process(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            cport = spare.getsockname()[1]
        settings = Settings(kafka_port=port, kafka_controller_port=cport, data_dir=tmp_path,
                            broker_url=f"kafka://127.0.0.1:{port}")
        with pytest.raises(BrokerError, match=rf"port {port} on 127\.0\.0\.1 \(kafka_port\) is already in use by "
                                              r"another process"):
            broker.start(settings, timeout=10)
    assert not broker.BrokerPaths.of(settings).pid_file.exists()


def test_start_names_a_foreign_kafka_broker(kafka_broker, tmp_path):
    # Another data dir, same port as the session broker: not ours, but it is Kafka.
    settings = Settings(kafka_port=kafka_broker.kafka_port, kafka_controller_port=kafka_broker.kafka_controller_port,
                        data_dir=tmp_path, broker_url=kafka_broker.broker_url)
    with pytest.raises(BrokerError, match=rf"port {kafka_broker.kafka_port} .* in use by a Kafka broker .*"
                                          "NEXTACTION_BROKER_URL"):
        broker.start(settings, timeout=10)


def test_stop_is_idempotent_and_status_reports_down(tmp_path):
    settings = Settings(kafka_port=1, kafka_controller_port=2, data_dir=tmp_path)  # nothing was ever started
    assert broker.stop(settings) is False
    assert broker.stop(settings) is False
    paths = broker.BrokerPaths.of(settings)
    paths.root.mkdir(parents=True)
    paths.pid_file.write_text("999999\n")  # stale pid file
    assert broker.stop(settings) is False
    assert not paths.pid_file.exists()
    st = broker.status(settings, probe_timeout=1.0)
    assert not st.running and not st.answering and st.pid is None


@pytest.mark.slow  # starts (twice) a second broker of its own
def test_stop_then_start_again_keeps_data(tmp_path_factory):
    """A second, private broker: stop is clean and idempotent, and a restart reuses the formatted storage."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port, cport = a.getsockname()[1], b.getsockname()[1]
    settings = Settings(broker_url=f"kafka://127.0.0.1:{port}", kafka_port=port, kafka_controller_port=cport,
                        data_dir=tmp_path_factory.mktemp("kafka-restart"), partitions=2)
    try:
        first = broker.start(settings, timeout=120)
        assert first.started and first.answering
        kafka_admin.ensure_topics(settings, ["kept"])
        cluster_id = broker.BrokerPaths.of(settings).cluster_id_file.read_text()
        assert broker.stop(settings) is True
        assert broker.stop(settings) is False
        assert not broker.status(settings, probe_timeout=1.0).answering
        second = broker.start(settings, timeout=120)
        assert second.started and second.pid != first.pid
        assert broker.BrokerPaths.of(settings).cluster_id_file.read_text() == cluster_id
        assert kafka_admin.ensure_topics(settings, ["kept"]) == {"kept": 2}
    finally:
        broker.stop(settings)
