"""The fleet's status (``nextaction status``), from both ends: the broker and the workers' ``/metrics``.

**What a worker says about itself.** :func:`watch_worker` (called by :func:`stream_app.app.create_app`)
points :data:`stream_app.monitoring.WORKER` at :func:`worker_sample`, so each scrape of ``/metrics``
carries ``nextaction_worker_info{app_id,host,pid,member_id}`` (its consumer-group member id: the key
that joins it to the group the broker describes), ``nextaction_model_served_info{version,base}`` and
``nextaction_consumer_lag_records{topic,partition}``.

**What ``nextaction status`` reads.** From the broker, without joining the group: the app's topics and
their partitions, each input partition's first and end offsets and the offset the worker group
(``APP_ID``) committed (lag = end - committed; nothing committed yet: end - first), the group's members
with the partitions each holds (DescribeGroups), and the newest ``model-updates`` record. From each
worker's ``/metrics``, scraped twice ``interval`` seconds apart: who it is, the version it serves,
events/s and predictions/s over the interval, event→prediction p50/p99 (over the interval when events
arrived in it, else since the worker started), dead-lettered messages by reason (since it started).

The gathering is async I/O (:func:`gather`); everything that turns raw data into the report is a pure
function of parsed data (:func:`parse_metrics`, :func:`worker_figures`, :func:`group_members`,
:func:`partition_lag`, :func:`build_report`), and :func:`render` draws it. The report (``--json``) has
these keys, stable across releases (new keys may be added, none renamed or removed within
``status_version`` 1):

=====================  =======================================================================================
``status_version``     1
``generated_at``       ISO-8601 UTC time of the report
``broker``             ``{"url", "brokers"}``: the bootstrap servers and how many brokers answered
``group``              ``{"id", "state", "protocol", "members": [{"member_id", "client_id", "host",
                       "partitions": {topic: [partition, ...]}, "worker"}]}``: ``worker`` is the URL of the
                       worker that says it is this member (or ``null``)
``topics``             ``[{"name", "role", "partitions", "messages"}]``: ``role`` one of ``input``, ``output``,
                       ``dlq``, ``control``, ``changelog``, ``internal``; ``messages`` = sum of end - first offsets
``lag``                ``[{"topic", "partition", "first", "end", "committed", "lag", "member_id"}]`` per input
                       partition (``committed`` ``null`` when the group committed none)
``lag_total``          the sum of ``lag``
``workers``            ``[{"url", "ok", "error", "app_id", "host", "pid", "member_id", "model_version",
                       "model_base", "assigned": {topic: n}, "events_in", "predictions_out", "events_per_s",
                       "predictions_per_s", "latency_ms": {"p50", "p99", "window"}, "dlq": {reason: n}}]``
``dlq``                ``{reason: n}`` summed over the workers that answered
``last_model_update``  ``{"kind", "version", "path", "reason", "offset", "timestamp_ms", "at", "age_s"}`` or
                       ``null``: the newest record on ``model-updates`` (``kind`` ``full`` or ``delta``)
=====================  =======================================================================================

>>> rows = partition_lag({("events", 0): 0, ("events", 1): 5}, {("events", 0): 10, ("events", 1): 9},
...                      {("events", 0): 7}, {("events", 0): "m-1"})
>>> [(r["partition"], r["committed"], r["lag"], r["member_id"]) for r in rows]
[(0, 7, 3, 'm-1'), (1, None, 4, None)]
>>> round(histogram_quantile([(1.0, 2), (5.0, 9), (float("inf"), 10)], 0.5), 3)  # 1 + 4 * (5 - 2) / (9 - 2)
2.714
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from stream_app import health, monitoring
from stream_app.ports import local_url
from stream_app.settings import SettingsType

STATUS_VERSION = 1
#: How long one worker scrape may take before the worker counts as not answering.
SCRAPE_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------------------------------- #
# the worker's side: what /metrics says about the worker
# --------------------------------------------------------------------------------------------------- #

def watch_worker(app: Any) -> None:
    """Make this process's ``/metrics`` describe the worker ``app`` (:func:`worker_sample`, read at each
    scrape). The last app built in a process wins (tests build several)."""
    monitoring.WORKER.source = lambda: worker_sample(app)


def worker_sample(app: Any) -> dict[str, Any]:
    """``{"info", "version", "lag"}`` of a running Faust worker (what :class:`stream_app.monitoring.WorkerCollector`
    exposes). Parts not known yet (no consumer, no predictor) are left out."""
    settings = app.topology.settings
    consumer = getattr(app, "_consumer", None)  # not ``app.consumer``: that would create one
    info = {"app_id": settings.app_id, "host": socket.gethostname(), "pid": os.getpid(),
            "member_id": _member_id(consumer) or ""}
    batcher = getattr(getattr(app, "pipeline", None), "batcher", None)
    version = str(batcher.predictor.version) if batcher is not None else None
    inputs = {settings.topic_events, settings.topic_repartition}
    try:
        lags = health.partition_lags(consumer, inputs) if consumer is not None else {}
    except Exception:  # noqa: BLE001 - the consumer thread has not started (yet)
        lags = {}
    return {"info": info, "version": version, "lag": {(tp.topic, tp.partition): n for tp, n in lags.items()}}


def _member_id(consumer: Any) -> str | None:
    """The consumer-group member id of Faust's aiokafka consumer (``None`` before it joined)."""
    try:
        return consumer._thread._ensure_consumer()._coordinator.member_id or None  # noqa: SLF001
    except Exception:  # noqa: BLE001 - not started, or another transport
        return None


# --------------------------------------------------------------------------------------------------- #
# pure: parsed data -> report
# --------------------------------------------------------------------------------------------------- #

def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of a Prometheus exposition text, by sample name (``nextaction_events_in_total``,
    ``..._bucket``, ...): ``{name: [(labels, value), ...]}`` (prometheus_client's own parser).

    >>> parse_metrics('# TYPE x_total counter\\nx_total{reason="a"} 2.0\\n')
    {'x_total': [({'reason': 'a'}, 2.0)]}
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _total(samples: Mapping[str, list], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def _by_label(samples: Mapping[str, list], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in samples.get(name, []):
        out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + v
    return out


def _buckets(samples: Mapping[str, list], name: str) -> list[tuple[float, float]]:
    """``[(upper bound, cumulative count)]`` of a histogram without other labels, by bound."""
    return sorted((float(labels["le"]), v) for labels, v in samples.get(f"{name}_bucket", []) if "le" in labels)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram ``[(upper bound, count)]`` (Prometheus' rule:
    linear within the bucket, the last finite bound for the ``+Inf`` bucket); ``None`` when empty.

    >>> round(histogram_quantile([(0.01, 0), (0.1, 100), (float("inf"), 100)], 0.99), 6)
    0.0991
    >>> histogram_quantile([(0.01, 0), (float("inf"), 0)], 0.5) is None
    True
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def worker_figures(url: str, first: Mapping[str, list], second: Mapping[str, list], interval_s: float) -> dict:
    """One worker's row of the report from two parsed scrapes ``interval_s`` apart (:func:`parse_metrics`).

    Rates are over the interval; p50/p99 event→prediction over the interval when predictions were
    made in it (``window: "interval"``), else since the worker started (``"since_start"``); DLQ
    counts are since the worker started.
    """
    info = (second.get("nextaction_worker_info") or [({}, 0.0)])[0][0]
    served = second.get("nextaction_model_served_info") or []
    version = served[0][0].get("version") if served else None
    base = served[0][0].get("base") if served else None
    dt = max(interval_s, 1e-9)
    events = (_total(first, "nextaction_events_in_total"), _total(second, "nextaction_events_in_total"))
    preds = (_total(first, "nextaction_predictions_out_total"), _total(second, "nextaction_predictions_out_total"))
    hist = "nextaction_event_to_prediction_latency_seconds"
    now, before = _buckets(second, hist), dict(_buckets(first, hist))
    window = [(b, c - before.get(b, 0.0)) for b, c in now]
    window_name = "interval"
    if not window or window[-1][1] <= 0:
        window, window_name = now, "since_start"
    p50, p99 = histogram_quantile(window, 0.5), histogram_quantile(window, 0.99)
    return {
        "url": url, "ok": True, "error": None,
        "app_id": info.get("app_id"), "host": info.get("host"),
        "pid": int(info["pid"]) if str(info.get("pid", "")).isdigit() else None,
        "member_id": info.get("member_id") or None,
        "model_version": version, "model_base": base,
        "assigned": {t: int(v) for t, v in _by_label(second, "nextaction_assigned_partitions", "topic").items()},
        "events_in": int(events[1]), "predictions_out": int(preds[1]),
        "events_per_s": round(max(0.0, events[1] - events[0]) / dt, 1),
        "predictions_per_s": round(max(0.0, preds[1] - preds[0]) / dt, 1),
        "latency_ms": {"p50": None if p50 is None else round(p50 * 1000, 1),
                       "p99": None if p99 is None else round(p99 * 1000, 1),
                       "window": window_name if p50 is not None else None},
        "dlq": {r: int(v) for r, v in sorted(_by_label(second, "nextaction_events_rejected_total", "reason").items())
                if v > 0},
    }


def worker_failed(url: str, error: str) -> dict:
    """The row of a worker whose ``/metrics`` did not answer."""
    return {"url": url, "ok": False, "error": error, "app_id": None, "host": None, "pid": None, "member_id": None,
            "model_version": None, "model_base": None, "assigned": {}, "events_in": None, "predictions_out": None,
            "events_per_s": None, "predictions_per_s": None,
            "latency_ms": {"p50": None, "p99": None, "window": None}, "dlq": {}}


def group_members(response: Any, group_id: str) -> dict:
    """``{"id", "state", "protocol", "members"}`` of ``group_id`` in a DescribeGroups response (aiokafka's
    ``describe_consumer_groups`` answer, or a list of them), each member's assignment decoded with the
    consumer protocol (Faust's assignor uses it too). A group the broker does not know is ``Dead`` with
    no members."""
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    responses = response if isinstance(response, list) else [response]
    for resp in responses:
        for error_code, gid, state, _ptype, protocol, members in resp.groups:
            if gid != group_id:
                continue
            out = []
            for member_id, client_id, host, _meta, assignment in members:
                parts: dict[str, list[int]] = {}
                if assignment:
                    for topic, partitions in ConsumerProtocolMemberAssignment.decode(assignment).assignment:
                        parts[topic] = sorted(partitions)
                out.append({"member_id": member_id, "client_id": client_id, "host": host.lstrip("/"),
                            "partitions": dict(sorted(parts.items())), "worker": None})
            return {"id": group_id, "state": state or ("error %d" % error_code), "protocol": protocol or None,
                    "members": sorted(out, key=lambda m: m["member_id"])}
    return {"id": group_id, "state": "Dead", "protocol": None, "members": []}


def partition_lag(first: Mapping[tuple[str, int], int], end: Mapping[tuple[str, int], int],
                  committed: Mapping[tuple[str, int], int], owners: Mapping[tuple[str, int], str]) -> list[dict]:
    """One row per partition of ``end``: the group's lag (end - committed; with nothing committed, end -
    first: the group starts at the earliest offset) and the member that holds it."""
    rows = []
    for tp in sorted(end):
        done = committed.get(tp)
        if done is not None and done < 0:  # the broker's "no offset" answer
            done = None
        lag = end[tp] - (done if done is not None else first.get(tp, 0))
        rows.append({"topic": tp[0], "partition": tp[1], "first": first.get(tp, 0), "end": end[tp],
                     "committed": done, "lag": max(0, lag), "member_id": owners.get(tp)})
    return rows


def topic_role(settings: SettingsType, name: str) -> str:
    """What ``name`` is to the app: ``input``, ``output``, ``dlq``, ``control``, ``changelog``, ``internal``.

    >>> from stream_app.settings import Settings
    >>> s = Settings()
    >>> [topic_role(s, t) for t in ("events", "predictions", "events.dlq", "model-updates",
    ...                            "nextaction-histories-changelog", "nextaction-events-repartition")]
    ['input', 'output', 'dlq', 'control', 'changelog', 'input']
    """
    if name in (settings.topic_events, settings.topic_repartition):
        return "input"
    if name in (settings.topic_predictions, settings.topic_outcomes):
        return "output"
    if name == settings.topic_dlq:
        return "dlq"
    if name == settings.topic_model_updates:
        return "control"
    if name.startswith(f"{settings.app_id}-") and name.endswith("-changelog"):
        return "changelog"
    return "internal"


def describe_update(kind: str, value: bytes | None, offset: int, timestamp_ms: int, now_ms: int) -> dict:
    """The ``last_model_update`` of the report from the newest ``model-updates`` record."""
    from stream_app.records import DELTA, ModelUpdate

    version = path = reason = None
    if kind == DELTA:
        try:
            from models.delta import ModelDelta

            version = ModelDelta.decode(value or b"").label
        except Exception:  # noqa: BLE001 - a bad record is reported as such
            reason = "unreadable delta"
    else:
        try:
            update = ModelUpdate.decode(value)
            version, path, reason = update.version, update.path, update.reason
        except ValueError as exc:
            reason = f"bad record: {exc}"
    return {"kind": kind, "version": version, "path": path, "reason": reason, "offset": offset,
            "timestamp_ms": timestamp_ms, "at": _iso(timestamp_ms / 1000),
            "age_s": round(max(0, now_ms - timestamp_ms) / 1000, 1)}


def build_report(settings: SettingsType, broker: Mapping[str, Any], workers: list[dict],
                 now_s: float | None = None) -> dict:
    """The report (module docstring) from :func:`gather`'s broker snapshot and the worker rows."""
    group = broker["group"]
    by_member = {w["member_id"]: w["url"] for w in workers if w.get("member_id")}
    inputs = {settings.topic_events, settings.topic_repartition}
    owners: dict[tuple[str, int], str] = {}
    members = []
    for m in group["members"]:
        members.append({**m, "worker": by_member.get(m["member_id"])})
        for topic, parts in m["partitions"].items():
            for p in parts:
                owners[(topic, p)] = m["member_id"]
    input_tps = {tp: n for tp, n in broker["end"].items() if tp[0] in inputs}
    lag = partition_lag(broker["first"], input_tps, broker["committed"], owners)
    topics = []
    for name, n in sorted(broker["partitions"].items(), key=lambda kv: (_ROLE_ORDER.index(topic_role(settings, kv[0])),
                                                                          kv[0])):
        messages = sum(broker["end"].get((name, p), 0) - broker["first"].get((name, p), 0) for p in range(n))
        topics.append({"name": name, "role": topic_role(settings, name), "partitions": n, "messages": messages})
    dlq: dict[str, int] = {}
    for w in workers:
        for reason, n in w["dlq"].items():
            dlq[reason] = dlq.get(reason, 0) + n
    return {
        "status_version": STATUS_VERSION,
        "generated_at": _iso(time.time() if now_s is None else now_s),
        "broker": {"url": settings.bootstrap_servers, "brokers": broker["brokers"]},
        "group": {"id": group["id"], "state": group["state"], "protocol": group["protocol"], "members": members},
        "topics": topics,
        "lag": lag,
        "lag_total": sum(r["lag"] for r in lag),
        "workers": workers,
        "dlq": dict(sorted(dlq.items())),
        "last_model_update": broker.get("last_update"),
    }


_ROLE_ORDER = ["input", "output", "dlq", "control", "changelog", "internal"]


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------------- #
# I/O: the broker and the workers
# --------------------------------------------------------------------------------------------------- #

def worker_url(text: str) -> str:
    """A worker's ``/metrics`` URL from ``host:port``, ``http://host:port`` or a full URL.

    >>> worker_url("127.0.0.1:6066"), worker_url("http://w1:6066/"), worker_url("https://w2/x/metrics")
    ('http://127.0.0.1:6066/metrics', 'http://w1:6066/metrics', 'https://w2/x/metrics')
    """
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    return url


def default_worker(settings: SettingsType) -> str:
    """The local worker's ``/metrics`` (``WEB_BIND``/``WEB_PORT``; a wildcard bind is asked on loopback)."""
    return worker_url(local_url(settings.web_bind, settings.web_port))


async def scrape(session: Any, url: str) -> str:
    async with session.get(url) as resp:
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}")
        return await resp.text()


async def scrape_workers(urls: list[str], interval_s: float) -> list[dict]:
    """Each worker's row (:func:`worker_figures`), from two scrapes ``interval_s`` apart."""
    import aiohttp

    async def safe(session: Any, url: str) -> str | BaseException:
        try:
            return await scrape(session, url)
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
            return exc

    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.monotonic()
        first = await asyncio.gather(*(safe(session, u) for u in urls))
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
        t1 = time.monotonic()
        second = await asyncio.gather(*(safe(session, u) for u in urls))
        dt = t1 - t0  # between the starts of the two rounds
    rows = []
    for url, a, b in zip(urls, first, second):
        bad = b if isinstance(b, BaseException) else a if isinstance(a, BaseException) else None
        if bad is not None:
            rows.append(worker_failed(url, f"{type(bad).__name__}: {bad}" if str(bad) else type(bad).__name__))
            continue
        try:
            rows.append(worker_figures(url, parse_metrics(a), parse_metrics(b), dt))
        except ValueError as exc:  # not a Prometheus exposition
            rows.append(worker_failed(url, f"not Prometheus metrics: {exc}"))
    return rows


async def broker_snapshot(settings: SettingsType, timeout: float = 10.0) -> dict:
    """What the broker knows: ``{"brokers", "partitions": {topic: n}, "first"/"end": {(topic, p): offset},
    "committed": {(topic, p): offset}, "group", "last_update"}``. :class:`~stream_app.errors.BrokerError`
    naming the broker when it does not answer."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from stream_app.kafka_admin import app_topics, start_client
    from stream_app.kafka_security import client_kwargs
    from stream_app.records import update_kind

    ms = int(timeout * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                request_timeout_ms=ms)
    await start_client(settings, admin.start, admin.close, timeout)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings),
                                group_id=None, enable_auto_commit=False, request_timeout_ms=ms,
                                client_id=f"{settings.app_id}-status")
    try:
        await start_client(settings, consumer.start, consumer.stop, timeout)
        brokers = len((await admin.describe_cluster()).get("brokers", []))
        existing = set(await admin.list_topics())
        wanted = [t for t in app_topics(settings) if t in existing]
        wanted += sorted(t for t in existing if t.startswith(f"{settings.app_id}-") and t not in wanted
                         and t.endswith("-changelog"))
        partitions: dict[str, int] = {}
        for desc in await admin.describe_topics(wanted) if wanted else []:
            if desc.get("error_code", 0) == 0:
                partitions[desc["topic"]] = len(desc["partitions"])
        tps = [TopicPartition(t, p) for t, n in partitions.items() for p in range(n)]
        first = {(tp.topic, tp.partition): o for tp, o in (await consumer.beginning_offsets(tps)).items()} if tps else {}
        end = {(tp.topic, tp.partition): o for tp, o in (await consumer.end_offsets(tps)).items()} if tps else {}
        group = group_members(await admin.describe_consumer_groups([settings.app_id]), settings.app_id)
        inputs = [tp for tp in tps if tp.topic in (settings.topic_events, settings.topic_repartition)]
        offsets = await admin.list_consumer_group_offsets(settings.app_id, partitions=inputs) if inputs else {}
        committed = {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()}
        last = None
        topic = settings.topic_model_updates
        newest = [(tp, end[(tp.topic, tp.partition)]) for tp in tps if tp.topic == topic
                  and end[(tp.topic, tp.partition)] > first[(tp.topic, tp.partition)]]
        if newest:
            consumer.assign([tp for tp, _ in newest])
            records = []
            for tp, hi in newest:
                consumer.seek(tp, hi - 1)
                got = await consumer.getmany(tp, timeout_ms=ms)
                records += got.get(tp, [])
            if records:
                rec = max(records, key=lambda r: r.timestamp)
                last = describe_update(update_kind(rec.headers), rec.value, rec.offset, rec.timestamp,
                                       int(time.time() * 1000))
        return {"brokers": brokers, "partitions": partitions, "first": first, "end": end, "committed": committed,
                "group": group, "last_update": last}
    finally:
        for client in (consumer.stop, admin.close):
            try:
                await asyncio.wait_for(client(), 5.0)
            except Exception:  # noqa: BLE001 - closing after a failure must not hide it
                pass


async def gather(settings: SettingsType, worker_urls: list[str], interval_s: float = 2.0,
                 timeout: float = 10.0) -> dict:
    """The report (module docstring): the broker snapshot and the workers' scrapes, concurrently."""
    try:
        async with asyncio.TaskGroup() as tasks:  # a broker that does not answer cancels the scrapes
            broker = tasks.create_task(broker_snapshot(settings, timeout))
            workers = tasks.create_task(scrape_workers(worker_urls, interval_s))
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return build_report(settings, broker.result(), workers.result())


# --------------------------------------------------------------------------------------------------- #
# rendering
# --------------------------------------------------------------------------------------------------- #

def render(report: Mapping[str, Any]) -> list[Any]:
    """The report as rich renderables: a heading line and aligned tables (topics, lag per partition, the
    group's members, the workers, dead letters by reason) and the last model update."""
    from functools import partial

    from rich import box
    from rich.markup import escape
    from rich.table import Table as RichTable
    from rich.text import Text

    Table = partial(RichTable, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left",  # noqa: N806
                    title_style="bold")
    out: list[Any] = []
    g = report["group"]
    n_brokers, n_members = report["broker"]["brokers"], len(g["members"])
    out.append(Text.from_markup(
        f"[bold]Kafka[/] {escape(report['broker']['url'])} ({n_brokers} broker{'s' * (n_brokers != 1)}) · "
        f"[bold]group[/] {escape(g['id'])}: {escape(str(g['state']))}, {n_members} member{'s' * (n_members != 1)}\n"
        f"[bold]lag[/] {report['lag_total']:,} · [dim]{report['generated_at']}[/]"))

    t = Table(title="topics")
    for col, kw in (("topic", {}), ("role", {}), ("partitions", {"justify": "right"}),
                    ("messages", {"justify": "right"})):
        t.add_column(col, **kw)
    for row in report["topics"]:
        t.add_row(escape(row["name"]), row["role"], str(row["partitions"]), f"{row['messages']:,}")
    out += [Text(""), t]

    holder = {m["member_id"]: worker_name(m["worker"]) if m.get("worker") else short_member(m["member_id"])
              for m in g["members"]}
    t = Table(title="consumer lag (broker: end offset - committed offset)")
    num = {"justify": "right", "no_wrap": True}
    owners = {r["member_id"] for r in report["lag"]}
    held_by = len(owners) > 1 or None in owners  # one member holds them all: the members table says who
    for col, kw in (("topic", {"no_wrap": True, "overflow": "ellipsis", "max_width": 30}), ("partition", num),
                    ("end", num), ("committed", num), ("lag", num)) + ((("held by", {"no_wrap": True}),) if held_by
                                                                       else ()):
        t.add_column(col, **kw)
    for r in report["lag"]:
        who = r["member_id"]
        t.add_row(escape(r["topic"]), str(r["partition"]), f"{r['end']:,}",
                  "-" if r["committed"] is None else f"{r['committed']:,}",
                  f"[bold red]{r['lag']:,}[/]" if r["lag"] else "0",
                  *(("[yellow]nobody[/]" if who is None else escape(holder.get(who, short_member(who))),)
                    if held_by else ()))
    out += [Text(""), t]

    inputs = {r["topic"] for r in report["lag"]}
    t = Table(title="group members (broker)")
    for col, kw in (("member", {"no_wrap": True}), ("host", {}), ("input partitions held", {}),
                    ("worker", {"no_wrap": True})):
        t.add_column(col, **kw)
    for m in g["members"]:
        held = "; ".join(f"{escape(topic)} {_ranges(parts)}" for topic, parts in m["partitions"].items()
                         if topic in inputs) or "none"
        t.add_row(escape(short_member(m["member_id"])), escape(m["host"]), held,
                  escape(worker_name(m["worker"]) if m["worker"] else "-"))
    out += [Text(""), t]

    t = Table(title="workers (/metrics)")
    for col, kw in (("worker", {"no_wrap": True}), ("model", {"no_wrap": True}),
                    ("events/s", {"justify": "right"}), ("pred/s", {"justify": "right"}),
                    ("p50 / p99 ms", {"justify": "right"}), ("DLQ", {"justify": "right"})):
        t.add_column(col, **kw)
    for w in report["workers"]:
        if not w["ok"]:
            t.add_row(escape(worker_name(w["url"])), f"[red]not answering: {escape(str(w['error']))}[/]",
                      "", "", "", "")
            continue
        lat = w["latency_ms"]
        lat_s = "-" if lat["p50"] is None else f"{lat['p50']:.1f} / {lat['p99']:.1f}"
        if lat["window"] == "since_start":
            lat_s += "*"
        t.add_row(escape(worker_name(w["url"])), escape(w["model_version"] or "-"),
                  f"{w['events_per_s']:,.1f}", f"{w['predictions_per_s']:,.1f}", lat_s,
                  f"{sum(w['dlq'].values()):,}")
    out += [Text(""), t]
    if any(w["ok"] and w["latency_ms"]["window"] == "since_start" for w in report["workers"]):
        out.append(Text("* no prediction in the interval: latency since the worker started", style="dim"))

    if report["dlq"]:
        t = Table(title="dead-lettered by reason (workers, since they started)")
        t.add_column("reason")
        t.add_column("messages", justify="right")
        for reason, n in report["dlq"].items():
            t.add_row(escape(reason), f"{n:,}")
        out += [Text(""), t]

    out.append(Text(""))
    u = report["last_model_update"]
    if u is None:
        out.append(Text("last model update: none on the model-updates topic"))
    else:
        what = f"{u['kind']} {u['version'] or '?'}" + (f" ({u['reason']})" if u["reason"] else "") + \
               (f" from {u['path']}" if u["path"] else "")
        out.append(Text(f"last model update: {what}, {u['at']} ({_age(u['age_s'])} ago, offset {u['offset']})"))
    return out


def worker_name(url: str) -> str:
    """``host:port`` of a worker's URL.

    >>> worker_name("http://127.0.0.1:6066/metrics")
    '127.0.0.1:6066'
    """
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def short_member(member_id: str) -> str:
    """A member id without the long tail of its uuid.

    >>> short_member("faust-0.15.3-54945bc3-8d21-4ad5-af01-eadaafcf3a91"), short_member("w-1")
    ('faust-0.15.3-54945bc3', 'w-1')
    """
    import re

    m = re.fullmatch(r"(.*-[0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", member_id)
    return m.group(1) if m else member_id


def _ranges(parts: Iterable[int]) -> str:
    """``0-3,7`` for ``[0, 1, 2, 3, 7]``.

    >>> _ranges([0, 1, 2, 3, 7, 9, 10])
    '0-3,7,9-10'
    """
    out: list[str] = []
    run: list[int] = []
    for p in sorted(parts):
        if run and p == run[-1] + 1:
            run.append(p)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [p]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def _age(seconds: float) -> str:
    """``42 s``, ``3 min``, ``5 h``, ``2 d``.

    >>> _age(42), _age(180), _age(5 * 3600), _age(2 * 86400)
    ('42 s', '3 min', '5 h', '2 d')
    """
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
