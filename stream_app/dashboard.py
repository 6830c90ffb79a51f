"""The worker's live dashboard: ``/dashboard`` on its web server (docs/dashboard.md).

One static page (``stream_app/static/dashboard.html`` + ``.js`` + ``.css``, no build step; charts
drawn by uPlot, vendored in ``stream_app/static/``) polls ``/dashboard/api/series`` every second
and keeps a rolling window of:

* events/s in, predictions/s out, dead letters/s; p50/p99 event → prediction latency; batch sizes
  (mean, p99); dead letters by reason (running totals); consumer lag per input partition;
  predictions/s per model version, with a mark at every ``model-updates`` full record this worker
  handled (deploy, online, reset, rollback; rejected ones too);
* when a trainer answers (``http://WEB_BIND:TRAINER_PORT/metrics``, the ``nextaction trainer`` on
  this host): its prequential NDCG@10 and log loss per version, and a mark at each drift detection.

Where the numbers come from: every second a Faust timer (``dashboard_sample``) reads the same
Prometheus registry ``/metrics`` serves (:data:`stream_app.monitoring.REGISTRY`: one source of truth)
into a :class:`Sampler`, an in-memory ring buffer of :data:`WINDOW_SAMPLES` samples. Rates are
differences between two samples; quantiles come from the histograms' bucket counts over the last
:data:`QUANTILE_WINDOW_S` seconds (:func:`bucket_quantile`, Prometheus' ``histogram_quantile``
rule). Consumer lag is the one figure the registry lacks: it is read from the worker's consumer (end
offset − committed offset of each assigned input partition, the rule of ``/healthz``).

The **user inspector** (``/dashboard/api/user/<user_id>``) answers from the ``histories`` table
(and the state of events still in flight): the user's recent events and the latest prediction with
its top items (:func:`user_report`). A worker answers only for users of the partitions it holds; for
another user it says which partition holds the user (HTTP 421). The page lists the users of the last
predictions this worker delivered (:class:`RecentUsers`, in memory, bounded; a forgotten user is
dropped from it at once). Like ``/metrics``, the pages listen on ``WEB_BIND`` (127.0.0.1 by default):
whoever reaches the port can read any user's recent events held by this worker (docs/security.md).

To see these, :func:`install` wraps three of the pipeline's callables without changing them: the
batcher's deliverer (the users of each delivered batch), :meth:`~stream_app.pipeline.Pipeline.forget`
(drop the user from the recent list) and the ``model-updates`` listener's handler (the marks).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Iterable

from models.delta import label_parts
from models.schema import ACTIONS
from stream_app import health, monitoring, partitioning
from stream_app.ports import local_url
from stream_app.records import DELTA, ModelUpdate, UserState, decode_state
from stream_app.settings import SettingsType

log = logging.getLogger(__name__)

#: The page's files (the page, its script and style, uPlot and its licence).
STATIC = Path(__file__).resolve().parent / "static"
#: Samples kept (one a second: ten minutes).
WINDOW_SAMPLES = 600
#: Seconds between two samples (the timer) and between two trainer scrapes.
SAMPLE_INTERVAL_S, TRAINER_INTERVAL_S = 1.0, 2.0
#: The latency and batch-size quantiles cover the observations of the last this many seconds.
QUANTILE_WINDOW_S = 5.0
#: A trainer scrape older than this is not shown (the trainer stopped answering).
TRAINER_MAX_AGE_S = 10.0
#: Users kept in the recent list, and events of a user's history the inspector shows (newest first).
RECENT_USERS, HISTORY_SHOWN = 50, 20
#: Marks kept (model updates, drifts).
MARKS_KEPT = 200

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".LICENSE": "text/plain",
          ".md": "text/plain"}

#: One registry read: sample name → ``[(labels, value)]`` (``_created`` samples left out).
Snapshot = dict[str, list[tuple[dict[str, str], float]]]


# --- reading the registry (pure) ------------------------------------------------------------------------
def snapshot(families: Iterable[Any]) -> Snapshot:
    """The samples of prometheus-client metric families (``registry.collect()``, or the families
    :func:`prometheus_client.parser.text_string_to_metric_families` parses from a ``/metrics`` text).

    >>> from prometheus_client import CollectorRegistry, Counter
    >>> r = CollectorRegistry(); c = Counter("x", "help", ["why"], registry=r); c.labels("a").inc(2)
    >>> snapshot(r.collect())
    {'x_total': [({'why': 'a'}, 2.0)]}
    """
    out: Snapshot = {}
    for family in families:
        for s in family.samples:
            if not s.name.endswith("_created"):
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _matches(labels: dict[str, str], match: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


def total(snap: Snapshot, name: str, **match: str) -> float:
    """The sum of ``name``'s samples whose labels include ``match`` (0 when there are none).

    >>> total({"x_total": [({"why": "a"}, 2.0), ({"why": "b"}, 3.0)]}, "x_total"), total({}, "x_total")
    (5.0, 0.0)
    """
    return float(sum(v for labels, v in snap.get(name, ()) if _matches(labels, match)))


def by_label(snap: Snapshot, name: str, label: str) -> dict[str, float]:
    """``name``'s samples summed per value of ``label``.

    >>> by_label({"x_total": [({"why": "a"}, 2.0), ({"why": "b"}, 3.0)]}, "x_total", "why")
    {'a': 2.0, 'b': 3.0}
    """
    out: dict[str, float] = {}
    for labels, v in snap.get(name, ()):
        if label in labels:
            out[labels[label]] = out.get(labels[label], 0.0) + v
    return out


def buckets(snap: Snapshot, histogram: str, **match: str) -> list[tuple[float, float]]:
    """The cumulative buckets ``[(upper bound, count)]`` of a histogram (summed over the label sets
    matching ``match``), by upper bound; the last bound is ``inf``."""
    acc: dict[float, float] = {}
    for labels, v in snap.get(histogram + "_bucket", ()):
        if _matches(labels, match):
            le = float(labels["le"])
            acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def bucket_diff(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The observations made between two reads of one histogram's cumulative buckets.

    >>> bucket_diff([(1.0, 5.0), (math.inf, 9.0)], [(1.0, 2.0), (math.inf, 3.0)])
    [(1.0, 3.0), (inf, 6.0)]
    >>> bucket_diff([(1.0, 5.0), (math.inf, 9.0)], [])  # nothing before: all of them
    [(1.0, 5.0), (inf, 9.0)]
    """
    old = dict(before)
    return [(le, max(0.0, c - old.get(le, 0.0))) for le, c in now]


def bucket_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The ``q``-quantile of the observations counted in cumulative histogram buckets
    ``[(upper bound, count)]`` (ascending, the last bound ``inf``), by Prometheus'
    ``histogram_quantile`` rule: linear interpolation inside the bucket that holds the rank, the
    first bucket starting at 0, and the highest finite bound when the rank falls in the ``+Inf``
    bucket. ``None`` when there are no observations.

    >>> b = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    >>> [round(bucket_quantile(q, b), 4) for q in (0.5, 0.7, 0.99)]
    [0.01, 0.055, 0.91]
    >>> bucket_quantile(0.5, [(0.01, 0.0), (math.inf, 0.0)]) is None
    True
    >>> bucket_quantile(0.99, [(0.01, 1.0), (0.1, 1.0), (math.inf, 4.0)])  # in +Inf: the highest finite bound
    0.1
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"bucket_quantile: q must be in [0, 1] (got {q!r})")
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank and count > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        if not math.isinf(le):
            lower = le
        below = count
    return lower


def histogram_mean(cumulative: list[tuple[float, float]], total_sum: float) -> float | None:
    """Mean of the observations: the histogram's ``_sum`` over its count (``None`` when empty).

    >>> histogram_mean([(1.0, 2.0), (math.inf, 4.0)], 10.0), histogram_mean([], 0.0) is None
    (2.5, True)
    """
    n = cumulative[-1][1] if cumulative else 0.0
    return total_sum / n if n > 0 else None


def online_figures(snap: Snapshot) -> dict | None:
    """The trainer's figures in a snapshot of its metrics: prequential ``ndcg10``, ``log_loss`` and
    ``hr10`` per **full** version (the newest delta label of each: ``base+seq`` with the highest
    ``seq``), the shadow comparison, drift and learned-example counts. ``None`` when the snapshot has
    no prequential figures (no trainer, or one that has not learned yet).

    >>> snap = {"nextaction_online_prequential": [
    ...     ({"version": "abc+1", "metric": "ndcg10"}, 0.1), ({"version": "abc+3", "metric": "ndcg10"}, 0.3),
    ...     ({"version": "abc+3", "metric": "log_loss"}, 1.2)], "nextaction_online_drifts_total": [({}, 2.0)]}
    >>> f = online_figures(snap); f["ndcg10"], f["log_loss"], f["labels"], f["drifts"]
    ({'abc': 0.3}, {'abc': 1.2}, {'abc': 'abc+3'}, 2.0)
    >>> online_figures({}) is None
    True
    """
    rows = snap.get("nextaction_online_prequential")
    if not rows:
        return None
    newest: dict[str, tuple[int, str]] = {}
    for labels, _ in rows:
        base, seq = label_parts(labels.get("version", ""))
        if base not in newest or seq > newest[base][0]:
            newest[base] = (seq, labels.get("version", ""))
    out: dict[str, Any] = {"ndcg10": {}, "log_loss": {}, "hr10": {}}
    for labels, v in rows:
        base, _ = label_parts(labels.get("version", ""))
        metric = labels.get("metric")
        if metric in out and newest[base][1] == labels.get("version") and math.isfinite(v):
            out[metric][base] = v
    out["labels"] = {base: label for base, (_, label) in newest.items()}
    out["shadow"] = by_label(snap, "nextaction_online_shadow_ndcg10", "model")
    out["drifts"] = total(snap, "nextaction_online_drifts_total")
    out["learned"] = total(snap, "nextaction_online_examples_total", result="learned")
    return out


def _finite(x: float | None, digits: int = 6) -> float | None:
    return round(x, digits) if x is not None and math.isfinite(x) else None


# --- the ring buffer (pure) ------------------------------------------------------------------------------
class Sampler:
    """The dashboard's time series: one sample per :meth:`add` (a registry :func:`snapshot`, the
    consumer lag, the served version, the trainer's snapshot), at most ``window`` samples, plus the
    marks (:meth:`mark`: model updates, drifts).

    A sample (all rates per second since the previous sample, ``None`` where not yet known)::

        {"t": epoch s, "events_per_s", "predictions_per_s", "dlq_per_s",
         "p50_ms", "p99_ms" (event → prediction, last ``quantile_window_s``),
         "batch_mean", "batch_p99" (requests per inference batch, same window), "queue" (waiting requests),
         "dlq": {reason: total}, "lag": {"events[p]" | "rerouted[p]": records}, "lag_total",
         "versions": {full version: predictions/s}, "served": label,
         "online": None | {"ndcg10": {version: x}, "log_loss": {...}, "hr10": {...}, "labels", "shadow", "drifts", "learned"}}
    """

    def __init__(self, window: int = WINDOW_SAMPLES, quantile_window_s: float = QUANTILE_WINDOW_S,
                 marks_kept: int = MARKS_KEPT) -> None:
        if window < 2:
            raise ValueError(f"Sampler: window must be >= 2 samples (got {window!r})")
        self.samples: deque[dict] = deque(maxlen=window)
        self.marks: deque[dict] = deque(maxlen=marks_kept)
        self.quantile_window_s = quantile_window_s
        self._reads: deque[tuple[float, Snapshot]] = deque()  # the registry reads of the quantile window
        self._drifts: float | None = None

    def mark(self, t: float, kind: str, label: str, detail: str = "") -> dict:
        """Add a mark (``kind``: deploy, online, reset, rollback, rejected, drift) at time ``t``."""
        m = {"t": round(t, 3), "kind": kind, "label": label, "detail": detail}
        self.marks.append(m)
        return m

    def add(self, t: float, snap: Snapshot, *, lag: dict[str, int] | None = None, served: str | None = None,
            trainer: Snapshot | None = None) -> dict:
        """Append the sample at time ``t`` (epoch seconds, increasing) and return it."""
        prev = self._reads[-1] if self._reads else None
        self._reads.append((t, snap))
        while len(self._reads) > 2 and self._reads[1][0] <= t - self.quantile_window_s:
            self._reads.popleft()
        base = self._reads[0] if len(self._reads) > 1 else None

        def per_s(now: float, before: float | None) -> float | None:
            if prev is None or before is None or t <= prev[0]:
                return None
            return _finite(max(0.0, now - before) / (t - prev[0]), 3)

        def counter_rate(name: str) -> float | None:
            return per_s(total(snap, name), total(prev[1], name) if prev else None)

        # quantiles and means over the window only: the first sample has none (the registry's totals
        # since the process started are not "the last few seconds")
        latency = bucket_diff(buckets(snap, "nextaction_event_to_prediction_latency_seconds"),
                              buckets(base[1], "nextaction_event_to_prediction_latency_seconds")) if base else []
        batch_name = "nextaction_batch_size"
        batch = bucket_diff(buckets(snap, batch_name), buckets(base[1], batch_name)) if base else []
        batch_sum = total(snap, batch_name + "_sum") - total(base[1], batch_name + "_sum") if base else 0.0
        p50, p99 = bucket_quantile(0.5, latency), bucket_quantile(0.99, latency)
        versions_now = by_label(snap, "nextaction_predictions_out_total", "model_version")
        versions_before = by_label(prev[1], "nextaction_predictions_out_total", "model_version") if prev else {}
        versions = {v: per_s(n, versions_before.get(v, 0.0) if prev else None) for v, n in versions_now.items()}
        lag = dict(lag or {})
        online = online_figures(trainer) if trainer else None
        if online is not None:
            if self._drifts is not None and online["drifts"] > self._drifts:
                self.mark(t, "drift", f"drift ×{int(online['drifts'] - self._drifts)}",
                          "the trainer's drift detector fired on the prequential loss")
            self._drifts = online["drifts"]
        sample = {
            "t": round(t, 3),
            "events_per_s": counter_rate("nextaction_events_in_total"),
            "predictions_per_s": counter_rate("nextaction_predictions_out_total"),
            "dlq_per_s": counter_rate("nextaction_events_rejected_total"),
            "p50_ms": _finite(p50 * 1000 if p50 is not None else None, 3),
            "p99_ms": _finite(p99 * 1000 if p99 is not None else None, 3),
            "batch_mean": _finite(histogram_mean(batch, batch_sum), 2),
            "batch_p99": _finite(bucket_quantile(0.99, batch), 2),
            "queue": total(snap, "nextaction_queue_depth"),
            "dlq": by_label(snap, "nextaction_events_rejected_total", "reason"),
            "lag": lag,
            "lag_total": sum(lag.values()) if lag else None,
            "versions": {v: r for v, r in versions.items() if r is not None},
            "served": served,
            "online": online,
        }
        self.samples.append(sample)
        return sample

    def since(self, t: float | None) -> list[dict]:
        """The samples after time ``t`` (all of them for ``None``)."""
        return [s for s in self.samples if t is None or s["t"] > t]


# --- the user inspector (pure) ---------------------------------------------------------------------------
def user_report(user_id: str, state: UserState | None, *, partition: int | None, held: set[int] | None,
                topic: str = "events", in_flight: int = 0, limit: int = HISTORY_SHOWN) -> tuple[int, dict]:
    """``(HTTP status, JSON body)`` of the inspector for one user.

    ``partition``: the partition that owns the user (``None``: unknown, the events are not re-routed
    by key); ``held``: the partitions of ``topic`` this worker holds (``None``: unknown); ``state``: the
    user's state as stored (with the events in flight), ``None`` when there is none. 200 with the
    ``limit`` newest events (newest first) and the latest prediction; 404 when this worker has no
    state for the user; 421 when the user belongs to a partition another worker holds.

    >>> from models.predictor import Prediction
    >>> from models.schema import EventSeq
    >>> from stream_app.records import StoredPrediction
    >>> h = EventSeq.from_columns(["a", "b"], ["view", "cart"], [1000, 2000])
    >>> st = UserState(h, StoredPrediction("m1", 2000, 0, 7, Prediction([.5, .5, 0, 0, 0], [("c", .4)], 9.0)))
    >>> code, body = user_report("u1", st, partition=0, held={0, 1})
    >>> code, [e["item_id"] for e in body["history"]], body["prediction"]["top_items"]
    (200, ['b', 'a'], [['c', 0.4]])
    >>> user_report("u1", st, partition=2, held={0, 1})[0], user_report("u9", None, partition=0, held={0})[0]
    (421, 404)
    """
    where = {"user_id": user_id, "partition": partition, "held_partitions": sorted(held) if held is not None else None}
    if partition is not None and held is not None and partition not in held:
        holders = ", ".join(map(str, sorted(held))) or "none"
        return 421, {**where, "status": "elsewhere",
                     "message": f"this user belongs to partition {partition} of {topic!r}, which another worker holds "
                                f"(this one holds: {holders}); ask that worker's dashboard (`nextaction status` "
                                f"lists the workers and their partitions)"}
    if state is None or (len(state.history) == 0 and state.last is None):
        return 404, {**where, "status": "unknown",
                     "message": "no state for this user on this worker (never seen, expired or forgotten)"}
    h = state.history
    n = len(h)
    history = [{"ts": int(h.ts[k]), "action": ACTIONS[int(h.actions[k])], "item_id": h.items[k],
                "category": h.categories[k], "device": h.devices[k], "location": h.locations[k]}
               for k in range(n - 1, max(-1, n - 1 - limit), -1)]
    prediction = None
    if state.last is not None:
        last, p = state.last, state.last.prediction
        prediction = {"model_version": last.version, "event_ts": last.event_ts, "partition": last.partition,
                      "offset": last.offset, "action_probs": {a: _finite(x) for a, x in p.action_dict().items()},
                      "top_items": [[i, _finite(s)] for i, s in p.top_items], "next_gap_s": _finite(p.next_gap_s, 3),
                      **({"explanation": p.explanation} if p.explanation else {})}
    return 200, {**where, "status": "ok", "history_len": n, "history": history, "prediction": prediction,
                 "seen_ms": state.seen, "in_flight": in_flight}


class RecentUsers:
    """The users of the last predictions delivered, newest first, at most ``size`` (an LRU).

    >>> r = RecentUsers(2); r.saw(["a", "b"], 1.0); r.saw(["a"], 2.0); r.saw(["c"], 3.0)
    >>> r.newest(), r.forget("a"), r.newest()
    ([('c', 3.0), ('a', 2.0)], None, [('c', 3.0)])
    """

    def __init__(self, size: int = RECENT_USERS) -> None:
        self.size = size
        self._users: OrderedDict[str, float] = OrderedDict()

    def saw(self, users: Iterable[str], t: float) -> None:
        for u in users:
            self._users[u] = t
            self._users.move_to_end(u)
        while len(self._users) > self.size:
            self._users.popitem(last=False)

    def forget(self, user: str) -> None:
        self._users.pop(user, None)

    def newest(self, n: int | None = None) -> list[tuple[str, float]]:
        items = list(reversed(self._users.items()))
        return items if n is None else items[:n]


# --- the worker side -------------------------------------------------------------------------------------
def trainer_metrics_url(settings: SettingsType) -> str:
    """Where the trainer of this host serves its metrics (``nextaction trainer``: ``WEB_BIND:TRAINER_PORT``).

    >>> from stream_app.settings import Settings
    >>> trainer_metrics_url(Settings(web_bind="0.0.0.0", trainer_port=7001))
    'http://127.0.0.1:7001/metrics'
    """
    return local_url(settings.web_bind, settings.trainer_port, "/metrics")


def partition_lags(consumer: Any, topics: dict[str, str]) -> dict[str, int]:
    """Lag per assigned partition of ``topics`` (topic name → the label's prefix, e.g. ``events``),
    ``{"events[0]": 12}`` (:func:`stream_app.health.partition_lags`)."""
    lags = health.partition_lags(consumer, topics)
    return {f"{topics[tp.topic]}[{tp.partition}]": n
            for tp, n in sorted(lags.items(), key=lambda x: (x[0].topic, x[0].partition))}


class Dashboard:
    """The dashboard of one worker: the sampler, the recent users, the trainer scrape and the
    inspector's table reads (see the module docstring)."""

    def __init__(self, app: Any, pipeline: Any, settings: SettingsType) -> None:
        self.app, self.pipeline, self.settings = app, pipeline, settings
        self.sampler = Sampler()
        self.recent = RecentUsers()
        self.trainer_url = trainer_metrics_url(settings)
        self.trainer_snap: tuple[float, Snapshot] | None = None  # (monotonic time, snapshot) of the last scrape
        self.trainer_error: str | None = None
        self.started = time.time()
        self._files: dict[str, tuple[str, str]] = {}
        self._inputs = {settings.topic_events: "events", settings.topic_repartition: "rerouted"}

    # --- sampling ---
    def tick(self, now: float | None = None) -> dict:
        """Take one sample (the timer calls this every :data:`SAMPLE_INTERVAL_S`)."""
        now = time.time() if now is None else now
        snap = snapshot(monitoring.REGISTRY.collect())
        try:
            lag = partition_lags(self.app.consumer, self._inputs)
        except Exception as exc:  # noqa: BLE001 - no consumer yet (starting, or a test app)
            log.debug("dashboard: no consumer lag (%s)", exc)
            lag = None
        trainer = snap if snap.get("nextaction_online_prequential") else self._fresh_trainer()
        return self.sampler.add(now, snap, lag=lag, served=self.served(), trainer=trainer)

    def _fresh_trainer(self) -> Snapshot | None:
        if self.trainer_snap is None or time.monotonic() - self.trainer_snap[0] > TRAINER_MAX_AGE_S:
            return None
        return self.trainer_snap[1]

    async def scrape_trainer(self, timeout_s: float = 1.0) -> None:
        """Read the trainer's ``/metrics`` (:func:`trainer_metrics_url`); a failure is remembered and
        shown, never raised."""
        import aiohttp  # noqa: PLC0415 - Faust's web server already imported it
        from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
                async with session.get(self.trainer_url) as resp:
                    if resp.status != 200:
                        raise ValueError(f"HTTP {resp.status}")
                    text = await resp.text()
            snap = snapshot(text_string_to_metric_families(text))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError) as exc:
            if self.trainer_error is None:
                log.debug("dashboard: no trainer metrics at %s (%s)", self.trainer_url, exc)
            self.trainer_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return
        self.trainer_snap, self.trainer_error = (time.monotonic(), snap), None

    def served(self) -> str | None:
        batcher = getattr(self.pipeline, "batcher", None)
        return str(batcher.predictor.version) if batcher is not None else None

    def on_model_update(self, kind: str, value: bytes | None, result: str, t: float | None = None) -> None:
        """Mark a ``model-updates`` full record this worker handled (deltas are many: not marked)."""
        if kind == DELTA:
            return
        t = time.time() if t is None else t
        try:
            update = ModelUpdate.decode(value)
        except ValueError:
            self.sampler.mark(t, "rejected", "bad record", result)
            return
        label = update.version or (update.sha256 or "")[:12] or "?"
        if result.startswith("swapped:"):
            self.sampler.mark(t, update.reason or "deploy", label, f"n={update.n}" if update.n is not None else "")
        elif result.startswith("rejected"):
            self.sampler.mark(t, "rejected", label, result)

    # --- the inspector ---
    def held_partitions(self) -> set[int] | None:
        """The ``histories`` partitions this worker holds as active (``None``: no assignment at all,
        e.g. ``agent.test_context()``: then every local partition answers, as in the idle sweep)."""
        changelog = self.pipeline.t.histories.changelog_topic_name
        try:
            actives = self.app.assignor.assigned_actives()
        except Exception:  # noqa: BLE001
            return None
        if not actives:
            return None
        return {tp.partition for tp in actives if tp.topic == changelog}

    def user(self, user_id: str) -> tuple[int, dict]:
        """The inspector's answer for ``user_id`` (:func:`user_report`)."""
        s, t = self.settings, self.pipeline.t
        # the modulus the pipeline routes by: the topic's partition count once it checked the topic
        n = self.pipeline._partition_counts.get(s.topic_events, s.partitions)  # noqa: SLF001
        partition = partitioning.owner(user_id.encode(), n) if t.repartition is not None else None
        held = self.held_partitions()
        if partition is not None and held is not None and partition not in held:
            return user_report(user_id, None, partition=partition, held=held, topic=s.topic_events)
        pending = self.pipeline.pending.get(user_id)
        if pending is not None:
            state, in_flight = pending.state, pending.inflight
        else:
            in_flight = 0
            try:
                state = decode_state(self._stored(user_id, partition, held))
            except ValueError as exc:
                return 500, {"user_id": user_id, "partition": partition, "status": "unreadable", "message": str(exc)}
        return user_report(user_id, state, partition=partition, held=held, topic=s.topic_events, in_flight=in_flight)

    def _stored(self, user_id: str, partition: int | None, held: set[int] | None) -> bytes | None:
        """The user's stored value, read from the RocksDB of the partitions that may hold it (not through
        the table: a read outside an event would search every local store, stale ones of revoked
        partitions included, and fill Faust's key index)."""
        table = self.pipeline.t.histories
        store = table.data
        dbs = getattr(store, "_dbs", None)
        if dbs is None:  # another store (memory://)
            return table.get(user_id)
        key = store._encode_key(user_id)
        parts = [partition] if partition is not None else sorted(held if held is not None else dbs)
        for p in parts:
            db = dbs.get(p)
            if db is None or (held is not None and p not in held):
                continue
            value = db.get(key)
            if value is not None:
                return bytes(value)
        return None

    # --- the API ---
    def worker(self) -> dict:
        try:
            assigned = sorted(f"{self._inputs[tp.topic]}[{tp.partition}]" for tp in self.app.consumer.assignment()
                              if tp.topic in self._inputs)
        except Exception:  # noqa: BLE001 - not started
            assigned = []
        return {"app_id": self.settings.app_id, "host": socket.gethostname(), "pid": os.getpid(),
                "web_port": self.settings.web_port, "served": self.served(), "assigned": assigned,
                "started": round(self.started, 3), "events_topic": self.settings.topic_events}

    def series(self, since: float | None = None) -> dict:
        """The body of ``/dashboard/api/series``: the samples after ``since`` (all for ``None``)."""
        return {"interval_s": SAMPLE_INTERVAL_S, "window": self.sampler.samples.maxlen, "now": round(time.time(), 3),
                "worker": self.worker(), "samples": self.sampler.since(since), "marks": list(self.sampler.marks),
                "trainer": {"url": self.trainer_url, "ok": self._fresh_trainer() is not None,
                            "error": self.trainer_error},
                "recent_users": [{"user_id": u, "t": round(t, 3)} for u, t in self.recent.newest(20)]}

    def static(self, name: str) -> tuple[str, str] | None:
        """``(text, content type)`` of a file of :data:`STATIC` (``None``: no such file)."""
        if name not in self._files:
            path = STATIC / name
            if "/" in name or name.startswith(".") or not path.is_file():
                return None
            self._files[name] = (path.read_text(encoding="utf-8"), _TYPES.get(path.suffix, "text/plain"))
        return self._files[name]


def install(app: Any, pipeline: Any, settings: SettingsType) -> Dashboard:
    """Register the dashboard's pages and timers on ``app`` (called by :func:`stream_app.agents.install`)."""
    dash = Dashboard(app, pipeline, settings)
    app.dashboard = dash

    deliver = pipeline.deliver  # the batcher is built with pipeline.deliver when the first event arrives

    async def deliver_and_note(results: list) -> None:
        dash.recent.saw([r.request.user_id for r in results], time.time())
        await deliver(results)

    pipeline.deliver = deliver_and_note

    forget = pipeline.forget

    async def forget_and_drop(user: str, *args: Any, **kwargs: Any) -> str:
        dash.recent.forget(user)
        return await forget(user, *args, **kwargs)

    pipeline.forget = forget_and_drop

    listener = getattr(pipeline, "model_updates", None)
    if listener is not None:
        handle = listener.handle

        async def handle_and_mark(kind: str, value: bytes | None) -> str:
            result = await handle(kind, value)
            try:
                dash.on_model_update(kind, value, result)
            except Exception:  # noqa: BLE001 - a mark never disturbs the update
                log.exception("dashboard: marking a model update failed")
            return result

        listener.handle = handle_and_mark

    @app.timer(SAMPLE_INTERVAL_S, name="dashboard_sample")
    async def dashboard_sample():
        try:
            dash.tick()
        except Exception:  # noqa: BLE001 - a failed sample leaves a gap, never stops the worker
            log.exception("dashboard: sample failed")

    @app.timer(TRAINER_INTERVAL_S, name="dashboard_trainer")
    async def dashboard_trainer():
        await dash.scrape_trainer()

    no_store = {"Cache-Control": "no-store"}

    @app.page("/dashboard")
    async def dashboard_page(web, request):
        text, ctype = dash.static("dashboard.html")
        return web.text(text, content_type=ctype, headers=dict(no_store))

    @app.page("/dashboard/static/{name}")
    async def dashboard_static(web, request, name):
        found = dash.static(name)
        if found is None:
            return web.json({"error": f"no such file: {name[:100]!r}"}, status=404)
        return web.text(found[0], content_type=found[1])

    @app.page("/dashboard/api/series")
    async def dashboard_series(web, request):
        since = request.query.get("since")
        try:
            t = float(since) if since else None
        except ValueError:
            return web.json({"error": f"'since' must be epoch seconds (got {since[:50]!r})"}, status=400)
        return web.json(dash.series(t), headers=dict(no_store))

    @app.page("/dashboard/api/user/{user_id:.+}")
    async def dashboard_user(web, request, user_id):
        status, body = dash.user(user_id)
        return web.json(body, status=status, headers=dict(no_store))

    return dash
