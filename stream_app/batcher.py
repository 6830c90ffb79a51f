"""Micro-batching of prediction requests in front of a :class:`~models.predictor.Predictor`.

The agent :meth:`~Batcher.submit`\\ s one :class:`Request` per valid event (awaiting while the
bounded queue is full: that is the backpressure that slows consumption instead of growing memory).
Two tasks then run on the event loop:

* the **infer loop** takes the oldest request and collects more until ``max_batch`` requests or
  until ``max_wait_ms`` after the oldest request was submitted (Triton-style dynamic batching: a
  request that already waited while the executor was busy is not held back any longer), then runs
  ``predict`` then ``observe`` for the whole batch in the single inference thread, so the event loop
  keeps consuming, updating state and publishing meanwhile — or awaits ``predict_async`` on the
  event loop for a predictor that ``runs_elsewhere`` (the inference process, :mod:`stream_app.remote`);
* the **deliver loop** hands finished batches, in submission order, to the ``deliver`` coroutine
  (publishing, acking). Inference of batch *n+1* overlaps delivery of batch *n*; a small bounded
  hand-off queue keeps a slow deliverer from letting results pile up.

Ordering: requests are FIFO through one queue, one batch at a time and one deliverer, and a
batch's results keep their request order, so results reach ``deliver`` in submission order —
per user in event order, since the agent submits a user's events in offset order.

Failures: if ``predict`` raises (or returns something malformed) for a batch, the batch is split
in halves and each half retried, down to single requests; a single request is tried twice. What
still fails comes back as a :class:`Result` with ``prediction=None`` and the error, for the
deliverer to dead-letter with reason :data:`PREDICT_FAILED`. No request is ever dropped.

Item texts: a request whose event carried an ``item_text`` holds it (:attr:`Request.item_text`); a
batch's texts reach ``predict(..., texts={item id: text})`` (:func:`batch_texts`; a bisected half
gets its own requests' texts), so a predictor with a text projection ranks a new item from the
prediction of the event that introduced it on (docs/cold-start.md). Without texts, ``predict`` is
called as before (no ``texts`` argument).

Model swap: :meth:`Batcher.swap` replaces the predictor; the infer loop reads the predictor once
per batch, so a swap takes effect atomically between batches and every :class:`Result` carries
the ``version`` of the predictor that made it.

>>> import asyncio
>>> from online.baseline import PopularityMarkovPredictor
>>> from models.schema import EventSeq
>>> async def demo():
...     out = []
...     async def deliver(results):
...         out.extend((r.request.user_id, r.version) for r in results)
...     b = Batcher(PopularityMarkovPredictor(), deliver, k=3, max_batch=8, max_wait_ms=1, max_queue=16)
...     await b.start()
...     for u in ("u1", "u2"):
...         await b.submit(Request(u, EventSeq.from_columns(["i1"], ["view"], [1_700_000_000_000]), 0))
...     await b.stop()
...     return out
>>> asyncio.run(demo())
[('u1', 'baseline-markov-1'), ('u2', 'baseline-markov-1')]
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from models.predictor import Prediction, Predictor
from models.schema import ACTIONS, EventSeq
from models.errors import PredictorError
from stream_app import monitoring

log = logging.getLogger(__name__)

#: Dead-letter reason of an event whose prediction failed even after the retries.
PREDICT_FAILED = "predict_failed"


@dataclass(slots=True, eq=False)
class Request:
    """One prediction to make: a user's history as of the triggering event (its last event)."""

    user_id: str
    history: EventSeq
    event_ts: int
    arrival: float = field(default_factory=time.time)  # wall clock when the worker read the event
    observe: bool = True  # let the predictor learn from this history (False for redeliveries)
    ref: Any = None  # opaque for the deliverer: source event, offsets, raw bytes ...
    enqueued: float = 0.0  # monotonic, set by submit()
    #: ``(item id, text)`` of the triggering event when it carries an ``item_text`` (cold-start items:
    #: the batch's texts go to ``predict(..., texts=)``, docs/cold-start.md); None without.
    item_text: tuple[str, str] | None = None


@dataclass(slots=True, eq=False)
class Result:
    """The outcome of one :class:`Request`: a prediction (with its model version) or an error."""

    request: Request
    prediction: Prediction | None
    version: str
    error: str | None = None
    inferred: float = 0.0  # monotonic, when its batch finished inference


Deliver = Callable[[list[Result]], Awaitable[None]]


def check_prediction(p: Prediction, k: int) -> Prediction:
    """Validate and normalise a predictor's output; raise :class:`PredictorError` naming the problem.

    Probabilities are renormalised to sum to exactly 1 (up to float rounding).

    >>> check_prediction(Prediction([2, 2, 0, 0, 0], [("a", 0.5)], 3.0), k=5).action_probs
    [0.5, 0.5, 0.0, 0.0, 0.0]
    >>> check_prediction(Prediction([float("nan")] * 5, [], 1.0), k=5)
    Traceback (most recent call last):
    ...
    models.errors.PredictorError: action_probs must be finite and >= 0 with a positive sum (got [nan, nan, nan, nan, nan])
    """
    if not isinstance(p, Prediction):
        raise PredictorError(f"predictor returned {type(p).__name__}, expected Prediction")
    probs = [float(x) for x in p.action_probs]
    if len(probs) != len(ACTIONS):
        raise PredictorError(f"action_probs must have {len(ACTIONS)} entries (got {len(probs)})")
    total = math.fsum(probs)
    if not all(math.isfinite(x) and x >= 0 for x in probs) or not total > 0 or not math.isfinite(total):
        raise PredictorError(f"action_probs must be finite and >= 0 with a positive sum (got {probs})")
    probs = [x / total for x in probs]
    items = []
    for entry in list(p.top_items)[:k]:
        item, score = entry
        score = float(score)
        if not math.isfinite(score):
            raise PredictorError(f"top_items score for {item!r} is not finite (got {score})")
        items.append((str(item), score))
    gap = float(p.next_gap_s)
    if not math.isfinite(gap) or gap < 0:
        raise PredictorError(f"next_gap_s must be finite and >= 0 (got {gap})")
    return Prediction(probs, items, gap, p.explanation, p.why)


def batch_texts(requests: list[Request]) -> dict[str, str] | None:
    """``{item id: text}`` of the requests whose event carried an ``item_text`` (the latest text of
    an item wins), or None when none did (then ``predict`` is called without ``texts``).

    >>> h = EventSeq.from_columns(["a"], ["view"], [0])
    >>> batch_texts([Request("u", h, 0), Request("v", h, 0, item_text=("a", "A title"))])
    {'a': 'A title'}
    >>> batch_texts([Request("u", h, 0)]) is None
    True
    """
    texts = None
    for r in requests:
        if r.item_text is not None:
            if texts is None:
                texts = {}
            texts[r.item_text[0]] = r.item_text[1]
    return texts


class Batcher:
    """Dynamic micro-batching in front of a :class:`~models.predictor.Predictor`.

    Arguments:
        predictor: the initial predictor (see :meth:`swap`).
        deliver: coroutine receiving each finished batch's results, in submission order. If it
            raises, the batcher stops and :meth:`run`/:meth:`wait_closed` re-raise (the worker
            should crash and restart from committed offsets rather than lose events).
        k: top-K items to ask for.
        max_batch: most requests per ``predict`` call.
        max_wait_ms: longest time the oldest request of a batch waits for more to arrive.
        max_queue: bound of the request queue; :meth:`submit` awaits while it is full.
        executor: the single inference thread (created, and shut down by :meth:`stop`, if None).
    """

    def __init__(self, predictor: Predictor, deliver: Deliver, *, k: int, max_batch: int, max_wait_ms: float,
                 max_queue: int, executor: ThreadPoolExecutor | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch!r})")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (got {max_queue!r})")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0 (got {max_wait_ms!r})")
        self._check_predictor(predictor)
        self._predictor = predictor
        self.deliver = deliver
        self.k, self.max_batch, self.max_wait = k, max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="nextaction-infer")
        self._queue: asyncio.Queue[Request] | None = None
        self._handoff: asyncio.Queue[list[Result]] | None = None
        self._tasks: list[asyncio.Task] = []
        self._pending = 0  # submitted, not yet delivered
        self._idle: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.stats = {"batches": 0, "requests": 0, "failed": 0, "predict_errors": 0, "swaps": 0}

    # --- public API -------------------------------------------------------------------------------
    @property
    def predictor(self) -> Predictor:
        return self._predictor

    @property
    def pending(self) -> int:
        """Requests submitted and not yet delivered."""
        return self._pending

    def swap(self, predictor: Predictor) -> None:
        """Serve ``predictor`` from the next batch on (the batch in flight finishes on the old one)."""
        self._check_predictor(predictor)
        old, self._predictor = self._predictor, predictor
        self.stats["swaps"] += 1
        monitoring.MODEL_SWAPS.inc()
        log.info("predictor swap: %s -> %s (from the next batch)", old.version, predictor.version)

    async def run_in_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the inference thread, between batches (e.g. loading the next model:
        one thread owns the model, and the event loop keeps serving meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        """Start the infer and deliver loops on the running event loop."""
        if self._tasks:
            return
        self._queue = asyncio.Queue(self.max_queue)
        self._handoff = asyncio.Queue(2)
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks = [asyncio.create_task(self._infer_loop(), name="nextaction-batcher-infer"),
                       asyncio.create_task(self._deliver_loop(), name="nextaction-batcher-deliver")]

    async def submit(self, request: Request) -> None:
        """Queue one request; waits while the queue is full (backpressure)."""
        if self._failure is not None:
            raise PredictorError(f"batcher stopped after a delivery failure: {self._failure!r}")
        if self._queue is None:
            raise RuntimeError("Batcher.submit() before start()")
        request.enqueued = time.monotonic()
        self._pending += 1
        self._idle.clear()
        try:
            await self._queue.put(request)
        except BaseException:
            self._done(1)
            raise
        monitoring.QUEUE_DEPTH.set(self._queue.qsize())

    async def drain(self) -> None:
        """Wait until every submitted request has been delivered (or the batcher failed)."""
        while self._pending and self._failure is None:
            waiter = asyncio.ensure_future(self._idle.wait())
            done, _ = await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()
                break
        if self._failure is not None:
            raise self._failure

    async def wait_closed(self) -> None:
        """Return when the loops end; re-raise the failure that ended them, if any."""
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def stop(self, drain: bool = True) -> None:
        """Optionally deliver everything queued, then stop the loops (and an owned executor)."""
        try:
            if drain and self._tasks:
                await self.drain()
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                try:
                    await t
                except (asyncio.CancelledError, Exception):  # noqa: PERF203 - failure already recorded
                    pass
            self._tasks = []
            if self._own_executor:
                self._executor.shutdown(wait=True)

    # --- the loops --------------------------------------------------------------------------------
    async def _collect(self) -> list[Request]:
        q = self._queue
        first = await q.get()
        batch = [first]
        deadline = first.enqueued + self.max_wait
        while len(batch) < self.max_batch:
            if not q.empty():
                batch.append(q.get_nowait())
                continue
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(q.get(), timeout))
            except asyncio.TimeoutError:
                break
        monitoring.QUEUE_DEPTH.set(q.qsize())
        return batch

    async def _infer_loop(self) -> None:
        try:
            while True:
                batch = await self._collect()
                started = time.monotonic()
                queued = monitoring.STAGE_LATENCY.labels("queue")
                for r in batch:
                    queued.observe(started - r.enqueued)
                predictor = self._predictor  # read once: the whole batch is served by one version
                results = await self._infer(predictor, batch)
                await self._handoff.put(results)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave the agent blocked in submit()
            self._fail(exc)
            raise

    async def _deliver_loop(self) -> None:
        try:
            while True:
                results = await self._handoff.get()
                try:
                    await self.deliver(results)
                finally:
                    self._done(len(results))
                now = time.monotonic()
                delivered = monitoring.STAGE_LATENCY.labels("deliver")
                for r in results:
                    delivered.observe(now - r.inferred)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    def _done(self, n: int) -> None:
        self._pending -= n
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()

    def _fail(self, exc: BaseException) -> None:
        log.error("batcher stopped: %r", exc)
        self._failure = exc
        self._idle.set()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()

    # --- one batch ----------------------------------------------------------------------------------
    async def _infer(self, predictor: Predictor, batch: list[Request]) -> list[Result]:
        """predict, then observe, one batch.

        A predictor that ``runs_elsewhere`` (the inference process) is awaited on the event loop, so
        no thread has to win the GIL back from the event loop after every pipe read and write; its
        ``observe`` must be cheap (it buffers). Any other predictor runs in the inference thread,
        predict and observe in one hop, while the event loop keeps consuming and publishing.
        """
        t0 = time.perf_counter()
        if predictor.runs_elsewhere:
            preds, errors = await self._predict_robust(predictor, batch)
            self._observe(predictor, batch)
        else:
            preds, errors = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._infer_in_thread, predictor, batch)
        dt = time.perf_counter() - t0
        done = time.monotonic()
        monitoring.BATCH_SIZE.observe(len(batch))
        monitoring.PREDICT_LATENCY.observe(dt)
        for result, n in predictor.take_text_rows().items():  # cold-start items (docs/cold-start.md)
            monitoring.TEXT_ROWS.labels(result).inc(n)
        inferred = monitoring.STAGE_LATENCY.labels("infer")
        for _ in batch:
            inferred.observe(dt)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        version = str(predictor.version)
        out = []
        for r, p, e in zip(batch, preds, errors):
            if p is None:
                self.stats["failed"] += 1
                log.error("prediction failed (event ts %s) with %s: %s", r.event_ts, version, e)  # no user id
                log.debug("... the failed prediction's user: %r", r.user_id)
            out.append(Result(r, p, version, e, done))
        return out

    def _infer_in_thread(self, predictor: Predictor, batch: list[Request]
                         ) -> tuple[list[Prediction | None], list[str | None]]:
        """The inference thread's share: the robust predict (its coroutine never suspends with a
        predictor that runs here, so it completes on the first step) and the observes."""
        coro = self._predict_robust(predictor, batch)
        try:
            coro.send(None)
        except StopIteration as done:
            self._observe(predictor, batch)
            return done.value
        coro.close()
        raise RuntimeError(f"{type(predictor).__name__}.predict_async suspended but runs_elsewhere is False")

    @staticmethod
    def _observe(predictor: Predictor, batch: list[Request]) -> None:
        """observe() each request's history after the batch's predictions (prequential order: a
        prediction must not see events later than its own); best effort, and only if it ``learns``."""
        if not predictor.learns:
            return
        for r in batch:
            if r.observe:
                try:
                    predictor.observe(r.history)
                except Exception:  # noqa: BLE001 - the predictions are already made
                    monitoring.OBSERVE_ERRORS.inc()
                    log.exception("predictor %s observe() failed", predictor.version)  # no user id at INFO+

    async def _predict_robust(self, predictor: Predictor, batch: list[Request]
                              ) -> tuple[list[Prediction | None], list[str | None]]:
        """Predict the batch; a failing call is split in halves and each half retried, down to
        single requests (tried twice); returns (predictions, errors) per request."""
        n = len(batch)
        preds: list[Prediction | None] = [None] * n
        errors: list[str | None] = [None] * n

        async def attempt(ids: list[int], tries: int) -> None:
            try:
                texts = batch_texts([batch[i] for i in ids])
                if texts is None:
                    got = await predictor.predict_async([batch[i].history for i in ids], self.k,
                                                        [batch[i].user_id for i in ids])
                else:
                    got = await predictor.predict_async([batch[i].history for i in ids], self.k,
                                                        [batch[i].user_id for i in ids], texts)
                if len(got) != len(ids):
                    raise PredictorError(f"predict() returned {len(got)} predictions for {len(ids)} histories")
            except Exception as exc:  # noqa: BLE001 - any predictor failure is isolated, then reported
                self.stats["predict_errors"] += 1
                monitoring.PREDICT_ERRORS.inc()
                if len(ids) > 1:  # bisect: isolate the poison history, keep the rest
                    mid = len(ids) // 2
                    await attempt(ids[:mid], 2)
                    await attempt(ids[mid:], 2)
                elif tries > 1:
                    await attempt(ids, tries - 1)
                else:
                    errors[ids[0]] = f"{type(exc).__name__}: {exc}"
                return
            for i, p in zip(ids, got):
                try:
                    preds[i] = check_prediction(p, self.k)
                except PredictorError as exc:
                    if tries > 1 and len(ids) > 1:
                        await attempt([i], 2)
                    elif tries > 1:
                        await attempt([i], tries - 1)
                    else:
                        errors[i] = f"{type(exc).__name__}: {exc}"

        await attempt(list(range(n)), 2)
        return preds, errors

    @staticmethod
    def _check_predictor(predictor: Any) -> None:
        if not isinstance(predictor, Predictor):
            raise TypeError(f"{type(predictor).__name__} is not a models.predictor.Predictor")
