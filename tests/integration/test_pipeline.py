"""The whole pipeline through a real broker: a Faust worker subprocess, synthetic replays, exact accounting.

Every input message (identified by its ``events`` partition and offset) must come out as exactly
one prediction (valid events) or one dead-letter record (invalid ones), matched also by user id
and event time; predictions must be well formed. The restart test SIGTERMs the worker mid-stream,
starts it again and checks that nothing is unaccounted, that duplicates are exactly the ones
at-least-once allows, and that user histories survived (``history_len`` keeps counting).
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest

from models.schema import ACTIONS
from stream_app import kafka_admin
from stream_app.errors import EventRejected
from stream_app.events import parse_event
from stream_app.replay import encode, produce, synthetic
from tests.conftest import settings_env
from tests.integration.accounting import metric, read_topics, wait_for_metric

# slow: every test runs Faust worker processes
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
N_EVENTS = 10_000
N_USERS = 400
BAD_FRACTION = 0.02


# --- helpers -------------------------------------------------------------------------------------------
def read_outputs(settings, n_inputs: int, timeout: float = 240.0, n_outcomes: int = 0) -> dict[str, list]:
    """Inputs, predictions, DLQ records and outcomes, once every input has an output (and, with
    ``n_outcomes``, that many outcomes are in: the read may otherwise stop part-way through them)."""
    s = settings

    def done(out):
        if len(out[s.topic_events]) < n_inputs or len(out[s.topic_outcomes]) < n_outcomes:
            return False
        covered = {(m["partition"], m["offset"]) for m in map(_json, out[s.topic_predictions])}
        covered |= {(d["source"]["partition"], d["source"]["offset"]) for d in map(_json, out[s.topic_dlq])}
        return len(covered) >= n_inputs

    return asyncio.run(read_topics(s, [s.topic_events, s.topic_predictions, s.topic_dlq, s.topic_outcomes],
                                    done, timeout))


def _json(msg):
    return orjson.loads(msg.value)


def replay(settings, events, rate=None) -> int:
    return asyncio.run(produce(settings, events, rate=rate, progress=False))


def account(settings, out) -> dict:
    """The exact account; returns counts. Asserts everything the pipeline promises."""
    s = settings
    inputs = {(m.partition, m.offset): m for m in out[s.topic_events]}
    preds = defaultdict(list)
    for m in out[s.topic_predictions]:
        p = _json(m)
        preds[(p["partition"], p["offset"])].append((m, p))
    dlq = defaultdict(list)
    for m in out[s.topic_dlq]:
        d = _json(m)
        dlq[(d["source"]["partition"], d["source"]["offset"])].append(d)
    assert set(preds) | set(dlq) == set(inputs), "outputs for unknown inputs, or inputs without output"
    now_ms = int(time.time() * 1000)
    n_valid = n_invalid = duplicates = 0
    by_user = defaultdict(dict)
    for po, m in inputs.items():
        try:
            ev = parse_event(m.value, now_ms=now_ms, key=m.key if m.key is not None else b"")
        except EventRejected as exc:
            n_invalid += 1
            assert po not in preds, f"invalid input {po} got a prediction"
            (d,) = dlq[po]  # exactly one DLQ record
            assert d["reason"] == exc.reason and d["original"].encode() == m.value
            assert d["source"]["topic"] == s.topic_events
            continue
        n_valid += 1
        assert po not in dlq, f"valid input {po} was dead-lettered: {dlq[po]}"
        records = preds[po]
        assert records, f"valid input {po} has no prediction"
        fresh = [p for _, p in records if not p["duplicate"]]
        assert len(fresh) == 1, f"input {po}: {len(fresh)} first-time predictions"
        duplicates += len(records) - 1
        for km, p in records:  # matched by user and event time too, keyed by user
            assert (p["user_id"], p["event_ts"]) == (ev.user_id, ev.ts) and km.key == ev.user_id.encode()
            check_prediction_record(p, s.top_k)
        by_user[ev.user_id][ev.ts] = fresh[0]
    for user, events in by_user.items():  # history_len counts the user's events: state is intact
        lens = [events[ts]["history_len"] for ts in sorted(events)]
        assert lens == list(range(1, len(lens) + 1)), f"user {user}: history lengths {lens}"
    return {"inputs": len(inputs), "valid": n_valid, "invalid": n_invalid, "duplicates": duplicates,
            "users": len(by_user)}


def check_prediction_record(p: dict, k: int) -> None:
    assert p["schema_version"] == 1  # the contract (docs/contract.md; validated in full by test_contract.py)
    assert isinstance(p["model_version"], str) and p["model_version"]
    assert list(p["action_probs"]) == list(ACTIONS)
    assert all(0 <= x <= 1 for x in p["action_probs"].values())
    assert math.isclose(sum(p["action_probs"].values()), 1.0, abs_tol=1e-9)
    assert isinstance(p["top_items"], list) and len(p["top_items"]) <= k
    assert all(isinstance(i, str) and isinstance(sc, float) and math.isfinite(sc) for i, sc in p["top_items"])
    scores = [sc for _, sc in p["top_items"]]  # probabilities of the next item, best first
    assert all(0 < sc <= 1 for sc in scores) and scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
    assert math.isfinite(p["next_gap_s"]) and p["next_gap_s"] >= 0
    assert p["latency_ms"] >= 0 and p["history_len"] >= 1 and p["activity"] >= 1


@pytest.fixture
def pipeline_settings(app_settings):
    s = app_settings.model_copy(update={"window_events": 1000, "window_ttl_s": 10 * 365 * 86400})
    kafka_admin.ensure_topics(s)
    return s


def _events():
    evs = list(synthetic(N_EVENTS, N_USERS, seed=11, bad_fraction=BAD_FRACTION))
    n_bad = 0
    for e in evs:
        key, value = encode(e)
        try:
            parse_event(value, now_ms=int(time.time() * 1000), key=key)
        except EventRejected:
            n_bad += 1
    assert 100 < n_bad < 400
    return evs


# --- tests -----------------------------------------------------------------------------------------------
def test_every_event_yields_one_prediction_or_one_dlq_record(pipeline_settings, tmp_path, service_process):
    s = pipeline_settings
    evs = _events()
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    try:
        t0, t0_wall = time.monotonic(), time.time()
        assert replay(s, evs) == N_EVENTS
        t_produced = time.monotonic() - t0
        out = read_outputs(s, N_EVENTS)
        t_all = time.monotonic() - t0
        counts = account(s, out)
        assert counts["inputs"] == N_EVENTS and counts["duplicates"] == 0
        # outcomes: one per valid event of a user that already had a prediction
        n_outcomes = counts["valid"] - counts["users"]
        if len(out[s.topic_outcomes]) < n_outcomes:  # that read stopped part-way through `outcomes`
            out = read_outputs(s, N_EVENTS, timeout=60, n_outcomes=n_outcomes)
        outcomes = [_json(m) for m in out[s.topic_outcomes]]
        assert len(outcomes) == n_outcomes
        o = outcomes[-1]
        assert set(o) >= {"user_id", "context", "happened"} and o["context"]["window"]["i"]
        assert o["happened"]["gap_s"] >= 0 and o["context"]["model_version"]
        text = worker.metrics()
        assert metric(text, "nextaction_events_in_total") == N_EVENTS
        assert metric(text, "nextaction_events_rejected_total") == counts["invalid"]
        assert metric(text, "nextaction_predictions_out_total") == counts["valid"]
        latencies = sorted(_json(m)["latency_ms"] for m in out[s.topic_predictions])
        hit = sum(_json(m)["happened"]["item_rank"] is not None for m in out[s.topic_outcomes])
        last_publish = max(_json(m)["published_ms"] for m in out[s.topic_predictions]) / 1000.0
        worker_s = last_publish - t0_wall  # first event produced -> last prediction published
        report = {**counts, "produce_s": round(t_produced, 2), "all_outputs_s": round(t_all, 2),
                  "worker_s": round(worker_s, 2), "events_per_s": round(N_EVENTS / worker_s), "latency_ms_p50": latencies[len(latencies) // 2],
                  "latency_ms_p99": latencies[int(len(latencies) * 0.99)],
                  "outcome_hit_rate_at_k": round(hit / max(1, len(outcomes)), 3)}
        print("\nPIPELINE", json.dumps(report))
    finally:
        rc = worker.stop()
    assert rc == 0, worker.tail()


def test_sigterm_restart_resumes_from_committed_offsets_with_state(pipeline_settings, tmp_path, service_process):
    s = pipeline_settings
    evs = _events()
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    produced: list[int] = []
    # produce at a steady rate in the background, so the worker is stopped mid-stream
    producer = threading.Thread(target=lambda: produced.append(replay(s, evs, rate=2500)), daemon=True)
    producer.start()
    try:
        def outputs_seen(out):
            return len(out[s.topic_predictions]) + len(out[s.topic_dlq]) >= N_EVENTS // 3

        asyncio.run(read_topics(s, [s.topic_predictions, s.topic_dlq], outputs_seen, 120))
        rc = worker.stop(signal.SIGTERM)
        assert rc == 0, f"SIGTERM exit code {rc}:\n{worker.tail()}"
        stopped_log = worker.log_path.read_text(errors="replace")
        worker.start()  # same data dir: RocksDB + changelog offsets; resumes from committed offsets
        producer.join(120)
        assert produced == [N_EVENTS]
        out = read_outputs(s, N_EVENTS)
        counts = account(s, out)
        print("\nRESTART", json.dumps(counts))
        # a graceful stop drains in-flight events and commits, so a restart re-delivers nothing
        assert counts["duplicates"] == 0, counts
        assert "Wait for streams" in stopped_log
    finally:
        worker.stop()


def _produce_one(settings, topic: str, value: bytes) -> None:
    from stream_app.cli.stream import send_one

    asyncio.run(send_one(settings, topic, None, value))


def test_model_update_through_the_topic_hot_swaps(pipeline_settings, make_checkpoint, tmp_path, service_process):
    """A ``model-updates`` record between two halves of a stream: the worker swaps models between
    batches, nothing is lost, every prediction names exactly one of the two versions, the first half
    is served by v1 and the second by v2, and per partition the version switches once. (The swap
    under concurrent load, at a batch boundary, is tested in tests/unit/stream_app/test_batcher.py.)"""
    from models.checkpoint import read_manifest

    v1, v2 = make_checkpoint(0, items=30), make_checkpoint(1, items=30)
    ver1, sha2 = read_manifest(v1)["content_hash"][:12], read_manifest(v2)["content_hash"]
    ver2 = sha2[:12]
    s = pipeline_settings.model_copy(update={"checkpoint": v1, "device": "cpu", "serve_threads": 1})
    n = 2000
    evs = list(synthetic(n, 200, seed=5))
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    try:
        assert replay(s, evs[: n // 2]) == n // 2
        read_outputs(s, n // 2)
        t0 = time.monotonic()
        _produce_one(s, s.topic_model_updates, orjson.dumps({"version": "v2", "path": str(v2), "sha256": sha2}))
        deadline = time.monotonic() + 120
        while metric(worker.metrics(), 'nextaction_model_updates_total{result="applied"}') < 1:
            assert time.monotonic() < deadline, "model update not applied within 120 s"
            time.sleep(0.2)
        swap_s = time.monotonic() - t0
        assert replay(s, evs[n // 2:]) == n - n // 2
        out = read_outputs(s, n)
        counts = account(s, out)
        assert counts["duplicates"] == 0 and counts["inputs"] == n
        first_half = {(e["user_id"], e["ts"]) for e in evs[: n // 2]}  # (user, event time) of the first replay
        assert first_half.isdisjoint((e["user_id"], e["ts"]) for e in evs[n // 2:])
        by_partition = defaultdict(list)
        versions = Counter()
        for m in out[s.topic_predictions]:
            p = _json(m)
            key = (p["user_id"], p["event_ts"])
            assert p["model_version"] == (ver1 if key in first_half else ver2), (key, p["model_version"])
            by_partition[p["partition"]].append((p["offset"], p["model_version"]))
            versions[p["model_version"]] += 1
        for seq in by_partition.values():  # in event order per partition: v1 ... v1 v2 ... v2
            vs = [v for _, v in sorted(seq)]
            switch = vs.index(ver2)
            assert set(vs[:switch]) <= {ver1} and set(vs[switch:]) == {ver2}
        print("\nHOTSWAP", json.dumps({**counts, "versions": dict(versions), "swap_s": round(swap_s, 2)}))
    finally:
        rc = worker.stop()
    assert rc == 0, worker.tail()


def test_model_update_reaches_every_worker_and_a_restarted_one_catches_up(pipeline_settings, make_checkpoint,
                                                                        service_process,
                                                                          tmp_path):
    """Two workers of one app share the ``events`` partitions; one ``nextaction deploy`` record
    makes **both** swap (each follows ``model-updates`` without a consumer group), and a worker
    restarted afterwards serves the new version at once (it applies the topic's newest record)."""
    from models.checkpoint import read_manifest
    from stream_app.ports import free_port

    v1, v2 = make_checkpoint(0, items=30), make_checkpoint(1, items=30)
    ver2 = read_manifest(v2)["content_hash"][:12]
    base = pipeline_settings.model_copy(update={"checkpoint": v1, "device": "cpu", "serve_threads": 1})

    workers = [service_process("worker", base.model_copy(update={"web_port": free_port(), "data_dir": tmp_path / f"data-{i}"}),
                      tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        for w in workers:
            w.start()
        deploy = subprocess.run([str(Path(sys.executable).parent / "nextaction"), "deploy", str(v2)], cwd=REPO,
                                env=settings_env(base), capture_output=True, text=True, timeout=60)
        assert deploy.returncode == 0, deploy.stderr
        for w in workers:
            wait_for_metric(w, 'nextaction_model_updates_total{result="applied"}', 1, timeout=120)
        evs = list(synthetic(400, 100, seed=9))
        assert replay(base, evs) == 400
        out = read_outputs(base, 400)
        assert account(base, out)["inputs"] == 400
        assert {_json(m)["model_version"] for m in out[base.topic_predictions]} == {ver2}
        served = [metric(w.metrics(), "nextaction_predictions_out_total") for w in workers]
        assert all(n > 0 for n in served), served  # both workers owned partitions and served v2

        assert workers[1].stop() == 0
        workers[1].start()  # no new record: the catch-up applies the newest one
        wait_for_metric(workers[1], 'nextaction_model_updates_total{result="applied"}', 1, timeout=60)
        shift = max(e["ts"] for e in evs) + 1000 - min(e["ts"] for e in synthetic(200, 50, seed=10))
        more = [{**e, "ts": e["ts"] + shift} for e in synthetic(200, 50, seed=10)]
        assert replay(base, more) == 200
        out = read_outputs(base, 600)
        assert account(base, out)["inputs"] == 600
        assert {_json(m)["model_version"] for m in out[base.topic_predictions]} == {ver2}
    finally:
        rcs = [w.stop() for w in workers]
    assert rcs == [0, 0], [w.tail() for w in workers]
