"""Kafka security end to end, on a broker of this module's own with a SASL_SSL listener (certificates
made by keytool, users for PLAIN and SCRAM): clients of each mechanism get in, a wrong password and a
plain-text client do not; a real worker configured only with SASL_SSL settings turns events into
predictions, answers ``/healthz`` and ``/metrics`` but not Faust's ``/table`` and ``/router`` views,
and never writes the password to its log."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import orjson
import pytest

from stream_app import broker, kafka_admin
from stream_app.errors import BrokerError
from stream_app.kafka_security import client_kwargs
from stream_app.ports import free_port
from stream_app.replay import produce, synthetic
from stream_app.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a broker of its own, and a worker

PASSWORD = "Tr0ub4dor-and-3"


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """Client settings for this module's broker: its SASL_SSL listener only (PLAIN, the CA it made)."""
    port, cport, sport = _ports(3)
    data = tmp_path_factory.mktemp("kafka-sasl")
    common = dict(kafka_port=port, kafka_controller_port=cport, kafka_sasl_ssl_port=sport, data_dir=data,
                  kafka_sasl_username="nextaction", kafka_sasl_password=PASSWORD, partitions=2)
    own = Settings(broker_url=f"kafka://127.0.0.1:{port}", **common)
    broker.start(own, timeout=120)
    try:
        yield Settings(broker_url=f"kafka://127.0.0.1:{sport}", kafka_security_protocol="SASL_SSL",
                       kafka_ssl_cafile=broker.BrokerPaths.of(own).ca_pem, **common)
    finally:
        broker.stop(own)


async def _round_trip(settings, topic: str) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), acks="all")
    await kafka_admin.start_client(settings, producer.start, producer.stop)
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                group_id=None, auto_offset_reset="earliest")
    await kafka_admin.start_client(settings, consumer.start, consumer.stop)
    try:
        async with asyncio.timeout(30):
            while True:
                got = [r.value for recs in (await consumer.getmany(timeout_ms=500)).values() for r in recs]
                if got:
                    return got
    finally:
        await consumer.stop()


def test_sasl_ssl_admits_each_mechanism_and_refuses_a_wrong_password(secure):
    props = broker.BrokerPaths.of(secure).properties
    assert oct(props.stat().st_mode & 0o777) == "0o600"  # it holds the password
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        s = secure.model_copy(update={"kafka_sasl_mechanism": mechanism})
        topic = f"sec-{mechanism.lower()}"
        kafka_admin.ensure_topics(s, [topic], partitions=1)
        assert asyncio.run(_round_trip(s, topic)) == [b"hello"], mechanism
    for mechanism in ("PLAIN", "SCRAM-SHA-256"):
        wrong = Settings(**{**secure.model_dump(), "kafka_sasl_mechanism": mechanism,
                            "kafka_sasl_password": "not-the-password"})
        with pytest.raises(BrokerError):
            kafka_admin.ensure_topics(wrong, ["sec-wrong"], timeout=10)
    plain = Settings(broker_url=secure.broker_url)  # a plain-text client on the TLS port
    assert kafka_admin.probe(plain.bootstrap_servers, 3.0, plain) == 0


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_worker_with_only_sasl_ssl_settings_serves_predictions(secure, service_process, tmp_path):
    s = secure.model_copy(update={
        "app_id": "nx-secure", "topic_events": "s.events", "topic_dlq": "s.events.dlq",
        "topic_predictions": "s.predictions", "topic_outcomes": "s.outcomes", "topic_model_updates": "s.updates",
        "data_dir": tmp_path / "data", "web_port": free_port()})
    kafka_admin.ensure_topics(s)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    try:
        n = 50
        assert asyncio.run(produce(s, synthetic(n, 10, seed=3), progress=False)) == n
        preds = asyncio.run(_read(s, s.topic_predictions, n))
        assert len(preds) >= n and all("action_probs" in orjson.loads(v) for v in preds)
        status, body = _get(s.web_port, "/healthz")
        assert status == 200 and orjson.loads(body)["ok"] is True
        assert _get(s.web_port, "/metrics")[0] == 200
        user = orjson.loads(preds[0])["user_id"]
        for path in (f"/table/histories/{user}/", "/table/histories/", "/router/", "/table/"):
            assert _get(s.web_port, path)[0] == 404, path
    finally:
        assert worker.stop() == 0, worker.tail()
    log = worker.log_path.read_text(errors="replace")
    assert "nextaction" in log and PASSWORD not in log


async def _read(settings, topic: str, n: int, timeout: float = 180.0) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                group_id=None, auto_offset_reset="earliest")
    await kafka_admin.start_client(settings, consumer.start, consumer.stop)
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            out += [r.value for recs in (await consumer.getmany(timeout_ms=500)).values() for r in recs]
    finally:
        await consumer.stop()
    return out
