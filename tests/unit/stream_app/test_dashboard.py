"""stream_app.dashboard: the pure parts (quantiles from histogram buckets, the sampler's ring buffer,
the trainer's figures, the inspector's answer) against real prometheus-client metrics and real
records, and the dashboard of a real Faust app (``agent.test_context()``, RocksDB tables): the
inspector reads what the pipeline stored, the recent users follow the deliveries and forgets, model
updates are marked. The page itself runs in Chromium: tests/integration/test_dashboard.py."""

from __future__ import annotations

import asyncio
import math
import re
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from models.predictor import Prediction
from models.schema import EventSeq
from stream_app import dashboard, monitoring
from stream_app.dashboard import (STATIC, RecentUsers, Sampler, bucket_quantile, buckets, online_figures, snapshot,
                                  user_report)
from stream_app.records import (CONTROL_HEADER, FULL, ForgetRequest, ModelUpdate, StoredPrediction, UserState,
                                decode_state, encode_state)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# --- quantiles -------------------------------------------------------------------------------------------
def _registry_buckets(values: list[float]) -> list[tuple[float, float]]:
    r = CollectorRegistry()
    h = Histogram("lat_seconds", "test", buckets=LATENCY_BUCKETS, registry=r)
    for v in values:
        h.observe(v)
    return buckets(snapshot(r.collect()), "lat_seconds")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 12.0, allow_nan=False), min_size=1, max_size=300), st.sampled_from([0.5, 0.9, 0.99]))
def test_a_bucket_quantile_lies_in_the_bucket_of_the_true_quantile(values, q):
    got = bucket_quantile(q, _registry_buckets(values))
    ordered = sorted(values)
    true = ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # the rank-th smallest observation
    bounds = (0.0, *LATENCY_BUCKETS)
    k = next((i for i, le in enumerate(LATENCY_BUCKETS) if true <= le), None)
    if k is None:  # beyond the last finite bound: Prometheus answers that bound
        assert got == LATENCY_BUCKETS[-1]
    else:
        assert bounds[k] - 1e-12 <= got <= LATENCY_BUCKETS[k] + 1e-12, (true, got)


def test_bucket_quantile_interpolates_like_prometheus():
    b = _registry_buckets([0.02] * 10 + [0.2] * 10)  # 10 in (0.01, 0.025], 10 in (0.1, 0.25]
    assert bucket_quantile(0.25, b) == pytest.approx(0.01 + 0.015 * 0.5)
    assert bucket_quantile(0.75, b) == pytest.approx(0.1 + 0.15 * 0.5)
    assert bucket_quantile(0.5, _registry_buckets([])) is None
    with pytest.raises(ValueError, match="q must be in"):
        bucket_quantile(1.5, b)


# --- the sampler over the worker's own registry --------------------------------------------------------------
def test_the_sampler_turns_the_worker_registry_into_rates_quantiles_and_totals():
    s = Sampler(window=3, quantile_window_s=5.0)
    read = lambda: snapshot(monitoring.REGISTRY.collect())  # noqa: E731
    dlq_before = dashboard.by_label(read(), "nextaction_events_rejected_total", "reason")
    first = s.add(100.0, read(), lag={"events[0]": 4, "events[1]": 0}, served="m1")
    assert first["events_per_s"] is None and first["p99_ms"] is None  # nothing to compare with yet
    assert (first["lag_total"], first["served"], first["online"]) == (4, "m1", None)

    monitoring.EVENTS_IN.inc(50)
    monitoring.PREDICTIONS_OUT.labels("dash-v1").inc(40)
    monitoring.EVENTS_REJECTED.labels("dash_reason").inc(3)
    for _ in range(99):
        monitoring.EVENT_TO_PREDICTION.observe(0.02)  # (0.01, 0.025]
    monitoring.EVENT_TO_PREDICTION.observe(3.0)  # (2.5, 5.0]
    for size in (4, 8, 12):
        monitoring.BATCH_SIZE.observe(size)
    second = s.add(102.0, read(), lag={"events[0]": 0})
    assert (second["events_per_s"], second["versions"]["dash-v1"], second["dlq_per_s"]) == (25.0, 20.0, 1.5)
    assert 10.0 < second["p50_ms"] <= 25.0 and 10.0 < second["p99_ms"] <= 25.0  # 99 of 100 in that bucket
    assert second["batch_mean"] == 8.0 and 8 < second["batch_p99"] <= 16
    assert second["dlq"]["dash_reason"] == dlq_before.get("dash_reason", 0) + 3
    assert second["lag_total"] == 0

    third = s.add(104.0, read())  # no new observation, but within 5 s of them: still counted
    assert third["p50_ms"] == second["p50_ms"] and third["events_per_s"] == 0.0 and third["lag_total"] is None
    fourth = s.add(108.0, read())  # the window has passed them
    assert fourth["p50_ms"] is None and fourth["batch_mean"] is None
    assert [x["t"] for x in s.samples] == [102.0, 104.0, 108.0]  # a ring of 3
    assert [x["t"] for x in s.since(103.0)] == [104.0, 108.0]
    orjson.dumps(list(s.samples))  # valid JSON: no NaN, no infinities


def test_online_figures_come_from_the_trainer_metrics_text_and_drifts_become_marks():
    pre, drifts = monitoring.ONLINE_PREQUENTIAL, monitoring.ONLINE_DRIFTS
    labels = [("dashv+1", "ndcg10", 0.11), ("dashv+4", "ndcg10", 0.24), ("dashv+4", "log_loss", 1.3),
              ("dashw", "ndcg10", 0.05)]
    for v, m, x in labels:
        pre.labels(v, m).set(x)
    try:
        def scrape():  # what the dashboard reads from http://WEB_BIND:TRAINER_PORT/metrics
            return snapshot(text_string_to_metric_families(monitoring.render()[0].decode()))

        s = Sampler()
        first = s.add(10.0, {}, trainer=scrape())
        assert first["online"]["ndcg10"]["dashv"] == 0.24 and first["online"]["ndcg10"]["dashw"] == 0.05
        assert first["online"]["log_loss"]["dashv"] == 1.3 and first["online"]["labels"]["dashv"] == "dashv+4"
        assert list(s.marks) == []
        drifts.inc()
        s.add(11.0, {}, trainer=scrape())
        assert [(m["kind"], m["t"]) for m in s.marks] == [("drift", 11.0)]
        assert s.add(12.0, {}, trainer=None)["online"] is None  # the trainer stopped answering
    finally:
        for v, m, _ in labels:
            pre.remove(v, m)
    assert online_figures(scrape()) is None or "dashv" not in online_figures(scrape())["ndcg10"]


# --- the inspector ------------------------------------------------------------------------------------------
def _state(n: int) -> UserState:
    h = EventSeq.empty()
    for k in range(n):
        h = h.appended(f"i{k}", ["view", "cart", "purchase"][k % 3], 1_000 * (k + 1), device="ios", category=f"c{k % 2}")
    last = StoredPrediction("m+3", 1_000 * n, 1, 41, Prediction([0.4, 0.3, 0.1, 0.1, 0.1], [("i7", 0.25), ("i2", 0.1)],
                                                               12.5, "because"))
    return decode_state(encode_state(UserState(h, last, seen=99)))  # as stored


def test_the_inspector_shows_the_newest_events_first_and_the_latest_prediction():
    code, body = user_report("u1", _state(30), partition=1, held={1, 3}, limit=20, in_flight=2)
    assert code == 200 and body["status"] == "ok" and body["history_len"] == 30 and body["in_flight"] == 2
    assert [e["item_id"] for e in body["history"]] == [f"i{k}" for k in range(29, 9, -1)]
    assert body["history"][0] == {"ts": 30_000, "action": "purchase", "item_id": "i29", "category": "c1", "device": "ios",
                                  "location": ""}
    p = body["prediction"]
    assert (p["model_version"], p["event_ts"], p["partition"], p["offset"]) == ("m+3", 30_000, 1, 41)
    assert p["top_items"] == [["i7", 0.25], ["i2", 0.1]] and p["action_probs"]["view"] == 0.4
    assert (p["next_gap_s"], p["explanation"], body["held_partitions"], body["seen_ms"]) == (12.5, "because", [1, 3], 99)
    orjson.dumps(body)


def test_the_inspector_says_where_a_user_is_and_when_there_is_nothing():
    code, body = user_report("u1", None, partition=2, held={0, 1}, topic="shop.events")
    assert code == 421 and body["status"] == "elsewhere"
    assert "partition 2 of 'shop.events'" in body["message"] and "this one holds: 0, 1" in body["message"]
    code, body = user_report("u1", UserState(EventSeq.empty()), partition=0, held={0})
    assert code == 404 and body["status"] == "unknown" and "no state for this user" in body["message"]
    assert user_report("u1", _state(1), partition=None, held=None)[0] == 200  # unknown owner: answered from here


def test_recent_users_are_bounded_newest_first_and_forgettable():
    r = RecentUsers(3)
    r.saw(["a", "b", "c"], 1.0)
    r.saw(["a", "d"], 2.0)
    assert [u for u, _ in r.newest()] == ["d", "a", "c"]
    r.forget("a")
    r.forget("zz")
    assert r.newest(5) == [("d", 2.0), ("c", 1.0)]


# --- the dashboard of a real Faust app -----------------------------------------------------------------------
def _ev(user, item, ts):
    return orjson.dumps({"user_id": user, "item_id": item, "action": "view", "ts": ts})


async def _put(app, messages):
    async with app.pipeline.agent.test_context() as agent:
        for key, value, *headers in messages:
            await agent.put(value, key=key, headers=headers[0] if headers else None)
            await app.pipeline.batcher.drain()
        await app.pipeline.batcher.drain()


def test_the_inspector_reads_what_the_pipeline_stored_and_recent_users_follow_deliveries(make_app):
    app, rec = make_app()
    dash = app.dashboard
    t = int(time.time() * 1000) - 60_000
    asyncio.run(_put(app, [(b"u1", _ev("u1", "i1", t)), (b"u2", _ev("u2", "i5", t + 1)), (b"u1", _ev("u1", "i2", t + 2)),
                           (b"u1", _ev("u1", "i3", t + 3))]))
    assert [u for u, _ in dash.recent.newest()] == ["u1", "u2"]
    code, body = dash.user("u1")
    assert code == 200 and [e["item_id"] for e in body["history"]] == ["i3", "i2", "i1"]
    published = rec.of("predictions")[-1]
    assert published["user_id"] == "u1"
    assert body["prediction"]["top_items"] == [[i, pytest.approx(s)] for i, s in published["top_items"]]
    assert (body["prediction"]["model_version"], body["prediction"]["event_ts"]) == (published["model_version"], t + 3)
    assert dash.user("nobody")[0] == 404

    asyncio.run(_put(app, [(b"u1", ForgetRequest().encode(), [(CONTROL_HEADER, b"forget")])]))
    assert [u for u, _ in dash.recent.newest()] == ["u2"]  # a forgotten user leaves the list at once
    assert dash.user("u1")[0] == 404


def test_model_updates_the_worker_handles_are_marked(make_app):
    app, _ = make_app()
    dash = app.dashboard
    bad = ModelUpdate("v9", "/not/a/root/v9", "ab" * 32, n=4, reason="online").encode()
    result = asyncio.run(app.pipeline.model_updates.handle(FULL, bad))  # through the listener's handler
    assert result == "rejected:path_not_allowed"
    assert [(m["kind"], m["label"], m["detail"]) for m in dash.sampler.marks] == [
        ("rejected", "v9", "rejected:path_not_allowed")]
    dash.on_model_update(FULL, ModelUpdate("v10", "/m/v10", "cd" * 32, n=5, reason="rollback").encode(),
                         "swapped:v10", t=50.0)
    dash.on_model_update(FULL, ModelUpdate("cdcdcdcdcdcd", "/m/v11", "cd" * 32).encode(), "swapped:x", t=51.0)
    dash.on_model_update("delta", b"...", "delta:v10+1", t=52.0)  # deltas are many: not marked
    dash.on_model_update(FULL, ModelUpdate("v10", "/m/v10", "cd" * 32).encode(), "skipped", t=53.0)
    assert [(m["kind"], m["label"]) for m in list(dash.sampler.marks)[1:]] == [("rollback", "v10"),
                                                                              ("deploy", "cdcdcdcdcdcd")]


def test_a_sample_of_a_real_app_and_the_series_body():
    """``tick`` on an app that never started (no consumer assignment, no batcher): a sample all the same."""
    from stream_app.app import create_app
    from stream_app.settings import Settings

    app = create_app(Settings(app_id="test-dashboard-tick", partitions=1, gc_freeze=False))
    dash = app.dashboard
    dash.tick(now=1000.0)
    sample = dash.tick(now=1001.0)
    assert sample["served"] is None and sample["events_per_s"] is not None and sample["lag_total"] is None
    body = orjson.loads(orjson.dumps(dash.series(since=1000.5)))
    assert [x["t"] for x in body["samples"]] == [1001.0]
    assert body["worker"]["app_id"] == "test-dashboard-tick" and body["trainer"]["ok"] is False
    assert body["trainer"]["url"] == f"http://127.0.0.1:{app.topology.settings.trainer_port}/metrics"


def test_the_page_and_every_file_it_loads_are_in_the_package():
    dash = dashboard.Dashboard.__new__(dashboard.Dashboard)
    dash._files = {}
    html, ctype = dash.static("dashboard.html")
    assert ctype == "text/html"
    wanted = re.findall(r'(?:src|href)="dashboard/static/([^"]+)"', html)
    assert {"uPlot.iife.min.js", "uPlot.min.css", "dashboard.js", "dashboard.css", "uPlot.LICENSE"} <= set(wanted)
    for name in wanted:
        assert (STATIC / name).is_file(), name
        assert dash.static(name) is not None
    assert "MIT License" in dash.static("uPlot.LICENSE")[0]
    assert dash.static("../dashboard.py") is None and dash.static(".hidden") is None and dash.static("nope.js") is None
