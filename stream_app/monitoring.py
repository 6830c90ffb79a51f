"""Prometheus metrics of the stream worker, served at ``/metrics`` on the worker's web server.

The metrics live in one module-level registry (not prometheus-client's global default one), so
importing this module twice, or building several Faust apps in one test process, never
registers a name twice.

>>> def events_in() -> float:  # the counter as /metrics shows it
...     line = next(l for l in render()[0].decode().splitlines() if l.startswith("nextaction_events_in_total"))
...     return float(line.split()[-1])
>>> before = events_in(); EVENTS_IN.inc(); events_in() - before
1.0
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

EVENTS_IN = Counter("nextaction_events_in", "Messages read from the events topic", registry=REGISTRY)
EVENTS_REROUTED = Counter("nextaction_events_rerouted", "Valid events whose key belongs to another partition (by "
                          "the Java/murmur2 rule) than they arrived on, forwarded there through the repartition "
                          "topic (producer partitioner mismatch: README, \"Producers and partitions\")",
                          registry=REGISTRY)
EVENTS_REJECTED = Counter("nextaction_events_rejected", "Messages dead-lettered, by reason", ["reason"],
                          registry=REGISTRY)
EVENTS_DUPLICATE = Counter("nextaction_events_duplicate",
                           "Events already in the user's history (redelivery after a restart)", registry=REGISTRY)
PREDICTIONS_OUT = Counter("nextaction_predictions_out", "Predictions published, by full model version (online "
                          "deltas on top of it are not told apart here)", ["model_version"], registry=REGISTRY)
EVENTS_LATE = Counter("nextaction_events_late", "Events older than the user's last prediction (arrived out of "
                      "order): predicted, but no outcome record (it would have a negative gap)", registry=REGISTRY)
OFFSET_GAPS = Counter("nextaction_offset_gaps", "Offset ranges Faust skipped on an input partition and counts as "
                      "acked (a transactional producer's markers: one offset each; anything wider is a fetch that "
                      "resumed past unread records: stream_app/faust_fixes.py)", ["topic"], registry=REGISTRY)
OFFSET_GAP_OFFSETS = Counter("nextaction_offset_gap_offsets", "Offsets inside those gaps", ["topic"],
                             registry=REGISTRY)
PRODUCE_FAILED = Counter("nextaction_produce_failed", "Output batches whose produce failed after the producer's "
                         "retries (the worker crashes without committing past them)", registry=REGISTRY)
OUTCOMES_OUT = Counter("nextaction_outcomes_out", "Outcome records published", registry=REGISTRY)
PREDICT_ERRORS = Counter("nextaction_predict_errors", "Predictor calls that raised (before retries)",
                         registry=REGISTRY)
OBSERVE_ERRORS = Counter("nextaction_observe_errors", "predictor.observe() calls that raised", registry=REGISTRY)
BATCH_SIZE = Histogram("nextaction_batch_size", "Requests per inference batch", buckets=_BATCH_BUCKETS,
                       registry=REGISTRY)
PREDICT_LATENCY = Histogram("nextaction_predict_latency_seconds", "Wall time of one batch in the executor",
                            buckets=_LATENCY_BUCKETS, registry=REGISTRY)
EVENT_TO_PREDICTION = Histogram("nextaction_event_to_prediction_latency_seconds",
                                "Event arrival at the worker to prediction publish", buckets=_LATENCY_BUCKETS,
                                registry=REGISTRY)
STAGE_LATENCY = Histogram("nextaction_stage_latency_seconds",
                          "Where an event's time in the worker goes, per request: queue (submitted -> its batch "
                          "starts), infer (its batch's predict + observe), deliver (batch done -> published)",
                          ["stage"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
INFERENCE_PROCESS = Histogram("nextaction_inference_process_seconds",
                              "Per batch inside the inference process (serve_process): wall time from request to "
                              "reply, and the CPU time its thread used meanwhile (wall >> cpu: it waited for a core)",
                              ["clock"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
GC_PAUSE = Histogram("nextaction_gc_pause_seconds",
                     "Python garbage-collection pauses of the worker process, by generation (2 = full)",
                     ["generation"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
ASSIGNED_PARTITIONS = Gauge("nextaction_assigned_partitions", "Partitions of each input topic this worker holds "
                            "(set at every rebalance)", ["topic"], registry=REGISTRY)
STALE_FETCHES = Counter("nextaction_stale_fetches", "Fetches overtaken by a rebalance's seek: their records were "
                        "dropped and the partitions sought again to their committed offsets "
                        "(stream_app.faust_fixes.fetch_active_snapshot)", registry=REGISTRY)
PARTITIONS_STALLED = Gauge("nextaction_partitions_stalled", "Assigned input partitions whose records wait while "
                           "their committed offset has not moved for HEALTH_STALL_S (each is logged with the "
                           "consumer's state: stream_app.health.PartitionWatch)", ["topic"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("nextaction_queue_depth", "Prediction requests waiting for a batch", registry=REGISTRY)
METADATA_RETRIES = Counter("nextaction_metadata_retries", "Failed or timed-out metadata requests of the start-up "
                           "changelog check, retried (the broker was unreachable)", registry=REGISTRY)
MODEL_SWAPS = Counter("nextaction_model_swaps", "Predictor hot swaps", registry=REGISTRY)
MODEL_UPDATES = Counter("nextaction_model_updates", "model-updates records, by result (applied, skipped, rejected: "
                        "full versions; delta, gap, ignored: online deltas)",
                        ["result"], registry=REGISTRY)
FORGETS = Counter("nextaction_forgets", "Forget control records handled, by reason (request: `nextaction forget`; "
                  "idle: the sweep) and result (forgotten: this worker held state for the user and deleted it; "
                  "absent: it held none, e.g. another partition's copy of a request; kept: an idle request for a "
                  "user active again)", ["reason", "result"], registry=REGISTRY)
SWEEPS = Counter("nextaction_idle_sweeps", "Idle-user sweeps run by this worker", registry=REGISTRY)

# --- the online trainer's process (stream_app.training), on its own web port -----------------------------
ONLINE_EXAMPLES = Counter("nextaction_online_examples", "outcomes read by the trainer, by what became of them "
                          "(learned, out_of_order, rate_limited, bad_record, forget: a forget marker, duplicate: an outcome already read)", ["result"],
                          registry=REGISTRY)
ONLINE_PREQUENTIAL = Gauge("nextaction_online_prequential", "Rolling prequential metric of each served version "
                           "(scored before anything learns from the example)", ["version", "metric"],
                           registry=REGISTRY)
ONLINE_SHADOW = Gauge("nextaction_online_shadow_ndcg10", "Rolling NDCG@10 of the served models vs the frozen shadow "
                      "over the rollback window", ["model"], registry=REGISTRY)
ONLINE_STEPS = Counter("nextaction_online_steps", "Training steps, by result (ok, or the guard's reason)",
                       ["result"], registry=REGISTRY)
ONLINE_STEP_SECONDS = Histogram("nextaction_online_step_seconds", "Wall time of one learn() call (score, filter, "
                                "step)", buckets=_LATENCY_BUCKETS, registry=REGISTRY)
ONLINE_PUBLISHED = Counter("nextaction_online_published", "model-updates records the trainer wrote, by kind "
                           "(delta, online, reset, rollback)", ["kind"], registry=REGISTRY)
ONLINE_DRIFTS = Counter("nextaction_online_drifts", "Drift detections on the prequential loss", registry=REGISTRY)
TEXT_ROWS = Counter("nextaction_text_rows", "New items the serving model gave a row from their text "
                    "(docs/cold-start.md), by result: added, or failed (the encoder failed: the item keeps its "
                    "hash-bucket row until the trainer's delta brings one)", ["result"], registry=REGISTRY)
ONLINE_NEW_ITEMS = Counter("nextaction_online_new_items", "Items the trainer's vocabulary took in online, by where "
                           "their row started (text: the text projection, the row the workers served them with; "
                           "context: their category's mean row or hash bucket, and the previous item)", ["start"],
                           registry=REGISTRY)
ONLINE_VOCAB = Gauge("nextaction_online_vocabulary_items", "Items in the trainer's vocabulary", registry=REGISTRY)
ONLINE_PENDING = Gauge("nextaction_online_pending_examples", "Examples the trainer read and has not learned yet "
                       "(a step takes TRAINER_BATCH of them, or those that waited TRAINER_MAX_WAIT_S)", registry=REGISTRY)
ONLINE_FORGOTTEN = Counter("nextaction_online_forgotten_examples", "Examples dropped at forget markers (privacy), by "
                           "where they were (pending: read, not learned yet; replay: in the replay buffer)", ["where"],
                           registry=REGISTRY)
ONLINE_REJECTED = Counter("nextaction_online_rejected_full_records", "Full records of the lineage the trainer passed "
                          "over when it resumed (the workers reject them too), by reason (stream_app.updates.admit's, "
                          "checkpoint_unreadable, hash_mismatch)", ["reason"], registry=REGISTRY)
ONLINE_LAG = Gauge("nextaction_online_lag_records", "outcomes records not yet read by the trainer", registry=REGISTRY)


# --- what a worker says about itself (read at each scrape) --------------------------------------------------
class WorkerCollector:
    """What a worker says about itself, read at each scrape from :attr:`source` (set at start by
    :func:`stream_app.status.watch_worker`; none in the trainer's process): ``nextaction_worker_info``
    (who it is: app id, host, pid, its consumer-group member id), ``nextaction_model_served_info`` (the
    version it serves now, and that version's full ``base``) and ``nextaction_consumer_lag_records`` (per
    input partition it holds: records past its committed offset). ``nextaction status`` joins these with
    the consumer group the broker describes."""

    FAMILIES = (("nextaction_worker_info", "This worker (value 1)", ("app_id", "host", "pid", "member_id")),
                ("nextaction_model_served_info", "The model version this worker serves now (value 1; base: its "
                 "full version, without online deltas)", ("version", "base")),
                ("nextaction_consumer_lag_records", "Records past the committed offset, per input partition this "
                 "worker holds", ("topic", "partition")))

    def __init__(self) -> None:
        #: ``() -> {"info": {label: value}, "version": str | None, "lag": {(topic, partition): records}}``
        self.source = None

    def describe(self):
        return self._families({})

    def collect(self):
        try:
            sample = self.source() if self.source is not None else {}
        except Exception:  # noqa: BLE001 - a scrape must not fail on a worker still starting
            sample = {}
        return self._families(sample)

    def _families(self, sample: dict):
        from prometheus_client.core import GaugeMetricFamily

        info, version, lag = (GaugeMetricFamily(name, doc, labels=labels) for name, doc, labels in self.FAMILIES)
        if sample.get("info"):
            info.add_metric([str(sample["info"].get(k, "")) for k in self.FAMILIES[0][2]], 1)
        if sample.get("version"):
            version.add_metric([sample["version"], sample["version"].partition("+")[0]], 1)
        for (topic, partition), n in sorted((sample.get("lag") or {}).items()):
            lag.add_metric([topic, str(partition)], n)
        return [info, version, lag]


WORKER = WorkerCollector()
REGISTRY.register(WORKER)

CONTENT_TYPE = "text/plain"  # aiohttp refuses a charset inside content_type; version param is optional


def watch_gc() -> None:
    """Time every garbage collection of this process into :data:`GC_PAUSE` (idempotent).

    >>> import gc
    >>> watch_gc(); watch_gc()
    >>> before = GC_PAUSE.labels("2")._sum.get(); _ = gc.collect()
    >>> GC_PAUSE.labels("2")._sum.get() > before, sum(getattr(c, "_nextaction", False) for c in gc.callbacks)
    (True, 1)
    """
    import gc
    import time

    if any(getattr(cb, "_nextaction", False) for cb in gc.callbacks):
        return
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            GC_PAUSE.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - started[0])

    on_gc._nextaction = True  # type: ignore[attr-defined]
    gc.callbacks.append(on_gc)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE
