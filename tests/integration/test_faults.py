"""Fault injection against the real broker: every scenario counts events in, predictions out, DLQ
records, outcomes, lost and duplicated inputs by source (partition, offset) (tests/integration/accounting.py)
and prints one ``FAULTS {...}`` line (benchmarks/RESULTS.md, docs/reliability.md).

* ``kill -9`` of a worker mid-stream, then a restart: nothing lost, the inference process gone within
  2 s of its worker, consuming again within 15 s;
* the RocksDB folder deleted before a restart: state rebuilt from the changelogs, predictions after
  recovery identical to a run without the wipe;
* the broker stopped for 30 s mid-stream (a private broker): the worker rides through, nothing lost;
* three workers, one joining late and one killed mid-stream: every event processed, state intact;
* a truncated / corrupt checkpoint announced on ``model-updates`` mid-stream: the previous version
  keeps serving every event and the rejection is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import orjson
import pytest

from stream_app import kafka_admin
from stream_app.replay import produce, synthetic
from tests.integration.accounting import (account, child_pids, first_published_after, metric, pid_gone_within,
                                          read_outputs, read_topics, report, wait_for_metric)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

#: What the issue asks of a restarted worker: consuming again within this many seconds.
REJOIN_S = 15.0


# --- helpers -------------------------------------------------------------------------------------------
def _replay(settings, events, rate=None) -> int:
    return asyncio.run(produce(settings, events, rate=rate, progress=False))


def _in_background(settings, events, rate) -> tuple[threading.Thread, list]:
    sent: list = []

    def run():
        try:
            sent.append(_replay(settings, events, rate))
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            sent.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, sent


def _wait_outputs(settings, at_least: int, timeout: float = 120.0) -> int:
    """Until ``at_least`` predictions + DLQ records exist; returns how many."""
    s = settings
    n = [0]

    def enough(out):
        n[0] = len(out[s.topic_predictions]) + len(out[s.topic_dlq])
        return n[0] >= at_least

    asyncio.run(read_topics(s, [s.topic_predictions, s.topic_dlq], enough, timeout))
    assert n[0] >= at_least, f"only {n[0]} outputs after {timeout} s"
    return n[0]


def _wait_metric(worker, name: str, at_least: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = metric(worker.metrics(), name)
            if value >= at_least:
                return value
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{name} < {at_least} after {timeout} s:\n{worker.tail()}"
        time.sleep(0.2)


def _events(n: int, users: int, seed: int, bad: float = 0.02) -> list[dict]:
    return list(synthetic(n, users, seed=seed, bad_fraction=bad))


def _exact(acc, what: str) -> None:
    """What at-least-once promises after a crash: no first copy lost (a prediction marked duplicate
    whose first copy never reached its topic) and unbroken histories (the tables learn of an event
    only once its outputs are safe: stream_app/pipeline.py). Repeated outputs are allowed and
    counted: every output names its event (partition, offset) and the trainer learns each outcome
    once. Activity counts are reported (``activity_mismatches``): they are stored in the same
    ``histories`` record as the window (docs/reliability.md)."""
    problems = {k: v for k, v in acc.summary().items() if k in ("first_copy_lost", "history_breaks") and v}
    assert not problems, f"{what}: {problems}"


@pytest.fixture
def fault_settings(app_settings):
    s = app_settings.model_copy(update={"window_events": 1000, "window_ttl_s": 10 * 365 * 86400, "device": "cpu",
                                        "serve_threads": 1})
    kafka_admin.ensure_topics(s)
    return s


# --- kill -9 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("membership", ["static", "dynamic"])
def test_kill9_mid_stream_then_restart(fault_settings, make_checkpoint, tmp_path, service_process, membership):
    """``kill -9`` of a worker serving the Transformer in its inference process, at a high input rate;
    the worker is restarted at once (same data dir)."""
    s = fault_settings.model_copy(update={"checkpoint": make_checkpoint(0, items=30)})
    if membership == "static":
        s = s.model_copy(update={"group_instance_id": f"{s.app_id}-w0"})
    n = 3000
    evs = _events(n, 300, seed=21)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    t0 = time.monotonic()
    producer, sent = _in_background(s, evs, rate=2000)
    try:
        at_kill = _wait_outputs(s, n // 3)
        (child,) = child_pids(worker.log_path)
        worker.stop(signal.SIGKILL)  # the worker only: its inference process must notice by itself
        child_gone_s = pid_gone_within(child, 5.0)
        restart_wall = time.time()
        worker.start()
        ready_s = time.time() - restart_wall
        producer.join(120)
        assert sent == [n]
        out = read_outputs(s, n)
        acc = account(out, s.activity_window_s)
        rejoin_s = first_published_after(out, restart_wall)
        report(f"kill9_restart_{membership}", acc, outputs_at_kill=at_kill, child_gone_s=child_gone_s,
               restart_ready_s=round(ready_s, 2), consuming_again_s=rejoin_s,
               total_s=round(time.monotonic() - t0, 1))
        assert at_kill < n, "the stream was over before the kill"
        assert acc.lost == 0, acc.lost_keys[:20]
        assert child_gone_s is not None and child_gone_s <= 2.0, f"inference process {child} outlived its worker"
        assert rejoin_s is not None and rejoin_s <= REJOIN_S, f"consuming again after {rejoin_s} s"
        assert acc.dlq_repeats == 0 or acc.dlq > 0
        _exact(acc, "kill -9")
    finally:
        worker.stop()


# --- RocksDB wiped -------------------------------------------------------------------------------------------
def test_rocksdb_wiped_before_restart_is_rebuilt_from_the_changelog(fault_settings, make_checkpoint, tmp_path,
                                                                   service_process, unique_id):
    """Two apps fed the same events, each stopped half-way and restarted; one has its RocksDB folder
    deleted in between. After recovery both must publish the same predictions."""
    ck = make_checkpoint(0, items=30)
    base = fault_settings.model_copy(update={"checkpoint": ck})
    ref = base.model_copy(update={k: f"{getattr(base, k)}-ref" for k in
                                  ("app_id", "topic_events", "topic_dlq", "topic_predictions", "topic_outcomes")}
                          | {"data_dir": tmp_path / "data-ref", "web_port": _free_port()})
    kafka_admin.ensure_topics(ref)
    n = 2000
    evs = _events(n, 200, seed=31)
    runs = {"wiped": base, "reference": ref}
    workers = {k: service_process("worker", st, tmp_path / f"worker-{k}.log") for k, st in runs.items()}
    try:
        for w in workers.values():
            w.start()
        for st in runs.values():
            assert _replay(st, evs[: n // 2]) == n // 2
        for st in runs.values():
            read_outputs(st, n // 2, settle_s=0)
        for w in workers.values():
            assert w.stop() == 0, w.tail()
        tables = base.data_dir / base.app_id
        assert any(tables.rglob("*.sst")) or any(tables.rglob("CURRENT")), list(tables.rglob("*"))[:20]
        shutil.rmtree(tables)
        for w in workers.values():
            w.start()
        for st in runs.values():
            assert _replay(st, evs[n // 2:]) == n - n // 2
        outs = {k: read_outputs(st, n) for k, st in runs.items()}
        accs = {k: account(o, runs[k].activity_window_s) for k, o in outs.items()}
        wiped, reference = accs["wiped"], accs["reference"]
        later = {(e["user_id"], e["ts"]) for e in evs[n // 2:] if isinstance(e.get("user_id"), str)}
        second_half = {po for po, p in reference.fresh.items() if (p["user_id"], p["event_ts"]) in later}
        differ = 0
        for po in second_half:
            a, b = wiped.fresh.get(po), reference.fresh[po]
            if a is None or ([i for i, _ in a["top_items"]] != [i for i, _ in b["top_items"]]
                             or any(abs(a["action_probs"][x] - b["action_probs"][x]) > 1e-4 for x in b["action_probs"])
                             or (a["history_len"], a["activity"]) != (b["history_len"], b["activity"])):
                differ += 1
        rec = {k: _recovery_seconds(w.log_path) for k, w in workers.items()}
        report("rocksdb_wiped", wiped, reference_lost=reference.lost, compared=len(second_half),
               predictions_differing=differ, events_before_wipe=n // 2,
               recovery_wiped_s=rec["wiped"]["recovery_s"], restore_wiped_s=rec["wiped"]["restore_s"],
               recovery_reference_s=rec["reference"]["recovery_s"])
        assert wiped.lost == 0 and reference.lost == 0
        assert wiped.history_breaks == 0 and wiped.activity_mismatches == 0 and wiped.duplicates_unmarked == 0
        assert wiped.first_copy_lost == 0 and wiped.duplicates_marked == 0
        assert len(second_half) > 0 and differ == 0
    finally:
        for w in workers.values():
            w.stop()


def _recovery_seconds(log_path: Path) -> dict:
    """From the worker log's last start: Faust's recovery (``Recovery: Starting`` to ``Recovery
    complete``) and the changelog read inside it (``Restoring state`` to ``Done reading``), seconds."""
    from datetime import datetime

    stamps: dict[str, datetime] = {}
    marks = {"recovery_start": "[^---Recovery]: Starting", "recovery_done": "Recovery complete",
             "restore_start": "Restoring state from changelog", "restore_done": "Done reading from changelog"}
    for line in log_path.read_text(errors="replace").splitlines():
        if "[^---Recovery]: Starting" in line:
            stamps.clear()
        for name, text in marks.items():
            if text in line and line.startswith("[20"):
                stamps[name] = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")

    def span(a: str, b: str) -> float | None:
        return round((stamps[b] - stamps[a]).total_seconds(), 3) if a in stamps and b in stamps else None

    return {"recovery_s": span("recovery_start", "recovery_done"), "restore_s": span("restore_start", "restore_done")}


def _free_port() -> int:
    from stream_app.ports import free_port

    return free_port()


def _group(service_process, base, tmp_path: Path, n: int, **kw) -> list:
    """``n`` workers of one app (one consumer group), each with its own web port and data dir (not
    started); ``kw`` goes to each ServiceProcess (``pythonpath``, ``env``)."""
    return [service_process("worker", base.model_copy(update={"web_port": _free_port(), "data_dir": tmp_path / f"d{i}"}),
                            tmp_path / f"worker-{i}.log", **kw) for i in range(n)]


# --- broker outage --------------------------------------------------------------------------------------------
@pytest.fixture
def private_broker(tmp_path_factory):
    """A broker of this test's own (the session broker is shared by other tests): settings, stop, start."""
    from stream_app import broker
    from stream_app.settings import Settings

    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port, cport = a.getsockname()[1], b.getsockname()[1]
    settings = Settings(broker_url=f"kafka://127.0.0.1:{port}", kafka_port=port, kafka_controller_port=cport,
                        data_dir=tmp_path_factory.mktemp("kafka-outage"))
    broker.start(settings, timeout=120)
    try:
        yield settings
    finally:
        broker.stop(settings)


def test_broker_down_30_s_mid_stream(private_broker, fault_settings, tmp_path, service_process):
    from stream_app import broker

    s = fault_settings.model_copy(update={k: getattr(private_broker, k) for k in
                                          ("broker_url", "kafka_port", "kafka_controller_port")})
    kafka_admin.ensure_topics(s)
    n1, n2 = 3000, 500
    evs = _events(n1 + n2, 300, seed=41)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    pid = worker.proc.pid
    try:
        assert _replay(s, evs[:n1]) == n1
        at_stop = _wait_outputs(s, n1 // 4)
        t_down = time.monotonic()
        broker.stop(private_broker)
        while time.monotonic() - t_down < 30:
            assert worker.proc.poll() is None, f"the worker exited during the outage:\n{worker.tail()}"
            time.sleep(0.5)
        broker.start(private_broker, timeout=120)
        up_wall = time.time()
        assert _replay(s, evs[n1:]) == n2
        out = read_outputs(s, n1 + n2, timeout=240)
        acc = account(out, s.activity_window_s)
        log_text = worker.log_path.read_text(errors="replace")
        report("broker_down_30s", acc, outputs_at_stop=at_stop, outage_s=30,
               first_prediction_after_up_s=first_published_after(out, up_wall),
               metadata_retries=metric(worker.metrics(), "nextaction_metadata_retries_total"),
               worker_restarts=0 if worker.proc.pid == pid else 1)
        assert worker.proc.poll() is None and worker.proc.pid == pid, "the worker did not ride through"
        assert "crashing the worker" not in log_text
        assert at_stop < n1, "the stream was over before the outage"
        assert acc.lost == 0, acc.lost_keys[:20]
        # Outputs may repeat (the producer retries batches whose acknowledgement the outage swallowed;
        # Faust's at-least-once producer is not idempotent): counted, never lost, never mis-marked.
        _exact(acc, "broker outage")
    finally:
        rc = worker.stop()
    assert rc == 0, worker.tail()


# --- three workers -------------------------------------------------------------------------------------------
def test_three_workers_one_late_one_killed(fault_settings, tmp_path, service_process):
    """Three workers of one app (baseline predictor, in-process): w2 joins mid-stream, w1 is ``kill -9``\\ ed
    later; its partitions move to the others after the session timeout. Every event processed, tables
    consistent (histories count every event once, activity counts exact)."""
    base = fault_settings
    n = 6000
    evs = _events(n, 400, seed=51)
    ws = _group(service_process, base, tmp_path, 3)
    try:
        ws[0].start()
        ws[1].start()
        producer, sent = _in_background(base, evs, rate=400)  # 15 s of stream
        _wait_outputs(base, n // 5)
        ws[2].start()  # joins late: a rebalance mid-stream
        # it serves before w1 dies (its join took 9 s on a busy box once, when a shorter stream had ended by then)
        wait_for_metric(ws[2], "nextaction_predictions_out_total", 1, timeout=60)
        _wait_outputs(base, n // 2)
        kill_wall = time.time()
        ws[1].stop(signal.SIGKILL)
        producer.join(120)
        assert sent == [n]
        out = read_outputs(base, n, timeout=240)
        acc = account(out, base.activity_window_s)
        served = [metric(ws[i].metrics(), "nextaction_predictions_out_total") for i in (0, 2)]
        report("three_workers", acc, served_by_survivors=served,
               first_prediction_after_kill_s=first_published_after(out, kill_wall))
        assert acc.lost == 0, acc.lost_keys[:20]
        assert all(x > 0 for x in served), served
        _exact(acc, "three workers, one killed")
    finally:
        for w in ws:
            w.stop()


SLOW_SEEK = Path(__file__).parent / "slow_seek"  # sitecustomize.py: Faust's post-rebalance seek made slow


def test_rebalances_with_a_slow_seek_skip_nothing(fault_settings, tmp_path, service_process):
    """Workers join and one leaves gracefully mid-stream while Faust's seek after each rebalance takes
    1 s longer (tests/integration/slow_seek). Without stream_app/faust_fixes.py the stream partitions
    were resumed before that seek: Faust recorded skipped offsets as gaps, and records were processed
    twice unmarked (138-251 per run) or, when dropped on the way to the agent, lost (CI); and the
    events acked since the last periodic commit were processed again by the next owner (1,794-2,922
    marked repeats). With the fixes: no gap on any worker, nothing lost, nothing repeated unmarked."""
    base = fault_settings
    n = 4000
    evs = _events(n, 400, seed=53)
    ws = _group(service_process, base, tmp_path, 3, pythonpath=SLOW_SEEK, env={"NX_TEST_SEEK_DELAY_S": "1.0"})
    try:
        ws[0].start()
        producer, sent = _in_background(base, evs, rate=800)
        _wait_outputs(base, n // 5)
        ws[1].start()  # a rebalance: w0 keeps some partitions (resumed after a slow seek), w1 gets the rest
        _wait_outputs(base, 2 * n // 5)
        ws[2].start()
        _wait_outputs(base, 3 * n // 5)
        gaps_w2 = metric(ws[2].metrics(), "nextaction_offset_gap_offsets_total")
        assert ws[2].stop() == 0, ws[2].tail()  # leaves gracefully: one more rebalance
        producer.join(120)
        assert sent == [n]
        out = read_outputs(base, n, timeout=240)
        acc = account(out, base.activity_window_s)
        gaps = [metric(ws[i].metrics(), "nextaction_offset_gap_offsets_total") for i in (0, 1)] + [gaps_w2]
        held = [metric(ws[i].metrics(), f'nextaction_assigned_partitions{{topic="{base.topic_events}"}}')
                for i in (0, 1)]
        report("slow_seek_rebalances", acc, gap_offsets=gaps, events_partitions_held=held)
        assert acc.lost == 0, acc.lost_keys[:20]
        assert gaps == [0, 0, 0], gaps
        assert sorted(held) == [base.partitions // 2] * 2, held  # the survivors share the partitions evenly
        # Nothing repeated unmarked and no second outcome. Marked repeats are reported, not asserted: 0 in
        # most runs with stream_app/faust_fixes.py (the acks are kept until the revoke is committed), but
        # one clean-clone CI run had 804 (docs/reliability.md).
        assert acc.duplicates_unmarked == 0 and acc.outcome_repeats == 0, acc.summary()
        assert acc.first_copy_lost == 0 and acc.history_breaks == 0, acc.summary()
    finally:
        for w in ws:
            w.stop()


# --- corrupt checkpoint ---------------------------------------------------------------------------------------
def _broken_copies(ck: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    """(path, announced sha256): a truncated copy announced with the real hash (the hash check rejects
    it), and a truncated copy whose manifest was rewritten to match (the safetensors load rejects it)."""
    from models.checkpoint import FILES, MANIFEST, content_hash, read_manifest

    real = read_manifest(ck)["content_hash"]
    out = []
    for name, rehash in (("truncated", False), ("truncated-rehashed", True)):
        p = tmp_path / name
        shutil.copytree(ck, p)
        st = p / "model.safetensors"
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 3])
        announced = real
        if rehash:
            manifest = orjson.loads((p / MANIFEST).read_bytes())
            manifest["files"]["model.safetensors"] = hashlib.sha256(st.read_bytes()).hexdigest()
            manifest["content_hash"] = announced = content_hash({f: manifest["files"][f] for f in FILES})
            (p / MANIFEST).write_bytes(orjson.dumps(manifest))
        out.append((p, announced))
    return out


def test_corrupt_checkpoint_announced_mid_stream_is_rejected(fault_settings, make_checkpoint, tmp_path,
                                                             service_process):
    from models.checkpoint import read_manifest
    from stream_app.cli.stream import send_one

    v1, v2 = make_checkpoint(0, items=30), make_checkpoint(1, items=30)
    ver1 = read_manifest(v1)["content_hash"][:12]
    s = fault_settings.model_copy(update={"checkpoint": v1})
    n = 2500
    evs = _events(n, 250, seed=61)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    try:
        producer, sent = _in_background(s, evs, rate=1000)
        _wait_outputs(s, n // 5)
        for path, sha in _broken_copies(v2, tmp_path):
            asyncio.run(send_one(s, s.topic_model_updates, None,
                                 orjson.dumps({"version": "v2", "path": str(path), "sha256": sha})))
        rejected = _wait_metric(worker, 'nextaction_model_updates_total{result="rejected"}', 2, timeout=90)
        producer.join(120)
        assert sent == [n]
        out = read_outputs(s, n)
        acc = account(out, s.activity_window_s)
        versions = sorted({p["model_version"] for p in out["predictions"]})
        text = worker.metrics()
        report("corrupt_checkpoint", acc, rejected=rejected, versions=versions,
               applied=metric(text, 'nextaction_model_updates_total{result="applied"}'))
        assert acc.lost == 0 and acc.duplicates_marked == 0 and acc.duplicates_unmarked == 0
        assert acc.first_copy_lost == 0 and acc.activity_mismatches == 0 and acc.history_breaks == 0
        assert versions == [ver1]
        assert metric(text, 'nextaction_model_updates_total{result="applied"}') == 0
        assert rejected == 2
    finally:
        rc = worker.stop()
    assert rc == 0, worker.tail()
