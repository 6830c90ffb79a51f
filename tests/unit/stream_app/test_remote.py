"""The predictor in a child process (stream_app.remote): same answers as in-process, hot swap,
respawn after the child dies. Every test starts an inference process: all are ``slow``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import numpy as np
import pytest

from models.serving import TransformerPredictor
from stream_app import monitoring
from models.errors import PredictorError
from stream_app.remote import RemotePredictor
from stream_app.settings import Settings
from tests.integration.accounting import pid_gone_within  # zombie-aware (a pure helper)
from models.schema import ACTIONS, EventSeq

pytestmark = pytest.mark.slow


def _histories(n: int, seed: int = 0) -> list[EventSeq]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = int(rng.integers(1, 12))  # longer than the checkpoint's max_len (8) too
        out.append(EventSeq.from_columns([f"i{k}" for k in rng.integers(0, 30, m)], list(rng.choice(ACTIONS, m)),
                                         1_700_000_000_000 + np.cumsum(rng.integers(1_000, 60_000, m)),
                                         devices=list(rng.choice(["ios", "web"], m))))
    return out


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint):
    return make_checkpoint(0, items=30), make_checkpoint(1, items=30)


def _same(a, b):
    assert [i for i, _ in a.top_items] == [i for i, _ in b.top_items]
    np.testing.assert_allclose(a.action_probs, b.action_probs, atol=1e-5)
    np.testing.assert_allclose([s for _, s in a.top_items], [s for _, s in b.top_items], atol=1e-4)
    assert a.next_gap_s == pytest.approx(b.next_gap_s, rel=1e-4)


def test_child_process_answers_like_the_in_process_predictor_and_swaps(checkpoints):
    v1, v2 = checkpoints
    local1 = TransformerPredictor.from_checkpoint(v1, device="cpu", num_threads=1)
    local2 = TransformerPredictor.from_checkpoint(v2, device="cpu", num_threads=1)
    remote = RemotePredictor.start(Settings(checkpoint=v1, device="cpu", serve_threads=1))
    try:
        assert remote.pid != os.getpid() and remote.version == local1.version and remote.runs_elsewhere
        hs = _histories(6)
        users = [f"u{i}" for i in range(len(hs))]
        batches = monitoring.INFERENCE_PROCESS.labels("cpu")._sum.get(), monitoring.INFERENCE_PROCESS.labels("wall")._sum.get()
        for a, b in zip(remote.predict(hs, 5, users=users), local1.predict(hs, 5, users=users)):
            _same(a, b)
        cpu = monitoring.INFERENCE_PROCESS.labels("cpu")._sum.get() - batches[0]
        wall = monitoring.INFERENCE_PROCESS.labels("wall")._sum.get() - batches[1]
        assert 0 < cpu and 0 < wall < 60  # the child's own time for that batch reached the worker's /metrics
        assert not remote.learns  # a fixed checkpoint: its observe is a no-op, so nothing is shipped
        for h in hs:
            remote.observe(h)
        assert remote._channel.pending_observe == []
        nxt = remote.successor(str(v2))
        assert nxt.version == local2.version != remote.version
        # batches of the current version go on while the successor waits for its swap (traffic never stops)
        for a, b in zip(remote.predict(hs, 5, users=users), local1.predict(hs, 5, users=users)):
            _same(a, b)
        for a, b in zip(nxt.predict(hs, 5, users=users), local2.predict(hs, 5, users=users)):
            _same(a, b)
        assert remote._channel.pending_observe == []
        with pytest.raises(PredictorError, match="no model"):  # the swap freed v1 in the child
            remote.predict(hs[:1], 5)
    finally:
        remote.close()
    assert remote._channel.proc is None


def test_a_dead_child_is_replaced_on_the_next_call(checkpoints):
    v1, _ = checkpoints
    remote = RemotePredictor.start(Settings(checkpoint=v1, device="cpu", serve_threads=1))
    try:
        hs = _histories(3)
        first = remote.predict(hs, 5)
        old_pid = remote.pid
        os.kill(old_pid, signal.SIGKILL)
        remote._channel.proc.join(10)
        again = remote.predict(hs, 5)  # respawned and retried once
        assert remote.pid != old_pid and remote._channel.respawns == 1
        for a, b in zip(first, again):
            _same(a, b)
    finally:
        remote.close()


def test_the_event_loop_path_answers_alike_and_replaces_a_dead_child(checkpoints):
    """predict_async (what the batcher awaits: no thread waits on the pipe) gives what predict gives,
    and a child killed between calls is replaced, off the event loop, and the call retried."""
    v1, _ = checkpoints
    remote = RemotePredictor.start(Settings(checkpoint=v1, device="cpu", serve_threads=1))
    try:
        hs = _histories(4)

        async def scenario():
            first = await remote.predict_async(hs, 5)
            os.kill(remote.pid, signal.SIGKILL)
            remote._channel.proc.join(10)
            beat = asyncio.ensure_future(asyncio.sleep(0.01))  # the loop keeps running during the respawn
            again = await remote.predict_async(hs, 5)
            return first, again, beat.done()

        old_pid = remote.pid
        first, again, loop_ran = asyncio.run(scenario())
        assert loop_ran and remote.pid != old_pid and remote._channel.respawns == 1
        for a, b, c in zip(first, again, remote.predict(hs, 5)):
            _same(a, b)
            _same(a, c)

        async def cancelled_mid_call():  # e.g. shutdown: the unread reply must not answer the next call
            task = asyncio.ensure_future(remote.predict_async(hs, 5))
            await asyncio.sleep(0)  # sent, not yet answered
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await remote.predict_async(hs[:1], 5)

        after = asyncio.run(cancelled_mid_call())
        assert len(after) == 1 and remote._channel.respawns == 2
        _same(after[0], first[0])
    finally:
        remote.close()


def test_a_delta_applied_in_the_child_answers_like_in_process_and_survives_a_respawn(checkpoints):
    from models.delta import ModelDelta

    v1, _ = checkpoints
    local = TransformerPredictor.from_checkpoint(v1, device="cpu", num_threads=1)
    remote = RemotePredictor.start(Settings(checkpoint=v1, device="cpu", serve_threads=1))
    try:
        base, first, n = remote.version, local.vocab.first_item, len(local.vocab)
        rng = np.random.default_rng(4)
        d1 = ModelDelta(base, 1, 0, [first + 2, n, n + 1], ["i2", "new-1", "new-2"], rng.normal(0, 0.1, (3, 32)),
                        [0.1, 5.0, -1.0], [0, 0, 0], trans_rows=[first + 1], trans_ptr=[0, 1], trans_idx=[n + 1],
                        trans_val=[2.0], action_bias=rng.normal(0, 0.3, 5))
        d2 = ModelDelta(base, 2, 1, [first + 4], ["new-3"], rng.normal(0, 0.1, (1, 32)), [3.0], [0])
        hs = _histories(6) + [EventSeq.from_columns(["i1", "new-1", "new-3"], ["view"] * 3,
                                                    [1_700_000_000_000, 1_700_000_001_000, 1_700_000_002_000])]
        users = [f"u{i}" for i in range(len(hs))]
        remote.predict(hs, 5, users=users)  # warm the child's cache
        assert not remote.apply_delta(ModelDelta(base, 2, 1, [], [], np.zeros((0, 32)), [], []))  # does not follow
        assert remote.apply_delta(d1) and remote.version == f"{base}+1"
        assert asyncio.run(remote.apply_delta_async(d2)) and remote.version == f"{base}+2"
        assert not remote.apply_delta(d2)  # the same delta twice
        with pytest.raises(ValueError, match="rejected.*gap"):  # follows, does not fit: nothing changes
            remote.apply_delta(ModelDelta(base, 3, 2, [n + 9], ["far"], np.zeros((1, 32)), [0.0], [0]))
        assert local.apply_delta(d1) and local.apply_delta(d2) and local.version == remote.version
        want = local.predict_full(hs, 5)
        for a, b in zip(remote.predict(hs, 5, users=users), want):
            _same(a, b)
        assert "new-1" in [i for i, _ in want[-1].top_items]
        old_pid = remote.pid
        os.kill(old_pid, signal.SIGKILL)
        remote._channel.proc.join(10)
        again = remote.predict(hs, 5)  # respawned: the checkpoint, then its deltas replayed as one
        assert remote.pid != old_pid and remote._channel.respawns == 1 and remote.version == f"{base}+2"
        for a, b in zip(again, want):
            _same(a, b)
    finally:
        remote.close()


def test_bad_checkpoint_in_the_child_falls_back_to_the_baseline_which_learns(tmp_path):
    remote = RemotePredictor.start(Settings(checkpoint=tmp_path / "missing", device="cpu", serve_threads=1))
    try:
        assert remote.version.startswith("baseline") and remote.learns
        probe = EventSeq.from_columns(["a"], ["view"], [1_700_000_000_000])
        assert "hot" not in [i for i, _ in remote.predict([probe], 3)[0].top_items]
        for n in range(5):  # buffered, then learned in the child before the next batch is predicted
            remote.observe(EventSeq.from_columns(["a", "hot"], ["view", "view"],
                                                 [1_700_000_000_000 + n, 1_700_000_000_001 + n]))
        assert len(remote._channel.pending_observe) == 5
        assert remote.predict([probe], 3)[0].top_items[0][0] == "hot"
        assert remote._channel.pending_observe == []
    finally:
        remote.close()


_PARENT = """
import sys, threading, time
from stream_app.remote import RemotePredictor
from stream_app.settings import Settings

def start():
    r = RemotePredictor.start(Settings(checkpoint=sys.argv[1], device="cpu", serve_threads=1))
    print(r.pid, flush=True)

if sys.argv[2] == "thread":  # spawned from a thread that outlives nothing: the watchdog's case
    t = threading.Thread(target=start)
    t.start(); t.join()
else:
    start()
time.sleep(600)
"""


@pytest.mark.parametrize("spawner", ["main", "thread"])
def test_the_child_dies_within_2_s_of_a_killed_worker(tmp_path, spawner):
    """``kill -9`` of the worker: the child goes too (PR_SET_PDEATHSIG when the main thread spawned it,
    the getppid watchdog otherwise), instead of waiting for its next read of the pipe."""
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path / "missing"), spawner],
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        if spawner == "thread":  # the spawning thread has ended: the child must still be there
            time.sleep(1.0)
        os.kill(child, 0)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        # gone or a zombie (dead, waiting for PID 1 to reap it: in a container that can take seconds)
        if pid_gone_within(child, 2.0) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            pytest.fail(f"inference process {child} outlived its worker by 2 s")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_forget_users_drops_the_users_kv_cache_entries_in_the_child(checkpoints):
    v1, _ = checkpoints
    remote = RemotePredictor.start(Settings(checkpoint=v1, device="cpu", serve_threads=1))
    try:
        hs = _histories(3)
        remote.predict(hs, 5, users=["u0", "u1", "u2"])
        users = ["u0", "u1", "u2", "nobody"]
        assert remote.forget_users(users) >= 1  # the cached ones (a very short window may not be cached)
        assert asyncio.run(remote.forget_users_async(users)) == 0 and remote.forget_users([]) == 0
    finally:
        remote.close()


def test_item_texts_travel_to_the_child_which_ranks_the_new_item_in_that_call(text_checkpoint):
    """Cold-start items (docs/cold-start.md): the texts of a batch go in its predict message; the
    child's model (a checkpoint with a text projection, +50 bias for text items) appends the new item
    before predicting, so that very batch ranks it; a batch without texts sends none."""
    remote = RemotePredictor.start(Settings(checkpoint=text_checkpoint, device="cpu", serve_threads=1))
    try:
        h = EventSeq.from_columns(["i0", "new-1"], ["view"] * 2, [1_700_000_000_000, 1_700_000_060_000])
        assert "texts" not in remote._request([h], 3, ["u"])
        assert "new-1" not in {i for i, _ in remote.predict([h], 3, ["u"])[0].top_items}
        assert remote.take_text_rows() == {}
        got = asyncio.run(remote.predict_async([h, h[:1]], 3, ["u", "v"], {"new-1": "A documentary about bees"}))
        assert got[0].top_items[0][0] == "new-1" and got[1].top_items[0][0] == "new-1"
        assert remote.take_text_rows() == {"added": 1}  # the child's count came back with its reply
        assert remote.predict([h[:1]], 3, ["w"])[0].top_items[0][0] == "new-1"  # the child keeps the row
        assert remote.take_text_rows() == {}
    finally:
        remote.close()
