"""The floor of Faust's per-message path: the least a Faust agent can do per event, for comparison.

``faust -A benchmarks.e2e.faust_floor:app worker`` (started by ``benchmarks/e2e_throughput.py
--faust-floor``) reads the same ``events`` topic as the pipeline with the same consumer, producer
and RocksDB settings (the performance-relevant part of :func:`stream_app.app.create_app`, Faust
fixes applied), and per event only parses the JSON and sends one small record to the
``predictions`` topic (``partition``, ``offset``, ``latency_ms``: what the benchmark's accounting
reads). With ``NX_FLOOR_TABLE_WRITES=1`` it also writes the event into a RocksDB-backed table (one
changelog record), like the pipeline's one state write per event.

No validation, no state logic, no model, no outcomes, no ordered acks (Faust's automatic ack):
whatever a worker built on Faust's agent API does per event, it cannot be cheaper than this.
"""

from __future__ import annotations

import os
import time

import faust
import orjson

from stream_app import faust_fixes
from stream_app.app import rocksdb_options
from stream_app.kafka_security import faust_credentials
from stream_app.settings import get_settings

settings = get_settings()
TABLE_WRITES = int(os.environ.get("NX_FLOOR_TABLE_WRITES", "0"))

faust_fixes.apply()
data_dir = settings.data_dir.expanduser().absolute() / settings.app_id
data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates the datadir, but not its parents
app = faust.App(
    settings.app_id,
    broker=settings.broker_url,
    store="rocksdb://",
    datadir=str(data_dir),
    topic_partitions=settings.partitions,
    topic_replication_factor=1,
    key_serializer="raw",
    value_serializer="raw",
    web_bind=settings.web_bind,
    web_port=settings.web_port,
    web_host=settings.web_bind,
    web_router_enabled=False,
    web_tables_enabled=False,
    web_graph_enabled=False,
    web_stats_enabled=False,
    broker_credentials=faust_credentials(settings),  # SASL / TLS like the worker (stream_app/kafka_security.py)
    autodiscover=False,
    table_standby_replicas=0,
    broker_commit_interval=settings.commit_interval_s,
    producer_linger=settings.producer_linger_ms / 1000.0,
    producer_max_batch_size=256 * 1024,
    stream_buffer_maxsize=settings.stream_buffer_maxsize,
)
events = app.topic(settings.topic_events, key_serializer="raw", value_serializer="raw")
predictions = app.topic(settings.topic_predictions, key_serializer="raw", value_serializer="raw")
# Named like the pipeline's state table, so the benchmark's pre-created changelog topic is used.
table = (app.Table("histories", partitions=settings.partitions, key_type=bytes, value_type=bytes,
                   options=rocksdb_options(settings)) if TABLE_WRITES else None)


@app.agent(events, name="floor", concurrency=1)
async def floor(stream):
    async for event in stream.events():
        msg = event.message
        t0 = time.time()
        ev = orjson.loads(msg.value)
        if table is not None:
            table[msg.key] = msg.value
        await predictions.send(key=msg.key, value=orjson.dumps({
            "partition": msg.partition, "offset": msg.offset, "user_id": ev.get("user_id"),
            "model_version": "faust-floor", "latency_ms": (time.time() - t0) * 1000.0}))
