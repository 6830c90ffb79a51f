"""Delivery guarantees through a real broker: a produce that fails, and ``exactly_once`` under ``kill -9``.

* A produce the broker refuses (the ``predictions`` topic's ``max.message.bytes`` set below any
  prediction's size: a real broker-side failure, no mock): the worker must not commit the offset of
  any event whose prediction was lost, and must exit loudly; once the topic accepts records again, a
  restarted worker processes the uncommitted events and nothing is missing.
* ``processing_guarantee=exactly_once``: the worker is SIGKILLed mid-stream and restarted; a
  ``read_committed`` reader sees every valid event predicted, at most one outcome per event and no
  unmarked repeat; the few marked repeats and activity counts are reported (not yet exact: see
  docs/reliability.md, exactly-once).

Each test prints one ``DELIVERY {...}`` line with its counts (benchmarks/RESULTS.md, reliability table).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter, defaultdict

import orjson
import pytest

from stream_app import kafka_admin
from stream_app.errors import EventRejected
from stream_app.events import parse_event
from stream_app.kafka_security import client_kwargs
from stream_app.replay import produce, synthetic
from tests.integration.accounting import committed_offsets, read_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
WINDOW_S = 10_000_000  # activity windows of ~116 days: every event of a test falls in one


# --- helpers ---------------------------------------------------------------------------------------------
def read_all(settings, n_inputs: int, timeout: float = 180.0, isolation: str = "read_uncommitted"):
    s = settings

    def covered(out):
        if len(out[s.topic_events]) < n_inputs:
            return False
        seen = {(p["partition"], p["offset"]) for p in map(_json, out[s.topic_predictions])}
        seen |= {(d["source"]["partition"], d["source"]["offset"]) for d in map(_json, out[s.topic_dlq])}
        return len(seen) >= n_inputs

    topics = [s.topic_events, s.topic_predictions, s.topic_dlq, s.topic_outcomes]
    return asyncio.run(read_topics(s, topics, covered, timeout, isolation))


def _json(msg):
    return orjson.loads(msg.value)


async def _set_topic_config(settings, topic: str, config: dict[str, str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings))
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=config)])
    finally:
        await admin.close()


def account(settings, out) -> dict:
    """Counts by source (partition, offset): lost, predictions (first-time / marked duplicates /
    unmarked duplicates), outcomes (and duplicated ones), DLQ; checks activity counts per user."""
    s = settings
    inputs = {(m.partition, m.offset): m for m in out[s.topic_events]}
    preds = defaultdict(list)
    for m in out[s.topic_predictions]:
        p = _json(m)
        preds[(p["partition"], p["offset"])].append(p)
    dlq = Counter((d["source"]["partition"], d["source"]["offset"]) for d in map(_json, out[s.topic_dlq]))
    outcomes = Counter((o["partition"], o["offset"]) for o in map(_json, out[s.topic_outcomes]))
    now_ms = int(time.time() * 1000)
    lost = marked = unmarked = valid = 0
    activity_ok = True
    by_user = defaultdict(list)
    for po, m in inputs.items():
        try:
            ev = parse_event(m.value, now_ms=now_ms, key=m.key or b"")
        except EventRejected:
            lost += dlq[po] == 0
            continue
        valid += 1
        records = preds[po]
        if not records:
            lost += 1
            continue
        fresh = [p for p in records if not p["duplicate"]]
        marked += len(records) - len(fresh)
        unmarked += max(0, len(fresh) - 1)
        by_user[ev.user_id].append((ev.ts, fresh[0] if fresh else records[0]))
    for events in by_user.values():  # one activity window holds all of a test's events (WINDOW_S)
        events.sort(key=lambda x: x[0])
        activity_ok &= [p["activity"] for _, p in events] == list(range(1, len(events) + 1))
    return {"inputs": len(inputs), "valid": valid, "predictions": sum(map(len, preds.values())), "lost": lost,
            "dup_marked": marked, "dup_unmarked": unmarked, "dlq": sum(dlq.values()),
            "outcomes": sum(outcomes.values()), "outcome_dups": sum(n - 1 for n in outcomes.values() if n > 1),
            "activity_exact": activity_ok}


def _valid_events(n: int, users: int, seed: int) -> list[dict]:
    start = int(time.time() * 1000) - 120_000
    evs = sorted(synthetic(n, users, seed=seed), key=lambda e: e["ts"])
    for i, e in enumerate(evs):  # recent, distinct times, in order (under the clock-skew limits)
        e["ts"] = start + 10 * i
    return evs


# --- tests -----------------------------------------------------------------------------------------------
def test_a_refused_produce_is_never_committed_past_and_a_restart_recovers(app_settings, tmp_path, service_process):
    s = app_settings.model_copy(update={"window_events": 1000, "activity_window_s": WINDOW_S})
    kafka_admin.ensure_topics(s)
    asyncio.run(_set_topic_config(s, s.topic_predictions, {"max.message.bytes": "64"}))  # every prediction is larger
    evs = _valid_events(400, 40, seed=3)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    t0 = time.monotonic()
    asyncio.run(produce(s, [{**e} for e in evs], progress=False))
    try:
        rc = worker.proc.wait(120)
    except Exception:  # noqa: BLE001
        raise AssertionError(f"the worker kept running after its produces failed:\n{worker.tail()}") from None
    crashed_s = time.monotonic() - t0
    log = worker.log_path.read_text(errors="replace")
    assert rc != 0 and "a produce failed" in log, f"exit code {rc}:\n{worker.tail()}"
    committed = asyncio.run(committed_offsets(s))
    out = asyncio.run(read_topics(s, [s.topic_predictions], lambda o: False, 3))
    assert out[s.topic_predictions] == []  # the broker took none
    # No prediction reached the topic, so no offset may have been committed past any event.
    assert all(c in (None, 0) for c in committed.values()), committed

    asyncio.run(_set_topic_config(s, s.topic_predictions, {"max.message.bytes": str(1024 * 1024)}))
    worker.start()
    counts = account(s, read_all(s, len(evs)))
    worker.stop()
    print("\nDELIVERY", json.dumps({"scenario": "refused produce, then restart", **counts,
                                    "crash_s": round(crashed_s, 1), "committed_before_restart": committed}))
    assert counts["lost"] == 0 and counts["valid"] == len(evs), counts
    assert counts["dup_unmarked"] == 0 and counts["activity_exact"], counts


def test_exactly_once_survives_kill_9_without_repeated_outcomes(app_settings, tmp_path, service_process):
    s = app_settings.model_copy(update={"window_events": 1000, "activity_window_s": WINDOW_S,
                                        "processing_guarantee": "exactly_once"})
    kafka_admin.ensure_topics(s)
    evs = _valid_events(4000, 200, seed=5)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    done: list[int] = []
    producer = threading.Thread(target=lambda: done.append(asyncio.run(produce(s, evs, rate=1500, progress=False))),
                                daemon=True)
    producer.start()

    def some_committed(out):
        return len(out[s.topic_predictions]) >= 1200

    asyncio.run(read_topics(s, [s.topic_predictions], some_committed, 120, "read_committed"))
    worker.stop(signal.SIGKILL)
    t_kill = time.monotonic()
    worker.start()
    restarted_s = time.monotonic() - t_kill
    producer.join(120)
    assert done == [len(evs)]
    counts = account(s, read_all(s, len(evs), isolation="read_committed"))
    raw = account(s, read_all(s, len(evs)))  # what a read_uncommitted reader sees: aborted records too
    worker.stop(signal.SIGKILL)  # Faust's transactional shutdown can hang (docs/reliability.md)
    print("\nDELIVERY", json.dumps({"scenario": "exactly_once, kill -9 + restart", **counts,
                                    "restart_s": round(restarted_s, 1),
                                    "read_uncommitted_extra_predictions": raw["predictions"] - counts["predictions"]}))
    assert counts["lost"] == 0 and counts["valid"] == len(evs), counts
    # What the transactions deliver here: no outcome twice, no unmarked repeat. Not yet: a handful of
    # predictions re-published marked ``duplicate`` and activity counts off by one for those users
    # (6 of 4,000 in the run of docs/reliability.md): the state of a few events reaches a committed
    # transaction before their offsets do. Reported, not asserted (issue 14 note).
    assert counts["dup_unmarked"] == 0 and counts["outcome_dups"] == 0, counts
    assert counts["dup_marked"] <= len(evs) // 100, counts
