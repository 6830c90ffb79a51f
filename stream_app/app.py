"""The Faust app: topics and tables, declared top-down. Behaviour lives in :mod:`stream_app.agents`.

``faust -A stream_app.app:app worker`` imports :data:`app`, built once from the process settings
by :func:`create_app`. Tests build their own apps with :func:`create_app` (other settings, a temp
data dir, a test predictor), since one Faust app is bound to one set of topic/table names.

State, all keyed by user id (so the ``events`` partition, the table partitions and the worker
that owns a user line up), all RocksDB with a changelog topic (recovered after a restart or a
rebalance):

``histories``        user → :class:`~stream_app.records.UserState`: the last ``window_events`` events
                     within ``window_ttl_s`` (:mod:`stream_app.history`), the latest prediction,
                     which the user's next event turns into an ``outcomes`` record, and the user's
                     activity: events per tumbling window of *event time* (``activity_window_s``; the
                     newest :data:`~stream_app.records.ACTIVITY_WINDOWS_KEPT` windows).

One table, one record per user: an event's whole effect on the state is one table write and one
changelog record (a windowed ``activity`` table of its own cost one more of each per event:
benchmarks/RESULTS.md, "Throughput per worker").

Privacy (docs/privacy.md): the per-user topics get ``retention.ms`` (``topic_retention_s``) and the
changelogs ``max.compaction.lag.ms`` (``changelog_compaction_lag_s``) where Faust creates them.

A user's partition is the one the Java/murmur2 rule gives the user id (:mod:`stream_app.partitioning`);
an event that arrives elsewhere goes there through the repartition topic first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faust

from models.predictor import Predictor
from stream_app import faust_fixes, status
from stream_app.kafka_security import faust_credentials
from stream_app.kafka_admin import topic_config
from stream_app.settings import SettingsType, get_settings


@dataclass
class Topology:
    """Everything :func:`create_app` declared, for the agents and for tests."""

    settings: SettingsType
    events: faust.TopicT
    dlq: faust.TopicT
    predictions: faust.TopicT
    outcomes: faust.TopicT
    histories: Any  # faust.Table[str, bytes]
    repartition: faust.TopicT | None = None  # None: reroute_mispartitioned is off


def rocksdb_options(settings: SettingsType) -> dict[str, int]:
    """The RocksDB options of every table partition (Faust's ``Table(options=...)``), in one place.

    Faust opens one RocksDB per table partition, each with its own memtables and block cache; its
    defaults (64 MiB × 3 memtables, a 2 GiB cache) let a worker's resident memory grow by gigabytes
    with the partitions it holds. These bound it (settings ``ROCKSDB_*``):

    >>> from stream_app.settings import Settings
    >>> rocksdb_options(Settings(rocksdb_write_buffer_mb=8, rocksdb_write_buffers=2, rocksdb_block_cache_mb=32))
    {'write_buffer_size': 8388608, 'max_write_buffer_number': 2, 'block_cache_size': 33554432, 'block_cache_compressed_size': 0}
    """
    mib = 1 << 20
    return {"write_buffer_size": settings.rocksdb_write_buffer_mb * mib,
            "max_write_buffer_number": settings.rocksdb_write_buffers,
            "block_cache_size": settings.rocksdb_block_cache_mb * mib,
            "block_cache_compressed_size": 0}  # python-rocksdb only; rocksdict has none


def faust_app(settings: SettingsType, *, store: str = "rocksdb://") -> faust.App:
    """The Faust app of ``settings`` with the worker's configuration and no topics, tables or agents
    (:func:`create_app` declares those; benchmarks/e2e/faust_floor.py runs a bare agent on it), after
    :func:`stream_app.faust_fixes.apply`. The data dir is ``data_dir/app_id`` (its parents are
    created at worker start)."""
    faust_fixes.apply()  # Faust rebalance/fetch/commit bugs that lose or repeat events: stream_app/faust_fixes.py
    data_dir = settings.data_dir.expanduser().absolute() / settings.app_id
    return faust.App(
        settings.app_id,
        broker=settings.broker_url,
        store=store,
        datadir=str(data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        key_serializer="raw",
        value_serializer="raw",
        web_bind=settings.web_bind,
        web_port=settings.web_port,
        web_host=settings.web_bind,
        # Faust's built-in views serve every table's contents (``/table/...``: any user's history) and
        # the router (``/router``) to anyone who reaches the port: off. The worker serves only its own
        # pages (``/metrics``, ``/healthz``; stream_app/agents.py).
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        broker_credentials=faust_credentials(settings),  # SASL / TLS: stream_app/kafka_security.py
        autodiscover=False,
        stream_wait_empty=True,  # rebalance/shutdown waits until the batcher acked in-flight events
        table_standby_replicas=0,
        broker_commit_interval=settings.commit_interval_s,
        # a dead worker's partitions move after the session timeout (docs/reliability.md); heartbeats
        # stay well inside it (Kafka's rule of thumb: at most a third)
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 5),
        consumer_group_instance_id=settings.group_instance_id or None,
        producer_linger=settings.producer_linger_ms / 1000.0,
        producer_max_batch_size=256 * 1024,
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        processing_guarantee=settings.processing_guarantee,
        **({"broker_max_poll_records": settings.max_poll_records} if settings.max_poll_records else {}),
    )


def create_app(settings: SettingsType | None = None, *, predictor_factory: Callable[[SettingsType], Predictor]
               | None = None, store: str = "rocksdb://", publisher: Any = None) -> faust.App:
    """Build the Faust app, its topics and tables, and register the agents.

    Arguments:
        settings: defaults to :func:`~stream_app.settings.get_settings`.
        predictor_factory: builds the predictor served at start (default:
            :func:`stream_app.pipeline.start_predictor`).
        store: Faust table store (``rocksdb://`` in production and in tests).
        publisher: where outputs go (default: the app's Kafka producer); tests pass a recorder,
            since ``agent.test_context()`` runs without a broker.
    """
    settings = settings or get_settings()
    data_dir = settings.data_dir.expanduser().absolute() / settings.app_id
    app = faust_app(settings, store=store)

    # --- topics (names from settings; JSON bodies are encoded/decoded with orjson by hand) -------
    events = app.topic(settings.topic_events, key_serializer="raw", value_serializer="raw",
                       partitions=settings.partitions, config=topic_config(settings, settings.topic_events))
    dlq = app.topic(settings.topic_dlq, key_serializer="raw", value_serializer="raw",
                    config=topic_config(settings, settings.topic_dlq))
    predictions = app.topic(settings.topic_predictions, key_serializer="raw", value_serializer="raw",
                            partitions=settings.partitions, config=topic_config(settings, settings.topic_predictions))
    outcomes = app.topic(settings.topic_outcomes, key_serializer="raw", value_serializer="raw",
                         partitions=settings.partitions, config=topic_config(settings, settings.topic_outcomes))
    # Events that arrived on a partition their key does not belong to, forwarded to the right one
    # (stream_app.partitioning). Internal: the worker creates it. Same partition count as ``events``,
    # so Faust's assignor co-partitions it with ``events`` and the tables (one owner per user).
    repartition = (app.topic(settings.topic_repartition, key_serializer="raw", value_serializer="raw",
                             partitions=settings.partitions, internal=True)
                   if settings.reroute_mispartitioned else None)
    # ``model-updates`` is not a Faust topic: every worker follows it without a consumer group
    # (stream_app.updates.ModelUpdateListener), so each update reaches every worker.

    # --- tables ------------------------------------------------------------------------------------
    lag = {"max.compaction.lag.ms": str(settings.changelog_compaction_lag_s * 1000)} \
        if settings.changelog_compaction_lag_s else {}
    store_options = rocksdb_options(settings)
    histories = app.Table("histories", partitions=settings.partitions, key_type=bytes, value_type=bytes,
                          help="user -> UserState: bounded event window, latest prediction, activity counts",
                          extra_topic_configs=lag,
                          options=store_options)

    @app.on_worker_init.connect
    def _make_data_dir(sender, **kwargs):  # Faust creates the datadir itself, but not its parents
        data_dir.mkdir(parents=True, exist_ok=True)
        if settings.processing_guarantee == "exactly_once":
            # The local RocksDB stores also hold writes of transactions that were never committed (a
            # worker killed mid-transaction): with exactly_once the tables start from the committed
            # changelog only (measured restore: docs/reliability.md, exactly-once).
            shutil.rmtree(Path(app.conf.tabledir), ignore_errors=True)

    app.topology = Topology(settings, events, dlq, predictions, outcomes, histories, repartition)

    # --- behaviour ---------------------------------------------------------------------------------
    from stream_app import agents  # noqa: PLC0415 - agents need the declarations above

    agents.install(app, app.topology, predictor_factory=predictor_factory, publisher=publisher)
    status.watch_worker(app)  # /metrics says who this worker is, what it serves (stream_app/status.py)
    return app


app = create_app()
topology: Topology = app.topology
