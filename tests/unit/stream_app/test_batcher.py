"""The micro-batcher: routing, max_wait, backpressure, failure isolation, hot swap."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time

import pytest

from models.predictor import Prediction, Predictor
from models.schema import EventSeq
from online.baseline import PopularityMarkovPredictor
from stream_app import monitoring
from stream_app.batcher import Batcher, Request, check_prediction
from models.errors import PredictorError


class EchoPredictor(Predictor):
    """Deterministic: echoes the history's last item and length, so results can be routed back."""

    learns = True

    def __init__(self, version="echo-1", delay=0.0, fail_items=(), fail_batches_larger_than=None, nan_items=()):
        self.version, self.delay = version, delay
        self.fail_items, self.nan_items, self.fail_larger = set(fail_items), set(nan_items), fail_batches_larger_than
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.observed = 0

    def predict(self, histories, k, users=None):
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(histories))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_larger is not None and len(histories) > self.fail_larger:
            raise RuntimeError(f"batch of {len(histories)} is too large")
        if any(h.items[-1] in self.fail_items for h in histories):
            raise RuntimeError("poison item")
        out = []
        for h in histories:
            probs = [float("nan")] * 5 if h.items[-1] in self.nan_items else [1, 1, 1, 1, 1]
            out.append(Prediction(probs, [(h.items[-1], float(len(h)))], 1.0))
        return out

    def observe(self, history):
        self.observed += 1


def hist(user, n):
    return EventSeq.from_columns([f"{user}:{i}" for i in range(n)], ["view"] * n, list(range(n)))


async def run_batcher(predictor, requests, *, max_batch=16, max_wait_ms=2.0, max_queue=64, between=None):
    delivered = []

    async def deliver(results):
        delivered.append(list(results))

    b = Batcher(predictor, deliver, k=5, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    await b.start()
    for n, r in enumerate(requests):
        await b.submit(r)
        if between is not None:
            await between(n, b)
    await b.stop()
    return delivered, b


def test_routes_many_interleaved_users_in_order():
    rng = random.Random(0)
    counts = {f"u{u}": 0 for u in range(50)}
    reqs = []
    for _ in range(2000):
        u = rng.choice(list(counts))
        counts[u] += 1
        reqs.append(Request(u, hist(u, counts[u]), counts[u]))
    p = EchoPredictor()
    batches, b = asyncio.run(run_batcher(p, reqs, max_batch=32))
    results = [r for batch in batches for r in batch]
    assert [r.request for r in results] == reqs  # submission order, nothing lost or duplicated
    seen = {u: 0 for u in counts}
    for r in results:
        u = r.request.user_id
        item, score = r.prediction.top_items[0]
        assert item == f"{u}:{r.request.event_ts - 1}" and score == r.request.event_ts  # routed to its own user
        assert r.request.event_ts == seen[u] + 1  # per-user event order
        seen[u] += 1
        assert math.isclose(sum(r.prediction.action_probs), 1.0)
    assert max(p.batches) <= 32 and len(p.batches) < len(reqs)  # it did batch
    assert p.threads and all(t.startswith("nextaction-infer") for t in p.threads)  # not the event loop
    assert p.observed == 2000 and b.stats["requests"] == 2000


def test_max_wait_is_honoured_under_a_trickle():
    p = EchoPredictor()
    lat = []

    async def deliver(results):
        now = time.monotonic()
        lat.extend(now - r.request.enqueued for r in results)

    async def main():
        b = Batcher(p, deliver, k=5, max_batch=256, max_wait_ms=20, max_queue=64)
        await b.start()
        for n in range(8):
            await b.submit(Request("u", hist("u", 1), n))
            await asyncio.sleep(0.06)  # a trickle: one request per 60 ms, far below max_batch
        await b.stop()

    asyncio.run(main())
    assert p.batches == [1] * 8  # never waited for a full batch
    assert all(0.015 <= x < 0.06 for x in lat), lat  # held ~max_wait (20 ms), not until the next arrival


def test_bounded_queue_applies_backpressure():
    p = EchoPredictor(delay=0.05)
    depth = []

    async def between(n, b):
        depth.append(b.pending)

    t0 = time.monotonic()
    batches, _ = asyncio.run(run_batcher(p, [Request("u", hist("u", 1), n) for n in range(40)], max_batch=4,
                                         max_wait_ms=0, max_queue=4, between=between))
    elapsed = time.monotonic() - t0
    assert sum(len(b) for b in batches) == 40
    # queue (4) + one batch in the executor (4) + one in the hand-off (2 x 4) + deliverer: bounded
    assert max(depth) <= 4 + 4 + 2 * 4 + 4 + 1
    assert elapsed >= 40 / 4 * 0.05 * 0.9  # submit really waited for inference


def test_failing_batch_is_bisected_and_only_poison_events_fail():
    reqs = [Request(f"u{i}", hist(f"u{i}", 1), i) for i in range(20)]
    p = EchoPredictor(fail_items={"u7:0", "u13:0"}, nan_items={"u3:0"})
    batches, b = asyncio.run(run_batcher(p, reqs, max_batch=20, max_wait_ms=50))
    results = [r for batch in batches for r in batch]
    assert [r.request for r in results] == reqs
    failed = {r.request.user_id: r.error for r in results if r.prediction is None}
    assert set(failed) == {"u3", "u7", "u13"}
    assert "poison item" in failed["u7"] and "action_probs" in failed["u3"]
    assert all(r.prediction is not None for r in results if r.request.user_id not in failed)
    assert b.stats["failed"] == 3


class AsyncEcho(EchoPredictor):
    """The inference-process shape: ``predict_async`` awaited on the event loop, no executor thread."""

    runs_elsewhere = True

    async def predict_async(self, histories, k, users=None):
        await asyncio.sleep(0.001)
        return self.predict(histories, k)


def test_an_async_predictor_runs_on_the_loop_and_is_bisected_alike():
    pred = AsyncEcho(fail_items={"u3:2"})
    reqs = [Request(f"u{i % 5}", hist(f"u{i % 5}", i // 5 + 1), i, 0.0) for i in range(25)]
    delivered, b = asyncio.run(run_batcher(pred, reqs, max_batch=25, max_wait_ms=20))
    results = [r for batch in delivered for r in batch]
    assert pred.threads == {"MainThread"}  # never the inference thread
    failed = [r for r in results if r.prediction is None]
    assert [r.request.history.items[-1] for r in failed] == ["u3:2"] and "poison item" in failed[0].error
    assert len(results) == 25 and pred.observed == 25  # every history observed after the batch, as in the thread


def test_transient_large_batch_failure_is_retried_smaller():
    reqs = [Request(f"u{i}", hist(f"u{i}", 1), i) for i in range(16)]
    p = EchoPredictor(fail_batches_larger_than=4)  # e.g. out of memory at large batches
    batches, b = asyncio.run(run_batcher(p, reqs, max_batch=16, max_wait_ms=50))
    assert all(r.prediction is not None for batch in batches for r in batch)
    assert b.stats["predict_errors"] >= 1


def test_hot_swap_gives_every_prediction_exactly_one_version():
    versions = [EchoPredictor(f"v{n}", delay=0.001) for n in range(5)]

    async def between(n, b):
        if n % 150 == 149 and n < 700:
            b.swap(versions[(n + 1) // 150])
        if n % 7 == 0:
            await asyncio.sleep(0)

    reqs = [Request(f"u{n % 13}", hist(f"u{n % 13}", 1 + n // 13), n) for n in range(750)]
    batches, b = asyncio.run(run_batcher(versions[0], reqs, max_batch=8, max_wait_ms=1, between=between))
    seq = [r.version for batch in batches for r in batch]
    assert len(seq) == 750 and all(r.prediction for batch in batches for r in batch)
    for batch in batches:
        assert len({r.version for r in batch}) == 1  # a batch is served by one predictor
    order = [int(v[1:]) for v in seq]
    assert order == sorted(order) and set(order) == {0, 1, 2, 3, 4}  # swaps take effect in order, never back
    for n, p in enumerate(versions):  # each predictor predicted exactly the requests stamped with it
        assert sum(p.batches) >= seq.count(f"v{n}")
    assert b.stats["swaps"] == 4
    with pytest.raises(TypeError, match="not a models.predictor.Predictor"):
        b.swap(object())


def test_delivery_failure_stops_batcher_and_fails_submit():
    async def main():
        async def deliver(results):
            raise OSError("broker gone")

        b = Batcher(EchoPredictor(), deliver, k=5, max_batch=4, max_wait_ms=0, max_queue=4)
        await b.start()
        await b.submit(Request("u", hist("u", 1), 0))
        with pytest.raises(OSError, match="broker gone"):
            await b.wait_closed()
        with pytest.raises(PredictorError, match="broker gone"):
            await b.submit(Request("u", hist("u", 1), 1))
        await b.stop(drain=False)

    asyncio.run(main())


def test_real_baseline_through_batcher():
    reqs = []
    for n in range(200):
        items = ["a", "b"] * (n % 5 + 1)
        reqs.append(Request(f"u{n}", EventSeq.from_columns(items, ["view"] * len(items),
                                                          [i * 1000 for i in range(len(items))]), n))
    reqs.append(Request("new", EventSeq.from_columns(["a"], ["view"], [0]), 0))
    batches, _ = asyncio.run(run_batcher(PopularityMarkovPredictor(), reqs, max_batch=64, max_wait_ms=20))
    last = batches[-1][-1].prediction  # after learning a -> b from the others, "b" leads after "a"
    assert last.top_items[0][0] == "b" and math.isclose(sum(last.action_probs), 1.0)


def test_observe_follows_predict_and_is_skipped_for_a_predictor_that_does_not_learn():
    reqs = [Request(f"u{n}", hist(f"u{n}", 3), n, observe=(n != 2)) for n in range(6)]
    learner = EchoPredictor()
    asyncio.run(run_batcher(learner, reqs))
    assert learner.observed == 5  # every request but the redelivery (observe=False)
    fixed = EchoPredictor()
    fixed.learns = False
    batches, _ = asyncio.run(run_batcher(fixed, reqs))
    assert fixed.observed == 0 and sum(len(b) for b in batches) == 6


def test_every_request_is_timed_in_each_stage():
    from stream_app import monitoring

    def count(stage):
        get = monitoring.REGISTRY.get_sample_value
        return (get("nextaction_stage_latency_seconds_sum", {"stage": stage}) or 0.0,
                get("nextaction_stage_latency_seconds_count", {"stage": stage}) or 0.0)

    before = {st: count(st) for st in ("queue", "infer", "deliver")}
    reqs = [Request(f"u{n}", hist(f"u{n}", 2), n) for n in range(7)]
    asyncio.run(run_batcher(EchoPredictor(delay=0.01), reqs, max_batch=3))
    for st, (s0, n0) in before.items():
        s1, n1 = count(st)
        assert n1 - n0 == 7, st  # one observation per request
        assert s1 > s0 or st == "deliver", st
    assert count("infer")[0] - before["infer"][0] >= 7 * 0.01  # each request waited for its batch's 10 ms


def test_check_prediction_rejects_malformed_output():
    with pytest.raises(PredictorError, match="5 entries"):
        check_prediction(Prediction([1.0], [], 1.0), 3)
    with pytest.raises(PredictorError, match="next_gap_s"):
        check_prediction(Prediction([1, 0, 0, 0, 0], [], -2.0), 3)
    with pytest.raises(PredictorError, match="not finite"):
        check_prediction(Prediction([1, 0, 0, 0, 0], [("x", float("inf"))], 1.0), 3)
    assert len(check_prediction(Prediction([1, 0, 0, 0, 0], [(str(i), 1.0) for i in range(9)], 1.0), 3).top_items) == 3


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(EchoPredictor(), None, k=1, max_batch=0, max_wait_ms=1, max_queue=1)


# --- the Transformer behind the batcher: users=, hot swap between real checkpoints ------------------

@pytest.fixture(scope="module")
def tiny_checkpoints(make_checkpoint):
    """Two real, hash-verified checkpoints of seeded small NextActionModels over items i0..i29."""
    return make_checkpoint(0, items=30), make_checkpoint(1, items=30)


def _item_hist(user, n):
    return EventSeq.from_columns([f"i{(hash(user) + i) % 30}" for i in range(n)], ["view"] * n,
                                 [1_700_000_000_000 + 60_000 * i for i in range(n)])


def test_transformer_gets_users_and_hot_swap_under_load_switches_at_a_batch_boundary(tiny_checkpoints):
    from models.serving import TransformerPredictor

    v1 = TransformerPredictor.from_checkpoint(tiny_checkpoints[0], device="cpu", num_threads=1)
    v2 = v1.successor(tiny_checkpoints[1])
    assert v1.version != v2.version
    seen_users = []

    def spy(pred):  # records the users passed, and signs each prediction with the model that made it
        predict = pred.predict

        def call(histories, k, users=None):
            seen_users.append(users)
            out = predict(histories, k, users=users)
            for p in out:
                p.explanation = pred.version
            return out
        pred.predict = call

    spy(v1)
    spy(v2)
    delivered = []

    async def deliver(results):
        delivered.append([(r.request.user_id, r.request.event_ts, r.version, r.prediction.explanation)
                          for r in results])

    async def main():
        b = Batcher(v1, deliver, k=5, max_batch=16, max_wait_ms=1, max_queue=64)
        await b.start()
        counts: dict[str, int] = {}
        n_total, swap_at = 600, 300
        for n in range(n_total):  # under load: the swap lands while batches are queued and in flight
            u = f"u{n % 37}"
            counts[u] = counts.get(u, 0) + 1
            await b.submit(Request(u, _item_hist(u, min(counts[u], 8)), n))
            if n == swap_at:
                b.swap(v2)
        await b.stop()
        return b

    b = asyncio.run(main())
    assert seen_users and all(us is not None and len(us) >= 1 for us in seen_users)  # users= passed
    flat = [x for batch in delivered for x in batch]
    assert [x[1] for x in flat] == list(range(600))  # nothing lost, duplicated or reordered
    for batch in delivered:
        assert len({x[2] for x in batch}) == 1  # one version per batch ...
        assert all(x[2] == x[3] for x in batch)  # ... and it is the version that made the prediction
    versions = [batch[0][2] for batch in delivered]
    first_v2 = versions.index(v2.version)
    assert set(versions[:first_v2]) == {v1.version} and set(versions[first_v2:]) == {v2.version}  # one switch
    assert 0 < first_v2 and flat[sum(len(x) for x in delivered[:first_v2])][1] <= 300 + 64 + 16
    assert b.stats["swaps"] == 1


@pytest.mark.slow  # loads the sentence model
def test_a_batchs_item_texts_reach_the_predictor_and_each_bisected_half_gets_its_own(text_checkpoint):
    """Cold-start items (docs/cold-start.md): the texts of a batch's events go to ``predict(texts=)``
    of a real TransformerPredictor whose checkpoint has a text projection, which ranks the new items
    in the predictions of the very events that introduced them; a batch without text is predicted
    without ``texts``; a failing batch is split and each half carries only its requests' texts."""
    from models.serving import TransformerPredictor

    p = TransformerPredictor.from_checkpoint(text_checkpoint, device="cpu", num_threads=1)
    calls = []
    real = p.predict

    def spy(histories, k, users=None, *args, **kw):
        calls.append((list(users), *args, *kw.values()))
        if len(histories) > 2:  # the first, whole batch fails: bisected
            raise RuntimeError("too large")
        return real(histories, k, users, *args, **kw)

    p.predict = spy

    def h(*items):
        return EventSeq.from_columns(list(items), ["view"] * len(items), [1000 * i for i in range(len(items))])

    reqs = [Request("u1", h("i0", "new-a"), 1, item_text=("new-a", "A film about a dog")),
            Request("u2", h("i1", "i2"), 1),
            Request("u3", h("i3", "new-b"), 1, item_text=("new-b", "A cooking show")),
            Request("u4", h("i4", "i5"), 1)]
    added = monitoring.REGISTRY.get_sample_value("nextaction_text_rows_total", {"result": "added"}) or 0.0
    batches, b = asyncio.run(run_batcher(p, reqs, max_batch=4, max_wait_ms=200))
    results = {r.request.user_id: r for batch in batches for r in batch}
    assert monitoring.REGISTRY.get_sample_value("nextaction_text_rows_total", {"result": "added"}) == added + 2
    assert calls[0] == (["u1", "u2", "u3", "u4"], {"new-a": "A film about a dog", "new-b": "A cooking show"})
    assert calls[1:] == [(["u1", "u2"], {"new-a": "A film about a dog"}), (["u3", "u4"], {"new-b": "A cooking show"})]
    assert results["u1"].prediction.top_items[0][0] == "new-a"  # ranked in the prediction of its own event
    assert results["u3"].prediction.top_items[0][0] in ("new-a", "new-b")
    assert {"new-a", "new-b"} <= set(p.vocab.items)
    calls.clear()
    asyncio.run(run_batcher(p, [Request("u5", h("i6"), 1)], max_batch=4, max_wait_ms=1))
    assert calls == [(["u5"],)]  # no text in the batch: predict called as before
