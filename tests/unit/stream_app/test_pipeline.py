"""stream_app.pipeline through its Faust agent (stream_app.agents) inside ``agent.test_context()``,
with real RocksDB tables in a temp dir.

``test_context`` has no broker, so outputs go to a recording publisher instead of the producer
(the ``make_app`` fixture, tests/unit/stream_app/conftest.py); everything else (Faust streams, acks,
tables, the batcher thread, the baseline) is the real thing.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.predictor import Predictor
from models.schema import ACTIONS, EventSeq
from online.baseline import PopularityMarkovPredictor
from stream_app import monitoring
from stream_app.records import decode_state


class Exploding(Predictor):
    version = "exploding-1"

    def predict(self, histories, k, users=None):
        raise RuntimeError("model on fire")

    def observe(self, history):
        pass


def ev(user="u1", item="i1", action="view", ts=None, **extra):
    ts = ts if ts is not None else int(time.time() * 1000)
    return orjson.dumps({"user_id": user, "item_id": item, "action": action, "ts": ts, **extra})


async def put_all(app, messages, one_at_a_time=True):
    async with app.pipeline.agent.test_context() as agent:
        out = []
        for key, value, *offset in messages:
            if offset:
                agent.sent_offset = offset[0]
            out.append(await agent.put(value, key=key))
            if one_at_a_time:
                await app.pipeline.batcher.drain()  # deterministic learning order
        inflight = max((p.inflight for p in app.pipeline.pending.values()), default=0)
        await app.pipeline.batcher.drain()
        app.max_inflight = inflight
        states = {k: decode_state(app.topology.histories.get(k)) for k in ("u1", "u2")}
        assert app.pipeline.pending == {}  # every event delivered: nothing left between handle and deliver
        app.states = states
        return agent.results, {k: st.history for k, st in states.items()}


def test_valid_event_yields_prediction_and_updates_history(make_app):
    app, rec = make_app()
    t = int(time.time() * 1000) - 5_000
    results, hist = asyncio.run(put_all(app, [(b"u2", ev(user="u2", item="i0", ts=t - 1)),
                                              (b"u1", ev(ts=t, device="ios", category="c1"))]))
    assert results == {0: "queued", 1: "queued"}
    first, p = rec.of("predictions")
    assert first["top_items"] == []  # predict before learning: the very first prediction knows nothing
    assert p["user_id"] == "u1" and p["event_ts"] == t and p["model_version"] == "baseline-markov-1"
    assert set(p["action_probs"]) == set(ACTIONS) and math.isclose(sum(p["action_probs"].values()), 1.0)
    assert p["top_items"] and all(isinstance(i, str) and isinstance(s, float) for i, s in p["top_items"])
    assert p["next_gap_s"] >= 0 and 0 <= p["latency_ms"] < 10_000
    assert (p["partition"], p["offset"], p["history_len"], p["activity"]) == (0, 1, 1, 1)
    assert hist["u1"].items == ["i1"] and hist["u1"].devices == ["ios"] and hist["u1"].categories == ["c1"]
    assert rec.of("outcomes") == [] and rec.of("dlq") == []


def test_activity_counts_the_users_events_per_event_time_window_in_the_state_record(make_app):
    """The activity count of each prediction is the user's events in the event's tumbling window so far
    (a redelivered event is not counted again), stored in the user's one ``histories`` record."""
    app, rec = make_app(activity_window_s=3600)
    t = (int(time.time() * 1000) // 3_600_000 - 5) * 3_600_000  # the start of a window, 5 hours ago
    first = ev(ts=t + 1000, item="i1")
    msgs = [(b"u1", first), (b"u1", ev(ts=t + 2000, item="i2")), (b"u1", ev(ts=t + 3_600_000, item="i3")),
            (b"u1", first, 0), (b"u1", ev(ts=t + 3_700_000, item="i4")), (b"u2", ev(user="u2", ts=t))]
    asyncio.run(put_all(app, msgs))
    preds = rec.of("predictions")
    assert [(p["activity"], p["duplicate"]) for p in preds if p["user_id"] == "u1"] == [
        (1, False), (2, False), (1, False), (2, True), (2, False)]
    w = t // 3_600_000
    assert app.states["u1"].activity == {w: 2, w + 1: 2} and app.states["u2"].activity == {w: 1}


def test_invalid_events_go_to_dlq_with_reason_and_source(make_app):
    app, rec = make_app()
    msgs = [(b"u1", b"{broken"), (b"u1", ev(action="teleport")), (b"u2", ev(user="u1")), (None, ev()),
            (b"u1", ev(ts=int(time.time() * 1000) + 3_600_000))]
    before = monitoring.EVENTS_REJECTED.labels("bad_action")._value.get()
    results, hist = asyncio.run(put_all(app, msgs))
    assert list(results.values()) == ["rejected:not_json", "rejected:bad_action", "rejected:key_mismatch",
                                      "rejected:key_mismatch", "rejected:clock_skew"]
    dlq = rec.of("dlq")
    assert [d["reason"] for d in dlq] == ["not_json", "bad_action", "key_mismatch", "key_mismatch", "clock_skew"]
    assert dlq[0]["original"] == "{broken" and dlq[0]["source"] == {"topic": "events", "partition": 0, "offset": 0}
    assert [d["source"]["offset"] for d in dlq] == [0, 1, 2, 3, 4]
    assert "teleport" in dlq[1]["detail"]
    assert rec.of("predictions") == [] and len(hist["u1"]) == 0
    assert monitoring.EVENTS_REJECTED.labels("bad_action")._value.get() == before + 1


def test_outcome_pairs_previous_prediction_with_what_happened(make_app):
    app, rec = make_app()
    t = int(time.time() * 1000) - 60_000
    msgs = [(b"u1", ev(item=f"i{n}", ts=t + n * 10_000, action=a)) for n, a in enumerate(["view", "cart", "purchase"])]
    msgs.append((b"u2", ev(user="u2", ts=t)))
    results, hist = asyncio.run(put_all(app, msgs))
    preds, outs = rec.of("predictions"), rec.of("outcomes")
    assert [p["history_len"] for p in preds] == [1, 2, 3, 1]
    assert len(outs) == 2  # u1's 2nd and 3rd events; u2 had no previous prediction
    o = outs[1]
    assert o["context"]["event_ts"] == t + 10_000 and o["context"]["model_version"] == preds[1]["model_version"]
    assert o["context"]["top_items"] == preds[1]["top_items"]
    assert o["context"]["action_probs"] == pytest.approx(preds[1]["action_probs"])
    assert o["happened"] == {"action": "purchase", "item_id": "i2", "category": "", "ts": t + 20_000, "gap_s": 10.0,
                             "item_rank": o["happened"]["item_rank"], "action_prob": preds[1]["action_probs"]["purchase"]}
    served = EventSeq.from_json(o["context"]["window"])  # exactly what the 2nd event's prediction saw
    assert served.items == ["i0", "i1"] and served.ts[-1] == o["context"]["event_ts"]
    assert hist["u1"].items == ["i0", "i1", "i2"] and hist["u2"].items == ["i1"]
    last = app.states["u1"].last  # stored with the window: the next event's outcome pairs with it
    assert (last.offset, last.event_ts, [list(x) for x in last.prediction.top_items]) == (
        preds[2]["offset"], t + 20_000, preds[2]["top_items"])
    assert app.states["u2"].last.offset == preds[3]["offset"]


class _Witness(PopularityMarkovPredictor):
    """The baseline, remembering the history each prediction was made from (keyed by its last event's ts)."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, EventSeq] = {}

    def predict(self, histories, k, users=None):
        self.seen.update((int(h.ts[-1]), h) for h in histories)
        return super().predict(histories, k, users)


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_an_outcome_carries_exactly_the_window_its_prediction_was_made_from(make_app, one_at_a_time):
    """The online trainer's example input: the served window, also once the 5-event window is full and
    drops its oldest event (so the outcome cannot be rebuilt from the newer window), and with the user's
    events in flight together."""
    witness = _Witness()
    app, rec = make_app(predictor_factory=lambda s: witness, max_wait_ms=50.0)
    t = int(time.time() * 1000) - 600_000
    msgs = [(b"u1", ev(item=f"i{n}", ts=t + n * 1000)) for n in range(8)]
    asyncio.run(put_all(app, msgs, one_at_a_time=one_at_a_time))
    outs = rec.of("outcomes")
    assert len(outs) == 7
    for o in outs:
        served = EventSeq.from_json(o["context"]["window"])
        assert served == witness.seen[o["context"]["event_ts"]]
        assert len(served) == min(5, (o["context"]["event_ts"] - t) // 1000 + 1)
        assert o["happened"]["ts"] > served.ts[-1]  # nothing from the target event or later


def test_a_users_events_in_flight_together_see_each_other_and_pair_in_order(make_app):
    """Events of one user queued before any is delivered: each one's history holds the earlier ones
    (from the pending state, not yet in the table), and delivery writes state and outcomes in order."""
    app, rec = make_app(max_wait_ms=200.0)
    t = int(time.time() * 1000) - 60_000
    msgs = [(b"u1", ev(item=f"i{n}", ts=t + n * 1000)) for n in range(4)] + [(b"u2", ev(user="u2", ts=t))]
    results, hist = asyncio.run(put_all(app, msgs, one_at_a_time=False))
    assert app.max_inflight == 4  # all of u1's events were in flight at once
    assert app.producer.buffer.max_messages == 4096  # Faust's 100 would pause the stream on every burst
    preds, outs = rec.of("predictions"), rec.of("outcomes")
    assert sorted(p["history_len"] for p in preds if p["user_id"] == "u1") == [1, 2, 3, 4]
    assert [o["context"]["offset"] for o in outs] == [0, 1, 2]  # each paired with the previous event
    assert [o["happened"]["item_id"] for o in outs] == ["i1", "i2", "i3"]
    assert hist["u1"].items == ["i0", "i1", "i2", "i3"] and app.states["u1"].last.offset == 3


def test_history_is_bounded_and_redelivery_is_idempotent(make_app):
    app, rec = make_app()
    t = int(time.time() * 1000) - 100_000
    msgs = [(b"u1", ev(item=f"i{n}", ts=t + n * 1000)) for n in range(7)]
    msgs.append((b"u1", ev(item="i6", ts=t + 6000), 6))  # offset 6 again: a redelivery after a restart
    results, hist = asyncio.run(put_all(app, msgs))
    assert results[7] == "duplicate"
    assert hist["u1"].items == ["i2", "i3", "i4", "i5", "i6"]  # window_events=5, no duplicate entry
    preds = rec.of("predictions")
    assert len(preds) == 8 and preds[-1]["duplicate"] is True and preds[-1]["offset"] == 6
    assert len(rec.of("outcomes")) == 6  # not re-emitted for the redelivered event


def test_predictor_failure_dead_letters_with_reason_and_keeps_worker_alive(make_app):
    app, rec = make_app(predictor_factory=lambda s: Exploding())
    results, hist = asyncio.run(put_all(app, [(b"u1", ev(item="a")), (b"u1", ev(item="b"))]))
    assert list(results.values()) == ["queued", "queued"]
    dlq = rec.of("dlq")
    assert [d["reason"] for d in dlq] == ["predict_failed", "predict_failed"]
    assert "model on fire" in dlq[0]["detail"] and orjson.loads(dlq[1]["original"])["item_id"] == "b"
    assert hist["u1"].items == ["a", "b"] and rec.of("predictions") == []


def test_gc_freeze_setting_freezes_the_start_up_heap(make_app):
    import gc

    app, _ = make_app(gc_freeze=True)

    async def main():
        await app.pipeline.start_batcher()
        frozen = gc.get_freeze_count()
        await app.pipeline.stop_batcher()
        return frozen

    assert asyncio.run(main()) > 0 and gc.get_freeze_count() == 0  # frozen while serving, released at stop


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample's value in Prometheus exposition text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_metrics_count_events_in_predictions_out_and_rejects_exactly(make_app):
    """What /metrics shows (monitoring.render): every message read adds 1 to events_in, every published
    prediction 1 to predictions_out of its model version, every dead letter 1 to its reason."""
    app, rec = make_app()
    t = int(time.time() * 1000) - 5_000
    msgs = [(b"u1", ev(item=f"i{n}", ts=t + n)) for n in range(3)]
    msgs += [(b"u2", ev(user="u2", ts=t)), (b"u1", b"{broken"), (b"u2", ev(user="u2", action="teleport", ts=t + 1))]
    before = monitoring.render()[0].decode()
    asyncio.run(put_all(app, msgs))
    body, ctype = monitoring.render()
    after = body.decode()
    assert ctype.startswith("text/plain")

    def delta(name, **labels):
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("nextaction_events_in_total") == 6
    assert delta("nextaction_predictions_out_total", model_version="baseline-markov-1") == 4
    assert delta("nextaction_events_rejected_total", reason="not_json") == 1
    assert delta("nextaction_events_rejected_total", reason="bad_action") == 1
    assert delta("nextaction_outcomes_out_total") == 2  # u1's 2nd and 3rd events
    assert len(rec.of("predictions")) == 4 and len(rec.of("dlq")) == 2


# --- model-updates: hot swap through the pipeline's handler -----------------------------------------------------

async def _updates_then_events(app, updates, events):
    """Each update through the handler the per-worker listener calls (stream_app.updates), then events."""
    out = [await app.pipeline.handle_model_update("full", value) for value in updates]
    async with app.pipeline.agent.test_context() as agent:
        for key, value in events:
            await agent.put(value, key=key)
            await app.pipeline.batcher.drain()
    return out


@pytest.mark.slow  # the checkpoint is served from an inference process (serve_process)
def test_model_update_swaps_between_batches_and_bad_updates_keep_the_old_model(make_app, make_checkpoint, tmp_path):
    from models.checkpoint import read_manifest

    v1, v2 = make_checkpoint(0, items=30), make_checkpoint(1, items=30)
    sha2 = read_manifest(v2)["content_hash"]
    app, rec = make_app(checkpoint=v1, device="cpu", serve_threads=1)
    start_version = None

    async def main():
        nonlocal start_version
        await app.pipeline.start_batcher()
        start_version = app.pipeline.batcher.predictor.version
        t = int(time.time() * 1000) - 10_000
        await _updates_then_events(app, [], [(b"u1", ev(item="i1", ts=t))])
        updates = [
            b"not json",  # malformed
            orjson.dumps({"version": "v9", "path": str(v1.parent / "missing"), "sha256": "0" * 64}),  # missing
            orjson.dumps({"version": "v2", "path": str(v2), "sha256": "0" * 64}),  # announced hash is wrong
            orjson.dumps({"version": "v2", "path": str(v2), "sha256": sha2}),  # good
            orjson.dumps({"version": "v2", "path": str(v2), "sha256": sha2}),  # redelivery: skipped
        ]
        res = await _updates_then_events(app, updates, [(b"u1", ev(item="i2", ts=t + 1000))])
        await app.pipeline.stop_batcher()
        return res

    res = asyncio.run(main())
    assert start_version == read_manifest(v1)["content_hash"][:12]  # the worker loaded the checkpoint at start
    assert res[0] == "rejected:bad_record" and res[1] == "rejected:CheckpointError"
    assert res[2] == "rejected:CheckpointError"
    assert res[3] == f"swapped:{sha2[:12]}" and res[4] == "skipped"
    versions = [p["model_version"] for p in rec.of("predictions")]
    assert versions == [start_version, sha2[:12]]


def test_model_updates_without_a_hash_or_outside_the_roots_are_rejected_counted_and_logged(make_app, tmp_path,
                                                                                             caplog):
    """Nothing is read from such a path: the record is refused before any load (stream_app.updates.admit)."""
    app, _ = make_app(models_dir=tmp_path / "models")
    outside = tmp_path / "elsewhere" / "v1"
    records = [orjson.dumps({"version": "v", "path": str(tmp_path / "models" / "v1")}),
               orjson.dumps({"version": "v", "path": str(outside), "sha256": "ab" * 32})]

    async def main():
        await app.pipeline.start_batcher()
        try:
            return [await app.pipeline.handle_model_update("full", r) for r in records]
        finally:
            await app.pipeline.stop_batcher()

    before = _metric(monitoring.render()[0].decode(), "nextaction_model_updates_total", result="rejected")
    with caplog.at_level("ERROR", logger="stream_app.pipeline"):
        assert asyncio.run(main()) == ["rejected:no_sha256", "rejected:path_not_allowed"]
    after = _metric(monitoring.render()[0].decode(), "nextaction_model_updates_total", result="rejected")
    assert after - before == 2
    text = caplog.text
    assert "rejected (no_sha256)" in text and "rejected (path_not_allowed)" in text and str(outside) in text
    assert app.pipeline.batcher is None or app.pipeline.batcher.predictor.version.startswith("baseline")


@pytest.mark.slow  # starts an inference process, which falls back
def test_bad_checkpoint_at_start_falls_back_to_the_baseline(make_app, tmp_path):
    app, rec = make_app(checkpoint=tmp_path / "nope", device="cpu")
    results, _ = asyncio.run(put_all(app, [(b"u1", ev(item="a"))]))
    assert list(results.values()) == ["queued"]
    assert rec.of("predictions")[0]["model_version"].startswith("baseline")


def test_worker_sets_the_configured_gil_switch_interval(make_app):
    before = sys.getswitchinterval()
    app, _ = make_app(gil_switch_interval_ms=0.5)

    async def main():
        await app.pipeline.start_batcher()
        seen = sys.getswitchinterval()
        await app.pipeline.stop_batcher()
        return seen

    try:
        assert asyncio.run(main()) == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


# --- model-updates: online deltas through the pipeline's handler ----------------------------------------------

def test_deltas_are_applied_in_order_and_label_predictions_base_plus_seq(make_app, make_checkpoint):
    """A delta that follows the served weights is applied between batches (predictions say ``base+seq``);
    one whose predecessor never came is a ``gap`` (the listener replays the lineage); one of another
    lineage or already applied is ``ignored``; bytes that are no delta, or a delta that does not fit
    the model, are ``rejected`` and the served weights stay as they were."""
    import numpy as np
    import torch

    from models.checkpoint import load_checkpoint
    from models.delta import add_items, make_delta

    path = make_checkpoint(0, items=30)
    ck = load_checkpoint(path)
    base = ck.version
    new = add_items(ck.model, ck.vocab, ["fresh-item"])  # the trainer's copy learns a new item and a row
    with torch.no_grad():
        ck.model.item_bias[new] = 50.0  # so large that the new item tops every prediction
    d1 = make_delta(ck.model, ck.vocab, base, seq=1, prev=0, item_rows=new)
    d2 = make_delta(ck.model, ck.vocab, base, seq=2, prev=1, item_rows=[ck.vocab.index("i3")])
    d4 = make_delta(ck.model, ck.vocab, base, seq=4, prev=3, item_rows=[ck.vocab.index("i4")])
    other = make_delta(ck.model, ck.vocab, "ffffffffffff", seq=1, prev=0, item_rows=[ck.vocab.index("i4")])
    misfit = make_delta(ck.model, ck.vocab, base, seq=3, prev=2, item_rows=[ck.vocab.index("i5")])
    misfit.item_emb = np.zeros((1, misfit.item_emb.shape[1] + 1), np.float32)  # a model of another width
    app, rec = make_app(checkpoint=path, device="cpu", serve_process=False)

    async def main():
        out = []
        await app.pipeline.start_batcher()
        t = int(time.time() * 1000) - 10_000
        async with app.pipeline.agent.test_context() as agent:
            await agent.put(ev(item="i1", ts=t), key=b"u1")
            await app.pipeline.batcher.drain()
            for n, d in enumerate([d2, d1, d1, other, d2, b"not a delta", misfit, d4], start=1):
                out.append(await app.pipeline.handle_model_update("delta", d if isinstance(d, bytes) else d.encode()))
                await agent.put(ev(item="i2", ts=t + n * 1000), key=b"u1")
                await app.pipeline.batcher.drain()
        await app.pipeline.stop_batcher()
        return out

    out = asyncio.run(main())
    assert out == ["gap", f"delta:{base}+1", "ignored", "ignored", f"delta:{base}+2", "rejected:bad_delta",
                   "rejected:ValueError", "gap"]
    versions = [p["model_version"] for p in rec.of("predictions")]
    assert versions == [base, base, f"{base}+1", f"{base}+1", f"{base}+1", f"{base}+2", f"{base}+2", f"{base}+2",
                        f"{base}+2"]
    tops = [p["top_items"][0][0] for p in rec.of("predictions")]
    assert "fresh-item" not in tops[:2] and all(t == "fresh-item" for t in tops[2:])  # new item predictable at once


def _changelog_checker(sizes: dict, failures: list):
    """A Pipeline with just what ``_wait_for_changelogs`` reads: a producer whose ``partitions_for``
    raises the queued ``failures`` first, then answers ``sizes``."""
    from types import SimpleNamespace

    from stream_app.pipeline import Pipeline

    class Producer:
        async def partitions_for(self, topic):
            if failures:
                raise failures.pop(0)
            return set(range(sizes.get(topic, 4)))

    def table(name):
        return SimpleNamespace(name=name, changelog_topic_name=f"{name}-changelog",
                               _verified_source_topics_for_partitions=set())

    crashes = []

    async def crash(exc):
        crashes.append(exc)

    p = Pipeline.__new__(Pipeline)
    p.app = SimpleNamespace(consumer=SimpleNamespace(topic_partitions=lambda t: {0}),
                            producer=SimpleNamespace(_ensure_producer=Producer), crash=crash, crashes=crashes)
    p.t = SimpleNamespace(histories=table("histories"), repartition=None)
    p.topics = {"predictions": "predictions", "outcomes": "outcomes", "dlq": "dlq"}
    p._verified_topics = set()
    p._partition_counts = {}
    return p


def test_changelog_check_retries_broker_timeouts_and_still_raises_a_real_mismatch(monkeypatch, caplog):
    from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError
    from faust.exceptions import PartitionsMismatch

    from stream_app import pipeline

    monkeypatch.setattr(pipeline, "METADATA_BACKOFF_S", 0.01)
    before = monitoring.METADATA_RETRIES._value.get()
    p = _changelog_checker({}, [asyncio.TimeoutError(), KafkaTimeoutError(), UnknownTopicOrPartitionError()])
    asyncio.run(p._wait_for_changelogs("events"))  # three failures, then the answer: no exception
    assert p._verified_topics == {"events"}
    assert p.t.histories._verified_source_topics_for_partitions == {"events"}
    assert monitoring.METADATA_RETRIES._value.get() - before == 3
    assert caplog.text.count("retrying in") == 3
    assert p.app.crashes == []
    mismatched = _changelog_checker({"histories-changelog": 2}, [])
    with pytest.raises(PartitionsMismatch, match="histories"):
        asyncio.run(mismatched._wait_for_changelogs("events"))
    assert len(mismatched.app.crashes) == 1  # the worker, not only the agent (its supervisor would restart it)
    assert "Crashing the worker" in caplog.text


# --- one user, one partition: re-routing events that arrived on the wrong partition ------------------------------
class Forwards:
    """Stands in for the producer's send of a forward: records it; its delivery resolves when told to."""

    def __init__(self, fail: bool = False):
        self.sent, self.fail = [], fail

    async def __call__(self, topic, key, value, partition, timestamp, headers):
        fut = asyncio.get_running_loop().create_future()
        self.sent.append({"topic": topic, "key": key, "value": value, "partition": partition, "headers": headers,
                          "fut": fut})
        return fut

    def resolve(self):
        for f in self.sent:
            if not f["fut"].done():
                f["fut"].set_exception(RuntimeError("broker gone")) if self.fail else f["fut"].set_result(None)


async def _reroute_round_trip(app, forwards, messages):
    """``messages`` ((partition, key, value)) through the events agent; then each forward through the
    repartition agent, as the broker would deliver it; returns (results, forwarded results, acked before the
    forwards were confirmed, acked after)."""
    app.pipeline.forward = forwards
    async with app.pipeline.agent.test_context() as agent:
        events = [await agent.put(value, key=key, partition=p) for p, key, value in messages]
        await app.pipeline.batcher.drain()
        results = dict(agent.results)
        acked_before = [e.message.acked for e in events]
        forwards.resolve()
        await asyncio.gather(*list(app.pipeline._forwards))
        acked_after = [e.message.acked for e in events]
    async with app.pipeline.rerouted_agent.test_context() as agent:
        for f in forwards.sent if not forwards.fail else ():
            agent.sent_offset = 100  # the repartition topic's own offsets are nobody's business downstream
            await agent.put(f["value"], key=f["key"], partition=f["partition"], headers=f["headers"])
        await app.pipeline.batcher.drain()
        rerouted_results = dict(agent.results)
    return results, rerouted_results, acked_before, acked_after


def test_an_event_on_the_wrong_partition_is_forwarded_to_its_owner_and_keeps_its_origin(make_app):
    # by the Java/murmur2 rule (stream_app.partitioning), u1 belongs to partition 0 and u2 to 2 of 4
    app, rec = make_app(partitions=4)
    t = int(time.time() * 1000) - 10_000
    before_in, before_rerouted = monitoring.EVENTS_IN._value.get(), monitoring.EVENTS_REROUTED._value.get()
    msgs = [(0, b"u1", ev(item="a", ts=t)), (0, b"u2", ev(user="u2", item="b", ts=t + 1)),
            (2, b"u2", ev(user="u2", item="c", ts=t - 1)), (1, b"u2", ev(user="u2", item="d", ts=t + 3, action="x"))]
    forwards = Forwards()
    results, rerouted, acked_before, acked_after = asyncio.run(_reroute_round_trip(app, forwards, msgs))
    assert results == {0: "queued", 1: "rerouted", 2: "queued", 3: "rejected:bad_action"}  # bad ones: no hop
    assert acked_before == [True, False, True, True] and acked_after == [True] * 4  # acked once the broker has it
    (f,) = forwards.sent
    assert (f["topic"], f["key"], f["value"], f["partition"]) == (app.topology.settings.topic_repartition, b"u2",
                                                                  msgs[1][2], 2)
    assert rerouted == {0: "queued"}
    preds = {p["event_ts"]: p for p in rec.of("predictions")}
    assert (preds[t + 1]["partition"], preds[t + 1]["offset"]) == (0, 1)  # where it first arrived, not 2@100
    assert preds[t + 1]["history_len"] == 2  # joined u2's one history, after c (earlier in event time)
    assert monitoring.EVENTS_IN._value.get() - before_in == 4  # counted once, at first arrival
    assert monitoring.EVENTS_REROUTED._value.get() - before_rerouted == 1
    state = decode_state(app.topology.histories.get("u2"))
    assert state.history.items == ["c", "b"] and state.last.offset == 1


def test_a_forward_the_broker_never_confirmed_stays_unacked_and_crashes_the_worker(make_app):
    app, rec = make_app(partitions=4)
    crashed = []

    async def crash(exc):
        crashed.append(exc)

    app.crash = crash
    t = int(time.time() * 1000) - 10_000
    results, _, _, acked_after = asyncio.run(_reroute_round_trip(app, Forwards(fail=True),
                                                                 [(1, b"u1", ev(item="a", ts=t))]))
    assert results == {0: "rerouted"} and acked_after == [False]  # read again after the restart
    assert [str(e) for e in crashed] == ["broker gone"] and rec.of("predictions") == []


def test_a_rerouted_events_dead_letter_names_where_it_first_arrived(make_app):
    app, rec = make_app(partitions=4, predictor_factory=lambda s: Exploding())
    t = int(time.time() * 1000) - 10_000
    asyncio.run(_reroute_round_trip(app, Forwards(), [(3, b"u2", ev(user="u2", ts=t))]))
    (d,) = rec.of("dlq")
    assert d["reason"] == "predict_failed" and d["source"] == {"topic": "events", "partition": 3, "offset": 0}


def test_rerouting_can_be_turned_off(make_app):
    app, rec = make_app(partitions=4, reroute_mispartitioned=False)
    assert app.topology.repartition is None and app.pipeline.rerouted_agent is None
    t = int(time.time() * 1000) - 10_000

    async def main():
        async with app.pipeline.agent.test_context() as agent:
            await agent.put(ev(user="u2", ts=t), key=b"u2", partition=0)
            await app.pipeline.batcher.drain()
            return dict(agent.results)

    assert asyncio.run(main()) == {0: "queued"} and rec.of("predictions")[0]["partition"] == 0


@pytest.mark.slow  # loads the sentence model
def test_an_events_item_text_reaches_the_model_and_its_new_item_is_recommended_at_once(make_app, text_checkpoint):
    """Cold-start items (docs/cold-start.md): the worker's Transformer has a text projection; the first
    event of an item it does not know carries the item's text, and that event's own prediction ranks
    it (the projection gives text items a +50 bias). The same new item without text is not ranked.
    The worker's metrics count the text row."""
    app, rec = make_app(checkpoint=text_checkpoint, device="cpu", serve_threads=1, serve_process=False)
    added = monitoring.REGISTRY.get_sample_value("nextaction_text_rows_total", {"result": "added"}) or 0.0
    t = int(time.time() * 1000) - 60_000
    msgs = [(b"u1", ev(item="i0", ts=t)),
            (b"u1", ev(item="new-1", ts=t + 1000, item_text="Wallace & Gromit: The Wrong Trousers (1993)")),
            (b"u2", ev(user="u2", item="new-2", ts=t + 2000))]  # a new item without text
    asyncio.run(put_all(app, msgs))
    preds = rec.of("predictions")
    assert [p["user_id"] for p in preds] == ["u1", "u1", "u2"]
    assert "new-1" not in {i for i, _ in preds[0]["top_items"]}
    assert preds[1]["top_items"][0][0] == "new-1"  # the event that introduced it
    assert preds[2]["top_items"][0][0] == "new-1" and "new-2" not in {i for i, _ in preds[2]["top_items"]}
    assert monitoring.REGISTRY.get_sample_value("nextaction_text_rows_total", {"result": "added"}) == added + 1
    # the outcome of the event that carried the text carries it on to the trainer (its new-item row)
    [out] = rec.of("outcomes")
    assert out["happened"]["item_id"] == "new-1"
    assert out["happened"]["item_text"] == "Wallace & Gromit: The Wrong Trousers (1993)"
