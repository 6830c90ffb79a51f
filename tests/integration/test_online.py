"""The online loop through a real broker: ``nextaction trainer`` processes (lease, resume, deltas, full
versions) and, end to end with a ``faust worker``, the shadow rollback after a harmful update.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from models.predictor import Prediction
from models.schema import EventSeq
from stream_app import kafka_admin
from stream_app.history import add_event
from stream_app.kafka_security import client_kwargs
from stream_app.ports import free_port
from stream_app.records import DELTA, ModelUpdate, StoredPrediction, outcome_record, update_kind
from tests.conftest import settings_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


# --- helpers -------------------------------------------------------------------------------------------
_SOURCE_OFFSETS = itertools.count()  # each outcome names a distinct event (the trainer dedupes on it)


def outcomes(n: int, items: list[str], seed: int, n_users: int = 40) -> list[tuple[bytes, bytes]]:
    """``n`` well-formed ``outcomes`` records (key, value) of ``n_users`` users browsing ``items``."""
    rng = random.Random(seed)
    windows: dict[str, EventSeq] = {}
    last: dict[str, StoredPrediction] = {}
    t = int(time.time() * 1000) - 3_600_000
    out = []
    while len(out) < n:
        u = f"u{rng.randrange(n_users)}"
        t += rng.randrange(200, 2000)
        item = rng.choice(items)
        before = windows.get(u, EventSeq.empty())
        if u in last:
            out.append((u.encode(), outcome_record(u, last[u], served=before, action="view", item_id=item,
                                                   category="", event_ts=t, partition=0,
                                                   offset=next(_SOURCE_OFFSETS))))
        windows[u] = add_event(before, item, "view", t, max_events=8, ttl_ms=86_400_000)
        top = [(i, 1.0 / (k + 1)) for k, i in enumerate(rng.sample(items, 10))]
        last[u] = StoredPrediction("v", t, 0, len(out), Prediction([0.6, 0.1, 0.1, 0.1, 0.1], top, 30.0))
    return out


async def produce(settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, v, key=k) for k, v in records])
    finally:
        await producer.stop()


async def read_all(settings, topic: str) -> list:
    """Every record of ``topic`` (all partitions), with headers, in (partition, offset) order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream_app.updates import read_range

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - a topic created by a subprocess
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        return [r for tp in tps for r in await read_range(consumer, tp, 0, ends[tp], timeout_s=30)]
    finally:
        await consumer.stop()


def updates(settings) -> list[dict]:
    """The ``model-updates`` records as dicts: kind, and the full record's fields or the delta's label/meta."""
    from models.delta import ModelDelta

    out = []
    for r in asyncio.run(read_all(settings, settings.topic_model_updates)):
        if update_kind(r.headers) == DELTA:
            d = ModelDelta.decode(r.value)
            out.append({"kind": "delta", "label": d.label, "base": d.base, "seq": d.seq, "prev": d.prev,
                        "meta": d.meta, "ts": r.timestamp})
        else:
            u = ModelUpdate.decode(r.value)
            out.append({"kind": "full", "version": u.version, "path": u.path, "n": u.n, "reason": u.reason,
                        "ts": r.timestamp})
    return out


def wait_until(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- tests ---------------------------------------------------------------------------------------------
def test_a_killed_trainer_is_replaced_and_its_lineage_learns_every_outcome_once(app_settings, make_checkpoint,
                                                                                  service_process, tmp_path):
    """Two trainers, one lease: the standby waits while the active one learns; the active one is
    SIGKILLed after a full version and deltas past it; the standby takes over, supersedes those deltas
    (``reset``), reads ``outcomes`` from the offsets saved with the full version, and its lineage ends
    having learned exactly as many examples as there are records, ending at the topic's end offsets."""
    ck = make_checkpoint(0, items=30)
    s = app_settings.model_copy(update={
        "checkpoint": str(ck), "models_dir": tmp_path / "models", "partitions": 2, "trainer_batch": 64,
        "trainer_max_wait_s": 0.2, "trainer_delta_interval_s": 0.5, "trainer_full_every_examples": 400,
        "trainer_full_every_s": 600.0, "trainer_lease_timeout_s": 6.0, "device": "cpu"})
    kafka_admin.ensure_topics(s, [s.topic_outcomes, s.topic_model_updates])
    items = [f"i{k}" for k in range(30)] + [f"new-{k}" for k in range(5)]
    first, second = outcomes(600, items, seed=1), outcomes(200, items, seed=2)
    asyncio.run(produce(s, s.topic_outcomes, first))
    a = service_process("trainer", s.model_copy(update={"trainer_port": free_port()}), tmp_path / "a.log")
    b = service_process("trainer", s.model_copy(update={"trainer_port": free_port()}), tmp_path / "b.log")
    a.start()
    a.wait_log("trainer holds the lease", 60)
    b.start()  # the standby
    b.wait_log("waiting for the lease", 60)

    def learned_all_of_first():
        ups = updates(s)
        return ups if any(u["kind"] == "delta" and u["meta"].get("examples") == len(first) for u in ups) else None

    before = wait_until("the active trainer's deltas covering the first 600 outcomes", learned_all_of_first, 120)
    fulls = [u for u in before if u["kind"] == "full"]
    assert [u["reason"] for u in fulls] == ["online", "online"]  # the start checkpoint, then one full version
    stale = [u for u in before if u["kind"] == "delta" and u["ts"] >= fulls[-1]["ts"]]
    assert stale, "deltas after the full version (what the killed trainer's successor must supersede)"
    assert "holds the lease" not in b.log_path.read_text()  # one active trainer at a time

    a.stop(signal.SIGKILL)
    asyncio.run(produce(s, s.topic_outcomes, second))
    b.wait_log("trainer holds the lease", 60)

    def learned_everything():
        ups = updates(s)
        last = [u for u in ups if u["kind"] == "delta"][-1]
        return ups if last["meta"].get("examples") == len(first) + len(second) else None

    after = wait_until("the standby's lineage to reach 800 examples", learned_everything, 120)
    new = after[len(before):]
    assert new[0]["kind"] == "full" and new[0]["reason"] == "reset" and new[0]["path"] == fulls[-1]["path"]
    assert [u["n"] for u in after if u["kind"] == "full"] == sorted({u["n"] for u in after if u["kind"] == "full"})
    seqs = [u["seq"] for u in after if u["kind"] == "delta"]
    assert min(u["seq"] for u in new if u["kind"] == "delta") > max(u["seq"] for u in stale)  # numbers only grow
    assert seqs == sorted(seqs)
    final = [u for u in new if u["kind"] == "delta"][-1]["meta"]
    ends = {r.partition: r.offset + 1 for r in asyncio.run(read_all(s, s.topic_outcomes))}
    assert {int(p): o for p, o in final["offsets"].items()} == ends  # everything read ...
    assert final["examples"] == len(first) + len(second)  # ... and learned once: none twice, none lost
    assert f"{len(stale)} deltas after it are superseded" in b.log_path.read_text()
    assert b.stop() == 0, b.tail()


@pytest.fixture(scope="module")
def good_and_harmful(tmp_path_factory):
    """(good, harmful) checkpoints: a small Transformer trained on synthetic shoppers, and the same model
    with every item's bias replaced by loud noise (it ranks items at random: a harmful update)."""
    import torch

    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.config import ModelConfig, TrainConfig
    from models.datasets import load
    from models.train import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rollback")
    ds = load("synthetic", n_users=300, n_items=60, min_len=8, max_len=30)
    good, _ = train(ds, ModelConfig(d_model=32, max_len=16), TrainConfig(epochs=6, batch_size=64, progress=False,
                                                                       warmup_steps=5), root / "good")
    ck = load_checkpoint(good)
    with torch.no_grad():
        ck.model.item_bias.copy_(torch.randn_like(ck.model.item_bias) * 50.0)
    harmful = save_checkpoint(root / "harmful", ck.model, ck.vocab, None, {"note": "deliberately harmful"})
    return good, harmful


def test_a_harmful_update_is_rolled_back_by_the_fleet(app_settings, good_and_harmful, service_process, tmp_path):
    """A worker and a trainer serve and learn a good model; a harmful version is deployed; the served
    predictions score worse than the trainer's frozen shadow by the margin, so the trainer publishes a
    ``rollback`` record with the last good weights and the worker serves them again."""
    from models.checkpoint import read_manifest
    from stream_app.replay import produce as produce_events
    from stream_app.replay import synthetic

    good, harmful = good_and_harmful
    s = app_settings.model_copy(update={
        "checkpoint": str(good), "models_dir": tmp_path / "models", "partitions": 1, "device": "cpu",
        "trainer_port": free_port(), "trainer_delta_interval_s": 1.0, "trainer_max_wait_s": 0.3,
        "trainer_rollback_window": 200, "trainer_rollback_min": 100, "trainer_rollback_margin": 0.02,
        "trainer_start": "earliest", "serve_threads": 1})
    kafka_admin.ensure_topics(s, [s.topic_events, s.topic_dlq, s.topic_predictions, s.topic_outcomes,
                                  s.topic_model_updates])
    worker = service_process("worker", s, tmp_path / "worker.log")
    trainer = service_process("trainer", s, tmp_path / "trainer.log")
    worker.start()
    trainer.start()
    trainer.wait_log("trainer reading", 60)
    events = list(synthetic(4000, 150, seed=5, n_items=60))

    asyncio.run(produce_events(s, events[:1200], rate=200, progress=False))
    time.sleep(3)
    assert "rolling the fleet back" not in trainer.log_path.read_text()  # the good model is not rolled back
    deploy = subprocess.run([str(Path(sys.executable).parent / "nextaction"), "deploy", str(harmful)],
                            env=settings_env(s), capture_output=True, text=True, timeout=60, check=False)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    harmful_label = read_manifest(harmful)["content_hash"][:12]
    asyncio.run(produce_events(s, events[1200:], rate=200, progress=False))

    def rolled_back():
        return [u for u in updates(s) if u["kind"] == "full" and u["reason"] == "rollback"]

    rb = wait_until("a rollback record", rolled_back, 120)[0]
    ups = updates(s)
    deployed = next(k for k, u in enumerate(ups) if u["kind"] == "full" and u["version"] == harmful_label)
    assert ups.index(next(u for u in ups if u.get("reason") == "rollback")) > deployed
    assert read_manifest(rb["path"])["content_hash"][:12] == rb["version"]
    log = trainer.log_path.read_text()
    assert "rolling the fleet back" in log

    def served_again():
        recs = asyncio.run(read_all(s, s.topic_predictions))
        versions = [orjson.loads(r.value)["model_version"] for r in recs]
        return versions if versions and versions[-1].split("+")[0] == rb["version"] else None

    asyncio.run(produce_events(s, list(synthetic(300, 50, seed=6, n_items=60)), rate=200, progress=False))
    versions = wait_until("predictions by the rolled-back version", served_again, 60)
    assert len(rolled_back()) == 1, rolled_back()  # once: the harmful version's late outcomes do not flap it
    assert harmful_label in versions  # the harmful version did serve ...
    last_harmful = max(k for k, v in enumerate(versions) if v.split("+")[0] == harmful_label)
    assert all(v.split("+")[0] != harmful_label for v in versions[last_harmful + 1:])  # ... and no longer does
    assert trainer.stop() == 0, trainer.tail()
    assert worker.stop() == 0, worker.tail()


def test_a_trainer_restarted_under_a_rejected_newest_full_record_falls_back_and_the_fleet_follows(
        app_settings, make_checkpoint, service_process, tmp_path):
    """The newest full record on ``model-updates`` names a corrupt checkpoint (the worker rejects it and
    keeps serving). A trainer started then does not crash-loop: it logs the rejection at CRITICAL,
    counts it, resumes from the newest admissible full record, announces it again (``reset``) so the
    worker serves those weights, and keeps learning: its next deltas are applied by the worker and
    serve predictions."""
    import shutil

    from models.checkpoint import read_manifest
    from stream_app.records import FULL, KIND_HEADER

    ck = make_checkpoint(0, items=40)
    s = app_settings.model_copy(update={
        "checkpoint": str(ck), "models_dir": tmp_path / "models", "partitions": 1, "device": "cpu",
        "trainer_port": free_port(), "trainer_batch": 16, "trainer_max_wait_s": 0.3,
        "trainer_delta_interval_s": 0.5, "trainer_full_every_examples": 60, "trainer_start": "earliest",
        "serve_threads": 1})
    kafka_admin.ensure_topics(s, [s.topic_events, s.topic_dlq, s.topic_predictions, s.topic_outcomes,
                                  s.topic_model_updates])
    rng = random.Random(3)
    t0 = int(time.time() * 1000) - 600_000

    def events(start: int, n: int) -> list[tuple[bytes, bytes]]:
        out = []
        for k in range(start, start + n):
            u = f"u{k % 10}"
            out.append((u.encode(), orjson.dumps({"user_id": u, "item_id": f"i{rng.randrange(40)}", "action": "view",
                                                  "ts": t0 + 1000 * k})))
        return out

    worker = service_process("worker", s, tmp_path / "worker.log")
    trainer = service_process("trainer", s, tmp_path / "trainer.log")
    worker.start()
    trainer.start()
    trainer.wait_log("trainer reading", 60)
    asyncio.run(produce(s, s.topic_events, events(0, 200)))  # 190 outcomes: a few full versions
    wait_until("two full versions of the trainer", lambda: len([u for u in updates(s) if u["kind"] == "full"
                                                                 and u["path"] != str(ck)]) >= 2, 120)
    assert trainer.stop() == 0, trainer.tail()

    # the newest full record: a checkpoint under MODELS_DIR with a corrupted weights file (storage gone bad)
    before = updates(s)
    last_good = [u for u in before if u["kind"] == "full"][-1]
    corrupt = Path(shutil.copytree(make_checkpoint(5, items=40), tmp_path / "models" / "v999999"))
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    sha = read_manifest(corrupt)["content_hash"]
    bad_n = max(u["n"] for u in before if u["kind"] == "full") + 1
    asyncio.run(produce_with_headers(s, s.topic_model_updates, ModelUpdate.KEY,
                                     ModelUpdate(sha[:12], str(corrupt), sha, bad_n, "online").encode(),
                                     [(KIND_HEADER, FULL.encode())]))
    worker.wait_log("rejected, still serving", 60)  # the worker keeps the version it serves

    # the restarted trainer publishes deltas only (no full version of its own), so what serves is the fallback + deltas
    trainer = service_process("trainer", s.model_copy(update={"trainer_full_every_examples": 1_000_000}),
                              tmp_path / "trainer-restarted.log")
    trainer.start()  # before: ConfigError "the lineage's newest full record is rejected", exit, forever
    trainer.wait_log("trainer reading", 60)
    log_text = trainer.log_path.read_text()
    assert "[CRITICAL]" in log_text and "is rejected (checkpoint_unreadable" in log_text and "v999999" in log_text
    assert ('nextaction_online_rejected_full_records_total{reason="checkpoint_unreadable"} 1.0'
            in trainer.metrics())
    after = updates(s)[len(before) + 1:]
    reset = after[0]
    assert reset["kind"] == "full" and reset["reason"] == "reset" and reset["n"] > bad_n
    assert reset["path"] == last_good["path"]  # the newest admissible version, announced again
    label = read_manifest(reset["path"])["content_hash"][:12]

    worker.wait_log(f"(full): swapped:{label}", 60)  # the worker serves the fallback again
    asyncio.run(produce(s, s.topic_events, events(200, 100)))  # more outcomes: the trainer keeps learning ...
    wait_until("a delta on the fallback version", lambda: any(u["kind"] == "delta" and u["base"] == label
                                                              for u in updates(s)[len(before) + 1:]), 60)
    asyncio.run(produce(s, s.topic_events, events(300, 100)))  # ... and the worker serves what it learned

    def served_online():
        preds = [orjson.loads(r.value)["model_version"] for r in asyncio.run(read_all(s, s.topic_predictions))]
        return preds if preds[-1].startswith(label + "+") else None

    versions = wait_until("predictions by the fallback version plus the new trainer's deltas", served_online, 120)
    assert not any(v.startswith(sha[:12]) for v in versions)  # the corrupt version never served
    new = updates(s)[len(before) + 1:]
    assert any(u["kind"] == "delta" and u["base"] == label for u in new)
    metrics = urllib_get(f"http://127.0.0.1:{s.web_port}/metrics")
    assert 'nextaction_model_updates_total{result="rejected"} 1.0' in metrics
    assert trainer.stop() == 0, trainer.tail()
    assert worker.stop() == 0, worker.tail()


async def produce_with_headers(settings, topic: str, key: bytes, value: bytes, headers: list) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()
