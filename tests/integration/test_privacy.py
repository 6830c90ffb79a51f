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


def _metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, as exposed) in a ``/metrics`` text; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_forget_reaches_the_trainer_which_drops_the_users_pending_and_replayed_examples(
        app_settings, make_checkpoint, service_process, tmp_path):
    """A real worker and a real ``nextaction trainer``: three users' outcomes are learned (so the
    trainer replays them), then one more each is read and waits (pending); ``nextaction forget X``
    goes through the worker to the trainer, which drops X's pending and replayed examples (its
    /metrics), learns only the others', and never logs X at INFO; X comes back with no history and no
    outcome paired with its old prediction, the others are untouched."""
    from stream_app.ports import free_port
    from stream_app.records import forget_user_of

    x = "forget-me-5b1e"
    ck = make_checkpoint(0, items=40)
    # a step takes exactly 6 examples; fewer wait (pending) for as long as the test runs
    s = app_settings.model_copy(update={
        "state_idle_ttl_s": 0, "checkpoint": str(ck), "models_dir": tmp_path / "models", "partitions": 1,
        "device": "cpu", "trainer_port": free_port(), "trainer_batch": 6, "trainer_max_wait_s": 3600.0,
        "trainer_delta_interval_s": 0.5, "trainer_start": "earliest", "serve_threads": 1})
    kafka_admin.ensure_topics(s, [s.topic_events, s.topic_dlq, s.topic_predictions, s.topic_outcomes,
                                  s.topic_model_updates])
    worker = service_process("worker", s, tmp_path / "worker.log")
    trainer = service_process("trainer", s, tmp_path / "trainer.log")
    worker.start()
    trainer.start()
    trainer.wait_log("trainer reading", 60)

    def metric(name):
        return _metric(trainer.metrics(), name)

    def wait_metric(name, value, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and metric(name) != value:
            time.sleep(0.3)
        assert metric(name) == value, f"{name} = {metric(name)}, expected {value}\n{trainer.tail()}"

    learned = 'nextaction_online_examples_total{result="learned"}'
    now = int(time.time() * 1000) - 60_000
    users = ("a", x, "b")
    # 3 events each: 2 outcomes each = 6, learned in one step (and then in the replay buffer)
    asyncio.run(_produce(s, [(u, f"i{n}", now + 1000 * n + k) for n in range(3) for k, u in enumerate(users)]))
    wait_metric(learned, 6.0)
    # one more each: 3 outcomes, read and pending (fewer than a step's 6)
    asyncio.run(_produce(s, [(u, "i3", now + 3000 + k) for k, u in enumerate(users)]))
    wait_metric("nextaction_online_pending_examples", 3.0)

    asyncio.run(send_forget(s, [x]))
    wait_metric('nextaction_online_examples_total{result="forget"}', 1.0)
    assert metric('nextaction_online_forgotten_examples_total{where="pending"}') == 1.0  # X's waiting example
    assert metric('nextaction_online_forgotten_examples_total{where="replay"}') == 2.0  # X's learned ones
    assert metric("nextaction_online_pending_examples") == 2.0  # a's and b's stay
    assert metric(learned) == 6.0

    # X again, and a and b twice more: X starts afresh (no outcome), a and b's 4 outcomes complete a step
    asyncio.run(_produce(s, [(x, "i4", now + 4000)] + [(u, f"i{n}", now + 1000 * n + k)
                                                         for n in (5, 6) for k, u in enumerate(("a", "b"))]))
    wait_metric(learned, 12.0)  # 6 + a's and b's 6: X's pending example was never learned
    assert metric('nextaction_online_forgotten_examples_total{where="pending"}') == 1.0

    preds = predictions(s, 17)
    assert [p["history_len"] for p in preds if p["user_id"] == x] == [1, 2, 3, 4, 1]  # X's old state is gone
    assert [p["history_len"] for p in preds if p["user_id"] == "a"] == [1, 2, 3, 4, 5, 6]  # untouched
    outcome_recs = [orjson.loads(r.value) for r in asyncio.run(_read(s, s.topic_outcomes, lambda out: len(out) >= 14))]
    markers = [k for k, o in enumerate(outcome_recs) if forget_user_of(o) == x]
    assert len(markers) == 1
    assert not [o for o in outcome_recs[markers[0] + 1:] if o.get("user_id") == x]  # nothing paired with the old state
    assert len(outcome_recs) == 6 + 3 + 1 + 4  # the marker, and none for X's first event after it

    for proc in (trainer, worker):
        log_text = proc.log_path.read_text()
        assert x not in log_text, f"the forgotten user's id is in the {proc.kind} log (INFO)"
    assert "forget marker: dropped 1 pending and 2 replayed examples" in trainer.log_path.read_text()
    assert trainer.stop() == 0, trainer.tail()
    assert worker.stop() == 0, worker.tail()
