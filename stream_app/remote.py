"""The predictor in a child process: inference outside the worker's GIL (setting ``serve_process``).

Inside the worker, the inference thread needs the GIL between every torch kernel while the event
loop (parsing, state, Kafka I/O) holds it most of the time, so the model runs in a **child
process** (``spawn``) and the worker only ships requests and reads answers (measurements:
docs/serving.md, "The inference process").

* :class:`RemotePredictor` is the worker's :class:`~models.predictor.Predictor`; it ``runs_elsewhere``:
  the batcher awaits :meth:`~RemotePredictor.predict_async`, which writes one message per batch
  (histories, user ids, K, the batch's item texts when its events carried any, and the histories
  ``observe``\\ d since the last batch, for a child model that ``learns``) and is woken by
  ``add_reader`` when the reply is there.
  :meth:`~RemotePredictor.successor` has the child load, verify and warm up the next checkpoint
  beside the current one; the first batch naming the new version makes the child drop the old one.
  :meth:`~RemotePredictor.apply_delta` ships an online delta (its safetensors bytes, base64 in the
  message) to the child, which applies it to the model serving that version and files it under the
  delta's label; the proxy's ``version`` follows.
  :meth:`~RemotePredictor.forget_users` has every model in the child drop those users' KV cache
  entries (a privacy deletion), in order with the batches on the one pipe.
* :func:`serve` is the child's loop (:func:`stream_app.predictors.load_local` at start), answering
  until the pipe closes, and exits within about half a second of its worker however the worker
  died (``kill -9`` included: :func:`_die_with_parent`).
* Messages are orjson (no pickle): histories as ``EventSeq.to_json()``, predictions as
  ``Prediction.to_json()``. A child that dies is replaced on the next call (same settings, the
  checkpoint last loaded, the deltas applied on top of it replayed as one merged delta:
  :func:`models.delta.merge`) and the call retried once; a call cancelled or timed out mid-way kills
  the child, whose late reply would otherwise answer the next request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import multiprocessing as mp
import os
import threading
import time
from typing import Any, Mapping, Sequence

import orjson

from models.delta import ModelDelta, merge
from models.errors import PredictorError
from models.predictor import Prediction, Predictor
from models.schema import EventSeq
from stream_app import monitoring, predictors, runtime
from stream_app.settings import KAFKA_AUTH_FIELDS, Settings, SettingsType

log = logging.getLogger(__name__)

#: Seconds the worker waits for the child's answer to one call before declaring it dead.
CALL_TIMEOUT_S = 300.0


#: Seconds between the child's checks that its worker is still alive (:func:`_die_with_parent`).
PARENT_POLL_S = 0.5


def _die_with_parent(parent_pid: int, deathsig: bool) -> None:
    """Exit when the worker does, even if it was ``kill -9``\ ed in the middle of a long call.

    The pipe's EOF tells the child only when it next reads (after the batch or the model load it is
    busy with), so: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux when ``deathsig`` (the kernel
    kills the child the moment the *thread* that spawned it dies, so the worker asks for it only
    when its main thread spawned the child: an executor thread may end before the worker does),
    and everywhere a daemon thread that polls ``os.getppid()`` every :data:`PARENT_POLL_S` and
    exits the process once the parent is no longer ``parent_pid`` (reparented: the worker died).
    """
    import ctypes
    import sys

    if deathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
        except (OSError, AttributeError):  # no prctl: the watchdog below still works
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent watchdog")
    if os.getppid() != parent_pid:  # the worker died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # no cleanup: the worker is gone, nobody reads our answers

    threading.Thread(target=watch, name="nextaction-parent-watchdog", daemon=True).start()


def serve(conn: Any, settings_payload: dict, path: str | None, parent_pid: int | None = None,
          deathsig: bool = False) -> None:
    """The child process: build the predictor, then answer requests until the pipe closes (or the
    worker ``parent_pid`` dies: :func:`_die_with_parent`)."""
    import signal

    if parent_pid is not None:
        _die_with_parent(parent_pid, deathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker handles Ctrl-C and closes the pipe
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    settings = Settings(**{**settings_payload, "serve_process": False})  # no grandchildren
    models: dict[str, Predictor] = {}
    try:
        first = predictors.load_local(settings)
        if path is not None and path != str(settings.checkpoint):  # a respawn after a hot swap
            first = _load(first, path, None, settings)
    except Exception as exc:  # noqa: BLE001 - tell the worker, then exit
        conn.send_bytes(orjson.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return
    models[str(first.version)] = first
    if settings.gc_freeze:  # as in the worker: no full collections over torch's heap
        runtime.freeze_heap()
    conn.send_bytes(orjson.dumps({"ok": True, **_describe(first)}))
    while True:
        try:
            msg = orjson.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the worker is gone
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            reply = _handle(msg, models, settings)
        except Exception as exc:  # noqa: BLE001 - a failing batch is the worker's to retry / dead-letter
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if reply is None:
            return
        reply["t"] = [time.perf_counter() - t0, time.thread_time() - c0]  # wall, CPU (metrics)
        try:
            conn.send_bytes(orjson.dumps(reply))
        except (EOFError, OSError):
            return


def _describe(predictor: Predictor) -> dict:
    """What the worker-side proxy mirrors of a predictor in the child."""
    return {"version": str(predictor.version), "learns": bool(predictor.learns)}


def _load(current: Predictor, path: str, sha256: str | None, settings: SettingsType) -> Predictor:
    return predictors.load_successor(current, path, sha256, lambda p: predictors.load_transformer(settings, p))


def _handle(msg: dict, models: dict[str, Predictor], settings: SettingsType) -> dict | None:
    op = msg["op"]
    if op == "predict":
        version = msg["v"]
        pred = models.get(version)
        if pred is None:
            raise PredictorError(f"inference process has no model {version!r} (has {sorted(models)})")
        # models are kept in load order: a batch of a version means the swap to it happened, so the
        # ones loaded before it go; one loaded after it (a successor still warming up) stays
        for other in list(models)[:list(models).index(version)]:
            del models[other]
        for seq in msg.get("observe", ()):  # best effort, as in-process (Batcher._infer)
            try:
                pred.observe(EventSeq.from_json(seq))
            except Exception:  # noqa: BLE001 - learning must not fail the batch (nor be retried with it)
                log.exception("predictor %s observe() failed", version)
        hist = [EventSeq.from_json(h) for h in msg["h"]]
        texts = msg.get("texts")  # the batch's item texts (cold-start items), only when there are some
        out = pred.predict(hist, msg["k"], msg.get("users")) if not texts else \
            pred.predict(hist, msg["k"], msg.get("users"), texts)
        reply = {"ok": True, "p": [p.to_json() for p in out]}
        text_rows = pred.take_text_rows()  # new items given text rows in this batch (the worker's metrics)
        if text_rows:
            reply["text_rows"] = text_rows
        return reply
    if op == "delta":
        version = msg["v"]
        pred = models.get(version)
        if pred is None:
            raise PredictorError(f"inference process has no model {version!r} (has {sorted(models)})")
        try:
            applied = pred.apply_delta(ModelDelta.decode(base64.b64decode(msg["d"])))
        except ValueError as exc:  # a delta that does not fit: nothing changed (as in-process)
            return {"ok": True, "applied": False, "version": version, "rejected": str(exc)}
        if applied:  # the same model under its new label, in the same place of the load order
            renamed = {(str(pred.version) if v == version else v): m for v, m in models.items()}
            models.clear()
            models.update(renamed)
        return {"ok": True, "applied": bool(applied), "version": str(pred.version)}
    if op == "forget":  # every model held (a successor warming up included) drops the users' cached state
        return {"ok": True, "n": sum(m.forget_users(msg["users"]) for m in models.values())}
    if op == "load":
        current = models[msg["current"]]
        new = _load(current, msg["path"], msg.get("sha256"), settings)
        models[str(new.version)] = new
        return {"ok": True, **_describe(new)}
    if op == "close":
        return None
    raise PredictorError(f"unknown inference-process op {op!r}")


class _Channel:
    """The child process and its pipe, shared by every :class:`RemotePredictor` of one worker."""

    def __init__(self, settings: SettingsType) -> None:
        # The child speaks to no broker: it gets no Kafka credentials (a secret stays in the worker).
        self.payload = settings.model_dump(mode="json", exclude=set(KAFKA_AUTH_FIELDS))
        self.ctx = mp.get_context("spawn")
        self.lock = threading.Lock()
        self.path: str | None = None  # the checkpoint last loaded by a successor (for a respawn)
        self.base: str | None = None  # the version the child loaded last (start or successor) ...
        self.lineage: ModelDelta | None = None  # ... and the deltas applied on top of it, merged
        self.proc = self.conn = None
        self.pending_observe: list[dict] = []
        self.respawns = 0

    def start(self) -> dict:
        parent, child = self.ctx.Pipe()
        # PR_SET_PDEATHSIG follows the spawning thread: only the main thread lives as long as the worker
        deathsig = threading.current_thread() is threading.main_thread()
        self.proc = self.ctx.Process(target=serve, args=(child, self.payload, self.path, os.getpid(), deathsig),
                                     daemon=True, name="nextaction-inference")
        self.proc.start()
        child.close()
        self.conn = parent
        hello = self._recv(timeout=CALL_TIMEOUT_S)
        if not hello.get("ok"):
            raise PredictorError(f"inference process failed to start: {hello.get('error')}")
        if self.base is None:
            self.base = str(hello["version"])
        if self.lineage is not None and self.lineage.follows(hello["version"]):  # a respawn: replay the deltas
            self.conn.send_bytes(orjson.dumps(_delta_message(hello["version"], self.lineage)))
            reply = _checked(self._recv(timeout=CALL_TIMEOUT_S))
            if not reply["applied"]:
                raise PredictorError(f"inference process could not replay delta {self.lineage.label}: "
                                     f"{reply.get('rejected')}")
            hello["version"] = reply["version"]
        log.info("inference process %d serving %s", self.proc.pid, hello["version"])
        return hello

    def _recv(self, timeout: float) -> dict:
        if not self.conn.poll(timeout):
            raise PredictorError(f"inference process {self.proc.pid} did not answer within {timeout:.0f} s")
        return orjson.loads(self.conn.recv_bytes())

    def call(self, msg: dict) -> dict:
        """Send ``msg``, return the child's answer; a dead child is replaced once and the call retried."""
        data = orjson.dumps(msg)
        with self.lock:
            for attempt in (1, 2):
                try:
                    self.conn.send_bytes(data)
                    reply = self._recv(CALL_TIMEOUT_S)
                    break
                except (EOFError, OSError) as exc:
                    self._replace(attempt, exc)
                    self.start()
                except BaseException:  # timed out (or interrupted) mid-call: as in call_async
                    self._kill()
                    raise
        return _checked(reply)

    async def call_async(self, msg: dict) -> dict:
        """:meth:`call` for the event loop: the loop writes the request and is woken when the reply
        is readable, so no thread waits on the pipe (and then on the GIL). Shares the channel's
        lock with :meth:`call` (a model load in the executor thread)."""
        data = orjson.dumps(msg)
        loop = asyncio.get_running_loop()
        while not self.lock.acquire(blocking=False):  # held by a load in the executor: rare, seconds
            await asyncio.sleep(0.001)
        try:
            for attempt in (1, 2):
                try:
                    self.conn.send_bytes(data)  # a full pipe blocks until the (idle, reading) child drains it
                    await self._readable(loop, CALL_TIMEOUT_S)
                    reply = orjson.loads(self.conn.recv_bytes())
                    break
                except (EOFError, OSError) as exc:
                    self._replace(attempt, exc)
                    await loop.run_in_executor(None, self.start)  # ~5 s of spawn and model load, off the loop
                except BaseException:  # cancelled or timed out mid-call: its reply would answer the next
                    self._kill()       # request, so the child goes; the next call starts a new one
                    raise
        finally:
            self.lock.release()
        return _checked(reply)

    async def _readable(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        fd = self.conn.fileno()
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError:
            raise PredictorError(f"inference process {self.proc.pid} did not answer within {timeout:.0f} s") from None
        finally:
            loop.remove_reader(fd)

    def _replace(self, attempt: int, exc: BaseException) -> None:
        """The child died during a call: raise on the second attempt, else kill what is left (the
        caller starts a new one and retries)."""
        if attempt == 2:
            raise PredictorError(f"inference process died again: {exc!r}") from None
        log.error("!!! inference process %s died (exit code %s, %r): starting a new one",
                  self.proc.pid, self.proc.exitcode, exc)
        self._kill()
        self.respawns += 1

    def _kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()

    def close(self) -> None:
        with self.lock:
            if self.proc is None:
                return
            try:
                self.conn.send_bytes(orjson.dumps({"op": "close"}))
                self.proc.join(10)
            except (EOFError, OSError):
                pass
            self._kill()
            self.proc = None


def _delta_message(version: str, delta: ModelDelta) -> dict:
    return {"op": "delta", "v": version, "d": base64.b64encode(delta.encode()).decode("ascii")}


def _checked(reply: dict) -> dict:
    if not reply.get("ok"):
        raise PredictorError(f"inference process: {reply.get('error')}")
    return reply


class RemotePredictor(Predictor):
    """A :class:`~models.predictor.Predictor` whose model lives in the worker's inference process."""

    runs_elsewhere = True

    def __init__(self, channel: _Channel, version: str, learns: bool) -> None:
        self._channel, self.version = channel, version
        self.learns = learns  # the child model's: False, and observations are not even shipped
        self._text_rows: dict[str, int] = {}  # the child's take_text_rows, summed over replies since ours

    @classmethod
    def start(cls, settings: SettingsType) -> "RemotePredictor":
        """Spawn the inference process; it loads ``settings.checkpoint`` (or falls back to the baseline)."""
        channel = _Channel(settings)
        return cls._described(channel, channel.start())

    @classmethod
    def _described(cls, channel: _Channel, reply: dict) -> "RemotePredictor":
        """The proxy for the model the child described in ``reply`` (see :func:`_describe`)."""
        return cls(channel, reply["version"], reply["learns"])

    @property
    def pid(self) -> int | None:
        return self._channel.proc.pid if self._channel.proc is not None else None

    def predict(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None = None,
                texts: Mapping[str, str] | None = None) -> list[Prediction]:
        if not histories:
            return []
        return self._predictions(self._channel.call(self._request(histories, k, users, texts)), len(histories))

    async def predict_async(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None = None,
                            texts: Mapping[str, str] | None = None) -> list[Prediction]:
        """:meth:`predict` awaited on the event loop (what the batcher calls)."""
        if not histories:
            return []
        return self._predictions(await self._channel.call_async(self._request(histories, k, users, texts)),
                                 len(histories))

    def _request(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None,
                 texts: Mapping[str, str] | None = None) -> dict:
        ch = self._channel
        observe, ch.pending_observe = ch.pending_observe, []  # applied once, even when the batch fails
        msg = {"op": "predict", "v": self.version, "k": k, "observe": observe,
               "h": [h.to_json() for h in histories], "users": list(users) if users is not None else None}
        if texts:  # the child's model gives new items their text rows before it predicts
            msg["texts"] = dict(texts)
        return msg

    def _predictions(self, reply: dict, n: int) -> list[Prediction]:
        wall, cpu = reply["t"]
        monitoring.INFERENCE_PROCESS.labels("wall").observe(wall)
        monitoring.INFERENCE_PROCESS.labels("cpu").observe(cpu)
        for result, count in reply.get("text_rows", {}).items():
            self._text_rows[result] = self._text_rows.get(result, 0) + int(count)
        out = [Prediction.from_json(p) for p in reply["p"]]
        if len(out) != n:
            raise PredictorError(f"inference process returned {len(out)} predictions for {n} histories")
        return out

    def take_text_rows(self) -> dict[str, int]:
        """The child model's new items given text rows (or not) since the last call (from its replies)."""
        out, self._text_rows = self._text_rows, {}
        return out

    def observe(self, history: EventSeq) -> None:
        """Buffered: sent with the next batch, learned before it is predicted (as in-process); a
        child model that does not learn is sent nothing."""
        if self.learns:
            self._channel.pending_observe.append(history.to_json())

    def successor(self, path: str, sha256: str | None = None) -> "RemotePredictor":
        """Load ``path`` in the inference process next to the current model; served from the first
        batch that this new predictor makes (after ``Batcher.swap``)."""
        reply = self._channel.call({"op": "load", "current": self.version, "path": str(path), "sha256": sha256})
        self._channel.path = str(path)
        self._channel.base, self._channel.lineage = str(reply["version"]), None  # a new lineage
        return self._described(self._channel, reply)

    def apply_delta(self, delta: ModelDelta) -> bool:
        """Apply ``delta`` to the child's model of :attr:`version` (the contract:
        :meth:`models.predictor.Predictor.apply_delta`); ``version`` becomes ``delta.label`` when it
        applied. Blocks on the pipe (call it from the inference thread, or await
        :meth:`apply_delta_async`); raises ``ValueError`` for a delta that follows but does not fit."""
        if not delta.follows(str(self.version)):
            return False
        return self._applied(delta, self._channel.call(_delta_message(str(self.version), delta)))

    async def apply_delta_async(self, delta: ModelDelta) -> bool:
        """:meth:`apply_delta` awaited on the event loop (no thread waits on the pipe)."""
        if not delta.follows(str(self.version)):
            return False
        return self._applied(delta, await self._channel.call_async(_delta_message(str(self.version), delta)))

    def _applied(self, delta: ModelDelta, reply: dict) -> bool:
        if reply.get("rejected"):
            raise ValueError(f"inference process rejected delta {delta.label}: {reply['rejected']}")
        if not reply["applied"]:
            return False
        self.version = reply["version"]
        ch = self._channel  # remembered for a respawn: the lineage of the checkpoint loaded last
        if delta.base == ch.base:
            if ch.lineage is None and delta.prev == 0:
                ch.lineage = delta
            elif ch.lineage is not None and delta.follows(ch.lineage.label):
                ch.lineage = merge(ch.lineage, delta)
        return True

    def forget_users(self, users: Sequence[str]) -> int:
        """Every model in the inference process drops the users' cached state (privacy deletion); in
        order with the batches, since calls share the one pipe."""
        return int(self._channel.call({"op": "forget", "users": list(users)})["n"]) if users else 0

    async def forget_users_async(self, users: Sequence[str]) -> int:
        """:meth:`forget_users` awaited on the event loop."""
        return int((await self._channel.call_async({"op": "forget", "users": list(users)}))["n"]) if users else 0

    def warm_up(self) -> None:
        """The inference process warms each model up when it loads it."""

    def close(self) -> None:
        """Stop the inference process (the worker is shutting down)."""
        self._channel.close()
