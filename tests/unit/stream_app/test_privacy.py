"""Privacy in the pipeline (stream_app.pipeline.Pipeline.forget / sweep, docs/privacy.md), through
the Faust agent in ``agent.test_context()`` with real RocksDB tables: a forget control record on
``events`` deletes the user from ``histories`` (window, prediction, activity counts), the pending state and the predictor's
per-user state, sends a forget marker to the trainer, and is never dead-lettered or predicted."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from online.baseline import PopularityMarkovPredictor
from stream_app import monitoring
from stream_app.records import (CONTROL_HEADER, IDLE, ForgetRequest, UserState, decode_state, encode_state,
                                forget_user_of, last_seen)
from models.schema import EventSeq

FORGET_HEADERS = [(CONTROL_HEADER, b"forget")]
HOUR_MS = 3_600_000


def ev(user="u1", item="i1", action="view", ts=None):
    ts = ts if ts is not None else int(time.time() * 1000)
    return orjson.dumps({"user_id": user, "item_id": item, "action": action, "ts": ts})


def forget(user="u1", request: ForgetRequest | None = None):
    return (user.encode(), (request or ForgetRequest()).encode(), FORGET_HEADERS)


class Forgetful(PopularityMarkovPredictor):
    """The baseline, recording ``forget_users`` calls (a Transformer drops its KV cache entries there)."""

    def __init__(self):
        super().__init__()
        self.forgotten: list[str] = []

    def forget_users(self, users):
        self.forgotten.extend(users)
        return len(users)


async def run(app, messages, one_at_a_time=True):
    """Put ``(key, value[, headers])`` messages through the agent; the results by offset."""
    async with app.pipeline.agent.test_context() as agent:
        for key, value, *headers in messages:
            await agent.put(value, key=key, headers=headers[0] if headers else None)
            if one_at_a_time:
                await app.pipeline.batcher.drain()
        await app.pipeline.batcher.drain()
        assert app.pipeline.pending == {}
        return list(agent.results.values())


def stored_users(app):
    """The users in partition 0's ``histories`` store (``table.keys()`` lists only assigned partitions:
    none in ``test_context``)."""
    return sorted(k.decode() for k in app.topology.histories.data._db_for_partition(0).keys())


def spy_changelog(table):
    """Record every (key, value) ``table`` sends to its changelog (a tombstone: value None)."""
    sent, original = [], table.send_changelog

    def send_changelog(partition, key, value, *args, **kwargs):
        sent.append((key, value))
        return original(partition, key, value, *args, **kwargs)

    table.send_changelog = send_changelog
    return sent


def test_forget_deletes_the_users_state_and_later_events_start_afresh(make_app):
    pred = Forgetful()
    app, rec = make_app(predictor_factory=lambda s: pred)
    histories = spy_changelog(app.topology.histories)
    t = int(time.time() * 1000) - 10 * HOUR_MS
    before = monitoring.FORGETS.labels("request", "forgotten")._value.get()
    msgs = [(b"u1", ev(ts=t + n * HOUR_MS, item=f"i{n}")) for n in range(4)]  # 4 activity windows
    msgs += [(b"u2", ev(user="u2", ts=t)), forget("u1"), (b"u1", ev(ts=t + 5 * HOUR_MS, item="late"))]
    results = asyncio.run(run(app, msgs))
    assert results[5] == "forget:forgotten"
    preds = rec.of("predictions")
    assert len(preds) == 6 and [p["history_len"] for p in preds if p["user_id"] == "u1"] == [1, 2, 3, 4, 1]
    assert preds[-1]["activity"] == 1  # the activity count started afresh too
    assert rec.of("dlq") == []  # the control record is not an event
    outs = rec.of("outcomes")
    assert [forget_user_of(o) for o in outs] == [None, None, None, "u1"]  # the marker; no outcome after it
    state = decode_state(app.topology.histories.get("u1"))
    assert state.history.items == ["late"] and state.seen is not None
    assert list(state.activity.values()) == [1]  # the 4 windows counted before the forget are gone with it
    assert stored_users(app) == ["u1", "u2"]
    assert pred.forgotten == ["u1"]
    # one tombstone (the state: window, prediction and activity in one record), then the new event's write
    assert [v for k, v in histories if k == "u1"][-2:] == [None, histories[-1][1]] and histories[-1][1] is not None
    assert sum(v is None for k, v in histories if k == "u1") == 1
    assert not any(v is None for k, v in histories if k != "u1")
    assert monitoring.FORGETS.labels("request", "forgotten")._value.get() == before + 1


def test_forget_waits_for_the_users_events_in_flight(make_app):
    app, rec = make_app()
    t = int(time.time() * 1000) - 60_000
    msgs = [(b"u1", ev(ts=t + n, item=f"i{n}")) for n in range(3)] + [forget("u1"), (b"u1", ev(ts=t + 10))]
    results = asyncio.run(run(app, msgs, one_at_a_time=False))
    assert results[3] == "forget:forgotten"
    assert [p["history_len"] for p in rec.of("predictions")] == [1, 2, 3, 1]
    assert len(decode_state(app.topology.histories.get("u1")).history) == 1


def test_forget_of_an_unknown_user_and_bad_control_records_are_never_dead_lettered(make_app):
    app, rec = make_app()
    before = monitoring.EVENTS_IN._value.get()
    msgs = [forget("nobody"), (None, b"", FORGET_HEADERS), (b"u1", b"{not json", FORGET_HEADERS),
            (b"u1", b"", [(CONTROL_HEADER, b"reboot")])]
    results = asyncio.run(run(app, msgs))
    assert results == ["forget:absent", "control:invalid", "control:invalid", "control:invalid"]
    assert rec.of("dlq") == [] and rec.of("predictions") == []
    assert [forget_user_of(o) for o in rec.of("outcomes")] == ["nobody"]  # a request always reaches the trainer
    assert monitoring.EVENTS_IN._value.get() == before  # control records are not counted as events


def test_idle_users_and_the_conditional_forget_of_the_sweep(make_app):
    app, rec = make_app(state_idle_ttl_s=3600)
    now = int(time.time() * 1000)
    pl = app.pipeline

    async def main():
        await run(app, [(b"u1", ev(ts=now - 1000)), (b"u2", ev(user="u2", ts=now - 1000))])
        cutoff, idle = await pl.idle_users(now_ms=now)
        assert cutoff == now - 3_600_000 and idle == []  # both just seen
        cutoff, idle = await pl.idle_users(now_ms=now + 2 * 3_600_000)
        assert sorted(idle) == [(0, "u1"), (0, "u2")]
        # u2 comes back after the sweep looked: its conditional request keeps it; u1 goes
        return await run(app, [(b"u2", ev(user="u2", ts=now)), forget("u1", ForgetRequest(IDLE, cutoff)),
                               forget("u2", ForgetRequest(IDLE, int(time.time() * 1000) - 1))])

    results = asyncio.run(main())
    assert results[1:] == ["forget:forgotten", "forget:kept"]
    assert app.topology.histories.get("u1") is None and app.topology.histories.get("u2") is not None
    assert stored_users(app) == ["u2"]
    assert [(forget_user_of(o), o.get("reason")) for o in rec.of("outcomes") if forget_user_of(o)] == [("u1", IDLE)]


def test_sweep_requests_go_to_the_users_partition_and_old_states_use_their_newest_event(make_app, monkeypatch):
    app, _ = make_app(state_idle_ttl_s=60)
    now = int(time.time() * 1000)
    # a state written before "seen" existed: its newest event's time stands in for it
    old = encode_state(UserState(EventSeq.from_columns(["a"], ["view"], [now - 3_600_000])))
    assert b"seen" not in old and last_seen(decode_state(old)) == now - 3_600_000
    sent = []

    async def request_forget(user, request, partition):
        sent.append((user, request, partition))

    async def main():
        await run(app, [(b"u1", ev(ts=now - 1000))])
        app.topology.histories.data._db_for_partition(0).put(b"u0", old)  # as restored from an old changelog
        monkeypatch.setattr(app.pipeline, "request_forget", request_forget)
        return await app.pipeline.sweep()

    assert asyncio.run(main()) == 1
    (user, request, partition), = sent
    assert (user, partition, request.reason) == ("u0", 0, IDLE) and request.idle_before_ms <= now


@pytest.mark.parametrize("headers", [{CONTROL_HEADER: b"forget"}, [(CONTROL_HEADER, b"forget")]])
def test_a_control_header_is_recognised_in_both_header_forms(make_app, headers):
    app, rec = make_app()
    results = asyncio.run(run(app, [(b"u1", ev()), (b"u1", b"", headers)]))
    assert results == ["queued", "forget:forgotten"] and app.topology.histories.get("u1") is None


class SlowAcks:
    """A publisher whose records reach 'the broker' 50 ms after they are sent (the pipeline writes a
    user's state only then): the window in which a forget must not let the write bring the user back."""

    def __init__(self):
        from tests.unit.stream_app.conftest import Recorder

        self.rec = Recorder()

    async def send(self, kind, key, value):
        await self.rec.send(kind, key, value)
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, fut.set_result, None)
        return fut

    def of(self, kind):
        return self.rec.of(kind)


def test_forget_waits_for_the_state_write_of_events_delivered_but_not_yet_acknowledged(tmp_path):
    """A forget that arrives after the user's events were delivered (predictions sent) but before the
    broker acknowledged them, so before their state write: the write happens first, then the delete
    (a CI run once saw the user come back with history_len 4)."""
    from stream_app.app import create_app
    from stream_app.settings import Settings

    pub = SlowAcks()
    app = create_app(Settings(app_id="test-forget-slow-acks", data_dir=tmp_path, window_events=5, partitions=1,
                              max_wait_ms=1, gc_freeze=False), publisher=pub)
    app.finalize()
    app.flow_control.resume()
    t = int(time.time() * 1000) - 60_000
    msgs = [(b"u1", ev(ts=t + n, item=f"i{n}")) for n in range(3)] + [forget("u1"), (b"u1", ev(ts=t + 10))]

    async def main():
        async with app.pipeline.agent.test_context() as agent:
            for key, value, *headers in msgs:
                await agent.put(value, key=key, headers=headers[0] if headers else None)
                if not headers:
                    await app.pipeline.batcher.drain()  # delivered, not yet acknowledged
            await app.pipeline.batcher.drain()
            while app.pipeline.pending:
                await asyncio.sleep(0.01)
            return list(agent.results.values())

    results = asyncio.run(main())
    assert results[3] == "forget:forgotten"
    assert [p["history_len"] for p in pub.of("predictions")] == [1, 2, 3, 1]
    assert len(decode_state(app.topology.histories.get("u1")).history) == 1
