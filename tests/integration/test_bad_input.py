"""Bad input through the real broker: a few hundred hypothesis-drawn messages (the cases of
tests/fuzz_cases.py: malformed JSON, wrong types, huge values and keys, control characters, odd
unicode, far-future times, missing keys...) produced to ``events`` and consumed by a real worker
(``faust -A stream_app worker``). Each one ends as exactly one prediction or exactly one DLQ record
with the reason its construction calls for; every DLQ record fits the producer's limit; the worker
stays up and commits to the end of every partition (no stalled commit)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict

import orjson
import pytest

from stream_app import kafka_admin
from stream_app.kafka_security import client_kwargs
from stream_app.records import DLQ_MAX_BYTES
from tests.fuzz_cases import hypothesis_cases
from tests.integration.accounting import committed_offsets, end_offsets, read_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
EXAMPLES, SIZE = 8, 50  # 400 messages


async def _produce_raw(settings, messages) -> list[tuple[int, int]]:
    """Send ``(key, value, _)`` messages as they are; returns each one's (partition, offset)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                acks="all", enable_idempotence=True, max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(settings.topic_events, value, key=key) for key, value, _ in messages]
        return [(md.partition, md.offset) for md in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


def test_hypothesis_payloads_through_the_broker_end_as_one_prediction_or_one_dlq_record(
        app_settings, tmp_path, service_process):
    s = app_settings.model_copy(update={"window_events": 1000, "window_ttl_s": 10 * 365 * 86400})
    kafka_admin.ensure_topics(s)
    messages = hypothesis_cases(EXAMPLES, SIZE)
    expected_kinds = Counter(m[2] for m in messages)
    assert len(messages) == EXAMPLES * SIZE and len(expected_kinds) >= 10, expected_kinds  # a real mix

    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    where = asyncio.run(_produce_raw(s, messages))
    expected = dict(zip(where, (m[2] for m in messages)))
    assert len(expected) == len(messages)

    out = read_outputs(s, len(messages))
    got: dict[tuple[int, int], list[str]] = defaultdict(list)
    for p in out["predictions"]:
        got[(p["partition"], p["offset"])].append("ok")
    for d in out["dlq"]:
        got[(d["source"]["partition"], d["source"]["offset"])].append(d["reason"])
        assert d["source"]["topic"] == s.topic_events
        assert len(orjson.dumps(d)) <= DLQ_MAX_BYTES, (d["reason"], len(orjson.dumps(d)))
    wrong = [(po, want, got.get(po)) for po, want in expected.items() if got.get(po) != [want]]
    assert not wrong, f"{len(wrong)} of {len(expected)} messages: (where, expected, got) {wrong[:5]}"
    assert set(got) == set(expected), "outputs for messages never sent"

    # no stalled commit: the group commits to the end of every partition, and the worker is still up
    ends = asyncio.run(end_offsets(s, s.topic_events))
    deadline = time.monotonic() + 60
    while (committed := {p: o or 0 for p, o in asyncio.run(committed_offsets(s)).items()}) != ends and time.monotonic() < deadline:
        time.sleep(1)
    assert committed == ends, (committed, ends)
    assert worker.proc.poll() is None, worker.tail()
    assert worker.stop() == 0, worker.tail()
