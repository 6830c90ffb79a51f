"""stream_app.status: the report of ``nextaction status`` from real parsed data: the exposition text of
the real registry after a real pipeline handled events (a Faust app in ``test_context``), DescribeGroups
responses and ``model-updates`` records built and decoded with the real codecs.
(The broker and the workers over the network: tests/integration/test_status.py.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.protocol.admin import DescribeGroupsResponse_v1
from rich.console import Console

from models.delta import ModelDelta
from stream_app import monitoring, status
from stream_app.records import ModelUpdate
from stream_app.settings import Settings

MEMBER_A = "faust-0.15.3-54945bc3-8d21-4ad5-af01-eadaafcf3a91"
MEMBER_B = "faust-0.15.3-0b1c2d3e-1111-2222-3333-444455556666"


def ev(user: str, item: str, ts: int, action: str = "view") -> bytes:
    return orjson.dumps({"user_id": user, "item_id": item, "action": action, "ts": ts})


def scrape() -> dict:
    return status.parse_metrics(monitoring.render()[0].decode())


async def _run_events(app, messages):
    async with app.pipeline.agent.test_context() as agent:
        for key, value in messages:
            await agent.put(value, key=key)
        await app.pipeline.batcher.drain()
        return status.worker_sample(app)


def test_worker_figures_from_a_real_pipeline_s_metrics(make_app):
    """Two scrapes of the real registry around events handled by the real pipeline: the rates, the
    dead letters by reason and the version the worker serves come out of its /metrics."""
    app, _ = make_app()
    t = int(time.time() * 1000) - 5_000
    msgs = [(f"u{n % 3}".encode(), ev(f"u{n % 3}", f"i{n}", t + n)) for n in range(9)]
    msgs += [(b"u1", b"{broken"), (b"u2", ev("u2", "i1", t, action="teleport")), (b"u0", b"[1]")]
    first = scrape()
    sample = asyncio.run(_run_events(app, msgs))
    second = scrape()

    assert sample["version"] == "baseline-markov-1" and sample["info"]["app_id"] == app.topology.settings.app_id
    assert sample["info"]["pid"] > 0 and sample["lag"] == {}  # test_context: no broker, no assignment
    row = status.worker_figures("http://w1:6066/metrics", first, second, interval_s=2.0)
    assert row["events_per_s"] == 6.0 and row["predictions_per_s"] == 4.5  # 12 messages, 9 predictions in 2 s
    dlq_before = {r: n for r, n in ((lb["reason"], v) for lb, v in first.get("nextaction_events_rejected_total", []))}
    assert row["dlq"]["not_json"] == dlq_before.get("not_json", 0) + 1
    assert row["dlq"]["bad_action"] == dlq_before.get("bad_action", 0) + 1
    assert row["dlq"]["not_object"] == dlq_before.get("not_object", 0) + 1
    assert row["latency_ms"]["window"] == "interval" and 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
    # the app built last is the one /metrics describes (stream_app.app.create_app calls watch_worker)
    assert second["nextaction_worker_info"][0][0]["app_id"] == app.topology.settings.app_id


def test_worker_collector_exposes_identity_version_and_lag():
    old = monitoring.WORKER.source
    try:
        monitoring.WORKER.source = lambda: {"info": {"app_id": "nx", "host": "h1", "pid": 42, "member_id": MEMBER_A},
                                            "version": "0123456789ab+7", "lag": {("events", 1): 5, ("events", 0): 0}}
        s = scrape()
        assert s["nextaction_worker_info"] == [({"app_id": "nx", "host": "h1", "pid": "42", "member_id": MEMBER_A},
                                                1.0)]
        assert s["nextaction_model_served_info"] == [({"version": "0123456789ab+7", "base": "0123456789ab"}, 1.0)]
        assert s["nextaction_consumer_lag_records"] == [({"topic": "events", "partition": "0"}, 0.0),
                                                        ({"topic": "events", "partition": "1"}, 5.0)]
        row = status.worker_figures("http://h1:6066/metrics", s, s, 1.0)
        assert (row["member_id"], row["pid"], row["model_version"], row["model_base"]) == (
            MEMBER_A, 42, "0123456789ab+7", "0123456789ab")

        def broken():
            raise RuntimeError("consumer not started")

        monitoring.WORKER.source = broken  # a scrape while the worker starts: the families, no samples
        s = scrape()
        assert "nextaction_worker_info" not in s and "nextaction_events_in_total" in s
    finally:
        monitoring.WORKER.source = old


def _describe_groups(group: str, members: list[tuple[str, dict[str, list[int]]]]) -> DescribeGroupsResponse_v1:
    """A DescribeGroups answer as the broker sends it (encoded, then decoded by aiokafka)."""
    rows = [(mid, "faust-0.15.3", "/10.0.0.%d" % i, b"",
             ConsumerProtocolMemberAssignment(0, sorted(parts.items()), b"{}").encode())
            for i, (mid, parts) in enumerate(members)]
    resp = DescribeGroupsResponse_v1(throttle_time_ms=0, groups=[(0, group, "Stable", "consumer", "faust", rows)])
    return DescribeGroupsResponse_v1.decode(resp.encode())


def test_group_members_decode_the_assignment_of_each_member():
    resp = _describe_groups("nx", [(MEMBER_B, {"events": [2, 3], "nx-histories-changelog": [3, 2]}),
                                   (MEMBER_A, {"events": [1, 0]})])
    g = status.group_members([resp], "nx")
    assert (g["id"], g["state"], g["protocol"]) == ("nx", "Stable", "faust")
    assert [m["member_id"] for m in g["members"]] == sorted([MEMBER_A, MEMBER_B])
    by_id = {m["member_id"]: m for m in g["members"]}
    assert by_id[MEMBER_A]["partitions"] == {"events": [0, 1]} and by_id[MEMBER_A]["host"] == "10.0.0.1"
    assert by_id[MEMBER_B]["partitions"] == {"events": [2, 3], "nx-histories-changelog": [2, 3]}
    assert status.group_members([resp], "other") == {"id": "other", "state": "Dead", "protocol": None, "members": []}


def test_partition_lag_counts_from_committed_or_from_the_first_offset():
    rows = status.partition_lag({("e", 0): 100, ("e", 1): 0}, {("e", 0): 150, ("e", 1): 10},
                                {("e", 0): -1, ("e", 1): 10}, {})
    assert [(r["committed"], r["lag"]) for r in rows] == [(None, 50), (10, 0)]


def _broker(settings, group) -> dict:
    e, d, r = settings.topic_events, settings.topic_dlq, settings.topic_repartition
    return {"brokers": 1, "partitions": {e: 2, d: 2, r: 2, "nx-histories-changelog": 2},
            "first": {(e, 0): 0, (e, 1): 0, (d, 0): 0, (d, 1): 0},
            "end": {(e, 0): 120, (e, 1): 80, (d, 0): 3, (d, 1): 4, (r, 0): 0, (r, 1): 0,
                    ("nx-histories-changelog", 0): 7, ("nx-histories-changelog", 1): 9},
            "committed": {(e, 0): 100, (e, 1): 80}, "group": group,
            "last_update": status.describe_update("full", ModelUpdate("v7", "/models/v7", "ab" * 32, 3, "online")
                                                  .encode(), 12, 1_700_000_000_000, 1_700_000_090_000)}


def test_build_report_joins_workers_to_members_and_renders_an_aligned_table():
    s = Settings(app_id="nx", partitions=2)
    group = status.group_members(_describe_groups("nx", [(MEMBER_A, {"events": [0, 1]}),
                                                         (MEMBER_B, {s.topic_repartition: [0, 1]})]), "nx")
    old = monitoring.WORKER.source
    try:
        monitoring.WORKER.source = lambda: {"info": {"app_id": "nx", "host": "h", "pid": 7, "member_id": MEMBER_A},
                                            "version": "abc", "lag": {}}
        text = scrape()
    finally:
        monitoring.WORKER.source = old
    w1 = status.worker_figures("http://h:6066/metrics", text, text, 2.0)
    w1["dlq"] = {"not_json": 2, "bad_ts": 1}  # this worker's counts since it started
    w2 = status.worker_failed("http://h2:6066/metrics", "ClientConnectorError: refused")
    report = status.build_report(s, _broker(s, group), [w1, w2], now_s=1_700_000_100)

    assert report["generated_at"] == "2023-11-14T22:15:00Z" and report["status_version"] == 1
    assert report["lag"][:2] == [
        {"topic": "events", "partition": 0, "first": 0, "end": 120, "committed": 100, "lag": 20, "member_id": MEMBER_A},
        {"topic": "events", "partition": 1, "first": 0, "end": 80, "committed": 80, "lag": 0, "member_id": MEMBER_A}]
    assert report["lag_total"] == 20 and {r["topic"] for r in report["lag"]} == {"events", s.topic_repartition}
    members = {m["member_id"]: m["worker"] for m in report["group"]["members"]}
    assert members == {MEMBER_A: "http://h:6066/metrics", MEMBER_B: None}
    assert [(t["name"], t["role"], t["messages"]) for t in report["topics"]] == [
        ("events", "input", 200), (s.topic_repartition, "input", 0), ("events.dlq", "dlq", 7),
        ("nx-histories-changelog", "changelog", 16)]
    assert report["dlq"] == {"bad_ts": 1, "not_json": 2}
    u = report["last_model_update"]
    assert (u["kind"], u["version"], u["path"], u["reason"], u["age_s"], u["at"]) == (
        "full", "v7", "/models/v7", "online", 90.0, "2023-11-14T22:13:20Z")
    assert orjson.loads(orjson.dumps(report)) == report  # plain JSON types only

    console = Console(record=True, width=120)
    for part in status.render(report):
        console.print(part)
    out = console.export_text()
    assert "group nx: Stable, 2 members" in out and "lag 20 · 2023-11-14T22:15:00Z" in out
    assert "h:6066" in out and "not answering: ClientConnectorError: refused" in out
    assert "last model update: full v7 (online) from /models/v7" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:4] == ["topic", "partition", "end", "committed"])
    lag_line = next(line for line in lines if line.split()[:3] == ["events", "0", "120"])
    assert lag_line.split() == ["events", "0", "120", "100", "20", "h:6066"]  # held by: the member's worker ...
    assert next(line for line in lines if line.split()[:3] == [s.topic_repartition, "0", "0"]).split()[-1] == \
        "faust-0.15.3-0b1c2d3e"  # ... or the member's short id when no scraped worker says it is that member
    for col in ("end", "committed", "lag"):  # numbers right-aligned under their heading
        end = header.index(col) + len(col)
        assert lag_line[:end].rstrip() == lag_line[:end] and lag_line[end:end + 1] == " ", (col, lag_line)


def test_describe_update_reads_a_delta_s_label():
    d = ModelDelta("0123456789ab", seq=5, prev=4, item_index=np.array([8]), item_ids=["new-1"],
                   item_emb=np.ones((1, 4), np.float32), item_bias=np.zeros(1, np.float32),
                   item_category=np.zeros(1, np.int64))
    u = status.describe_update("delta", d.encode(), 40, 1_000, 3_500)
    assert (u["kind"], u["version"], u["age_s"]) == ("delta", "0123456789ab+5", 2.5)
    assert status.describe_update("delta", b"junk", 41, 1_000, 1_000)["reason"] == "unreadable delta"
    assert status.describe_update("full", b"{}", 42, 0, 0)["reason"].startswith("bad record")


def test_worker_urls():
    assert status.default_worker(Settings(web_bind="0.0.0.0", web_port=7000)) == "http://127.0.0.1:7000/metrics"
    assert status.default_worker(Settings(web_port=6066)) == "http://127.0.0.1:6066/metrics"
    assert status.default_worker(Settings(web_bind="::1", web_port=6066)) == "http://[::1]:6066/metrics"
