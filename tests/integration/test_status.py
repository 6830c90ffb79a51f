"""``nextaction status`` against a real worker on the test broker: the lag goes to 0 once the worker has
processed everything, the worker is the group member holding every input partition, it reports the
version deployed through ``model-updates``, and its dead letters by reason are the bad events sent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from stream_app import kafka_admin, status
from stream_app.errors import EventRejected
from stream_app.kafka_security import client_kwargs
from stream_app.events import parse_event
from stream_app.ports import free_port
from stream_app.replay import encode, produce, synthetic
from tests.conftest import settings_env
from tests.integration.accounting import metric, read_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
NEXTACTION = str(Path(sys.executable).parent / "nextaction")


def _expected_dlq(events: list[dict]) -> Counter:
    reasons: Counter = Counter()
    for e in events:
        key, value = encode(e)
        try:
            parse_event(value, now_ms=int(time.time() * 1000), key=key)
        except EventRejected as exc:
            reasons[exc.reason] += 1
    return reasons


def _wait_applied(worker, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if metric(worker.metrics(), 'nextaction_model_updates_total{result="applied"}') >= 1:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"model update not applied within {timeout} s:\n{worker.tail()}"
        time.sleep(0.3)


def test_status_reports_lag_members_version_and_dead_letters(app_settings, make_checkpoint, tmp_path,
                                                             service_process):
    from models.checkpoint import read_manifest

    v1, v2 = make_checkpoint(0, items=30), make_checkpoint(1, items=30)
    ver2 = read_manifest(v2)["content_hash"][:12]
    s = app_settings.model_copy(update={"checkpoint": v1, "device": "cpu", "serve_threads": 1})
    kafka_admin.ensure_topics(s)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    url = f"http://127.0.0.1:{s.web_port}/metrics"
    silent = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    try:
        deploy = subprocess.run([NEXTACTION, "deploy", str(v2)], cwd=REPO, env=settings_env(s),
                                capture_output=True, text=True, timeout=120)
        assert deploy.returncode == 0, deploy.stderr
        _wait_applied(worker)

        events = list(synthetic(1500, 150, seed=21, bad_fraction=0.05))
        bad = _expected_dlq(events)
        assert sum(bad.values()) > 20 and len(bad) > 1
        assert asyncio.run(produce(s, events, progress=False)) == len(events)

        def answered(out) -> bool:
            return len(out[s.topic_predictions]) + len(out[s.topic_dlq]) >= len(events)

        asyncio.run(read_topics(s, [s.topic_predictions, s.topic_dlq], answered, 240))
        deadline = time.monotonic() + 60  # the offsets are committed within COMMIT_INTERVAL_S
        while True:
            report = asyncio.run(status.gather(s, [url, silent], interval_s=1.0))
            if report["lag_total"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(1.0)

        assert report["lag_total"] == 0, report["lag"]
        events_lag = [r for r in report["lag"] if r["topic"] == s.topic_events]
        assert [r["partition"] for r in events_lag] == list(range(s.partitions))
        assert all(r["committed"] == r["end"] for r in events_lag)
        assert sum(r["end"] for r in events_lag) == len(events)

        (member,) = report["group"]["members"]
        assert report["group"]["id"] == s.app_id and report["group"]["state"] == "Stable"
        assert member["partitions"][s.topic_events] == list(range(s.partitions))
        assert member["worker"] == url
        assert {r["member_id"] for r in report["lag"]} == {member["member_id"]}

        w, gone = report["workers"]
        assert w["ok"] and w["member_id"] == member["member_id"] and w["app_id"] == s.app_id
        assert w["pid"] == worker.proc.pid
        assert w["model_version"] == ver2 and w["model_base"] == ver2
        assert w["events_in"] == len(events) and w["predictions_out"] == len(events) - sum(bad.values())
        assert w["dlq"] == dict(bad), (w["dlq"], bad)
        assert report["dlq"] == dict(sorted(bad.items()))
        assert w["assigned"][s.topic_events] == s.partitions
        assert w["latency_ms"]["p50"] is not None and w["latency_ms"]["p99"] >= w["latency_ms"]["p50"]
        assert not gone["ok"] and gone["url"] == silent and gone["error"]

        update = report["last_model_update"]
        assert update["kind"] == "full" and update["version"] == ver2 and update["path"] == str(v2)
        topics = {t["name"]: t for t in report["topics"]}
        assert topics[s.topic_events]["role"] == "input" and topics[s.topic_events]["messages"] == len(events)
        assert topics[s.topic_dlq]["messages"] == sum(bad.values())
        assert topics[s.topic_predictions]["messages"] == len(events) - sum(bad.values())

        # the command itself, as an operator runs it: the JSON and the table
        env = settings_env(s)
        run = subprocess.run([NEXTACTION, "status", "--json", "-w", f"127.0.0.1:{s.web_port}", "--interval", "0.5"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        cli = json.loads(run.stdout)
        assert cli["status_version"] == 1 and cli["lag_total"] == 0
        assert cli["workers"][0]["model_version"] == ver2 and cli["workers"][0]["dlq"] == dict(bad)
        table = subprocess.run([NEXTACTION, "status", "--interval", "0.5"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
        assert table.returncode == 0, table.stderr
        assert f"127.0.0.1:{s.web_port}" in table.stdout and ver2 in table.stdout
        assert f"last model update: full {ver2}" in table.stdout
        print("\nSTATUS", json.dumps({"lag_total": report["lag_total"], "dlq": report["dlq"],
                                      "model_version": w["model_version"]}))
    finally:
        rc = worker.stop()
    assert rc == 0, worker.tail()



def test_kafka_create_topics_makes_the_app_s_topics_with_the_product_s_configs(app_settings):
    """``nextaction kafka create-topics`` on a cluster the product did not start (here: the test broker,
    through BROKER_URL): every app topic with ``--partitions``, the per-user ones with their retention."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    s = app_settings.model_copy(update={"topic_retention_s": 3600})
    run = subprocess.run([NEXTACTION, "kafka", "create-topics", "--partitions", "3"], cwd=REPO, env=settings_env(s),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    topics = kafka_admin.app_topics(s)
    assert "replication factor 1" in run.stdout  # one broker

    async def describe():
        admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers, **client_kwargs(s))
        await admin.start()
        try:
            parts = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(topics)}
            resp = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
            configs = {}
            for r in resp:
                for _err, _msg, _type, name, entries in r.resources:
                    configs[name] = {e[0]: e[1] for e in entries}
            return parts, configs
        finally:
            await admin.close()

    parts, configs = asyncio.run(describe())
    assert parts == {t: 3 for t in topics}
    assert {t: configs[t]["retention.ms"] for t in kafka_admin.user_topics(s)} == \
        {t: "3600000" for t in kafka_admin.user_topics(s)}
    again = subprocess.run([NEXTACTION, "kafka", "create-topics", "--partitions", "5"], cwd=REPO, env=settings_env(s),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and asyncio.run(describe())[0] == {t: 3 for t in topics}  # existing ones kept
