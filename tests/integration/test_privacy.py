"""Privacy end to end (docs/privacy.md): ``nextaction forget`` through a real worker and broker, the
changelog tombstone, a restore from the changelog without the user, and the idle sweep."""

from __future__ import annotations

import asyncio
import shutil
import time

import orjson
import pytest

from stream_app.kafka_security import client_kwargs
from stream_app import kafka_admin
from stream_app.cli.stream import send_forget

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _produce(settings, events):
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings))
    await producer.start()
    try:
        for user, item, ts in events:
            await producer.send_and_wait(settings.topic_events, orjson.dumps(
                {"user_id": user, "item_id": item, "action": "view", "ts": ts}), key=user.encode())
    finally:
        await producer.stop()


async def _read(settings, topic, until, timeout=120.0):
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        for _ in range(100):
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if parts:
                break
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline and not until(out):
            for msgs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


def predictions(settings, n):
    recs = asyncio.run(_read(settings, settings.topic_predictions, lambda out: len(out) >= n))
    assert len(recs) >= n, f"{len(recs)} predictions, expected {n}"
    return [orjson.loads(r.value) for r in recs]


def test_forget_tombstones_the_user_and_a_restore_from_the_changelog_does_not_bring_it_back(
        app_settings, service_process, tmp_path):
    s = app_settings.model_copy(update={"state_idle_ttl_s": 0})
    kafka_admin.ensure_topics(s)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    now = int(time.time() * 1000)
    asyncio.run(_produce(s, [(u, f"i{n}", now - 10_000 + n) for n in range(3) for u in ("a", "b", "c")]))
    predictions(s, 9)
    asyncio.run(send_forget(s, ["b"]))
    asyncio.run(_produce(s, [("b", "x", now), ("a", "x", now)]))
    got = predictions(s, 11)[9:]
    assert {p["user_id"]: p["history_len"] for p in got} == {"b": 1, "a": 4}
    changelog = f"{s.app_id}-histories-changelog"
    recs = asyncio.run(_read(s, changelog, lambda out: any(r.key == b"b" and r.value is None for r in out)))
    assert any(r.key == b"b" and r.value is None for r in recs)  # the tombstone
    assert worker.stop() == 0
    shutil.rmtree(s.data_dir / s.app_id)  # RocksDB gone: the restart restores from the changelog
    worker.start()
    asyncio.run(_produce(s, [("b", "y", now + 1), ("c", "y", now + 1)]))
    got = predictions(s, 13)[11:]
    assert {p["user_id"]: p["history_len"] for p in got} == {"b": 2, "c": 4}  # b: only its post-forget event
    assert 'nextaction_forgets_total{reason="request",result="forgotten"}' not in worker.metrics()  # a new process
    worker.stop()


def test_the_idle_sweep_forgets_users_not_seen_for_the_ttl(app_settings, service_process, tmp_path):
    s = app_settings.model_copy(update={"state_idle_ttl_s": 3, "state_sweep_interval_s": 1.0})
    kafka_admin.ensure_topics(s)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    now = int(time.time() * 1000)
    asyncio.run(_produce(s, [("a", "i1", now - 1000), ("a", "i2", now - 500)]))
    predictions(s, 2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 'reason="idle",result="forgotten"} 1.0' not in worker.metrics():
        time.sleep(0.5)
    assert 'nextaction_forgets_total{reason="idle",result="forgotten"} 1.0' in worker.metrics()
    asyncio.run(_produce(s, [("a", "i3", now)]))
    assert predictions(s, 3)[2]["history_len"] == 1
    worker.stop()
