"""One user, one partition, whatever the producer (stream_app.partitioning), against the real broker
and a real worker:

- every user's events are produced by **both** rules, alternately: the Java/murmur2 partition (aiokafka,
  Java clients) and the CRC32 partition (librdkafka's default, e.g. confluent-kafka or kcat). The
  worker re-routes the events that arrived on a partition that does not own their user, so each user
  keeps one history: 0 lost, the user's stored row (newest changelog record) holds all of the user's
  events in event-time order, and the re-route count on
  ``/metrics`` equals the number of events the CRC32 rule put elsewhere;
- co-partitioning: a repartition topic whose partition count differs from ``events`` (created by
  hand, say) stops the worker loudly instead of splitting users.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from stream_app import kafka_admin
from stream_app.kafka_security import client_kwargs
from stream_app.partitioning import crc32_partition, java_partition
from stream_app.replay import encode, synthetic
from stream_app.records import decode_state
from tests.integration.accounting import metric, read_outputs, read_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


async def _produce_by_both_rules(settings, events, rate: float) -> int:
    """Send ``events`` in order, the i-th of each user to the Java partition of its key when i is even
    and to the CRC32 partition when odd; returns how many landed where the Java rule would not put them."""
    from aiokafka import AIOKafkaProducer

    n = settings.partitions
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                acks="all", enable_idempotence=True)
    await producer.start()
    seen: dict[str, int] = defaultdict(int)
    elsewhere = 0
    try:
        for ev in events:
            key, value = encode(ev)
            rule = java_partition if seen[ev["user_id"]] % 2 == 0 else crc32_partition
            seen[ev["user_id"]] += 1
            partition = rule(key, n)
            elsewhere += partition != java_partition(key, n)
            await (await producer.send(settings.topic_events, value, key=key, partition=partition))
            await asyncio.sleep(1 / rate)
    finally:
        await producer.stop()
    return elsewhere


def _round_robin(events) -> list[dict]:
    """The events, each user's in their order, users taking turns."""
    queues = defaultdict(list)
    for e in events:
        queues[e["user_id"]].append(e)
    out, i = [], 0
    while any(queues.values()):
        for q in queues.values():
            if i < len(q):
                out.append(q[i])
        i += 1
        if all(i >= len(q) for q in queues.values()):
            break
    return out


def test_one_user_produced_by_both_partitioners_keeps_one_history(app_settings, tmp_path, service_process):
    s = app_settings.model_copy(update={"window_events": 1000, "window_ttl_s": 10 * 365 * 86400})
    kafka_admin.ensure_topics(s)
    events = _round_robin(synthetic(600, 24, seed=21))
    users = {e["user_id"] for e in events}
    split = [u for u in users if java_partition(u.encode(), s.partitions) != crc32_partition(u.encode(), s.partitions)]
    assert len(split) >= len(users) // 2, "most users must be split by the two rules for this test to mean anything"

    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    elsewhere = asyncio.run(_produce_by_both_rules(s, events, rate=200))
    assert elsewhere > 100
    out = read_outputs(s, len(events))

    fresh = [p for p in out["predictions"] if not p["duplicate"]]
    assert len(fresh) == len(events) and not out["dlq"], (len(fresh), out["dlq"][:3])  # 0 lost
    # one history per user, in event-time order: the newest changelog record of each user's row holds
    # all of the user's events (a prediction made while a re-routed event was still on its way sees
    # the history without it, so predictions' history lengths alone need not be in time order)
    changelog = f"{s.app_id}-histories-changelog"
    rows = asyncio.run(read_topics(s, [changelog], lambda o: False, 5))[changelog]
    newest = {m.key: m.value for m in sorted(rows, key=lambda m: m.offset)}
    assert len({m.key: m.partition for m in rows}) == len(users)  # one row (one partition) per user
    for user in users:
        mine = [e for e in events if e["user_id"] == user]
        h = decode_state(newest[user.encode()]).history  # raises on times out of order
        assert (list(h.items), [int(t) for t in h.ts]) == ([e["item_id"] for e in mine], [e["ts"] for e in mine]), user
    # records name where the event first arrived: every produced (partition, offset) exactly once
    assert {(p["partition"], p["offset"]) for p in fresh} == {(m.partition, m.offset) for m in out["events"]}
    deadline = time.monotonic() + 10
    while metric(worker.metrics(), "nextaction_events_rerouted_total") < elsewhere and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(worker.metrics(), "nextaction_events_rerouted_total") == elsewhere
    assert worker.stop() == 0, worker.tail()


def test_a_repartition_topic_with_another_partition_count_stops_the_worker(app_settings, tmp_path, service_process):
    s = app_settings
    assert kafka_admin.ensure_topics(s, [s.topic_repartition], partitions=s.partitions - 1) == \
        {s.topic_repartition: s.partitions - 1}  # made by hand, before the app's other topics
    kafka_admin.ensure_topics(s)
    worker = service_process("worker", s, tmp_path / "worker.log")
    try:
        worker.start()
    except AssertionError as exc:  # exited before its web server answered: also loud enough
        assert "partitions" in str(exc), exc
        return
    (key, value), = [encode(e) for e in synthetic(1, 1, seed=3)]
    asyncio.run(_send(s, key, value))
    deadline = time.monotonic() + 60
    while worker.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker.proc.poll() is not None and worker.proc.returncode != 0, worker.tail()
    assert f"repartition topic {s.topic_repartition!r} has {s.partitions - 1} partitions" in \
        worker.log_path.read_text(errors="replace"), worker.tail()


async def _send(settings, key, value) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic_events, value, key=key)
    finally:
        await producer.stop()
