"""The floor of Faust's per-message path: the least a Faust agent can do per event, for comparison.

``faust -A benchmarks.e2e.faust_floor:app worker`` (started by ``benchmarks/e2e_throughput.py
--faust-floor``) reads the same ``events`` topic as the pipeline with the same Faust configuration
(:func:`stream_app.app.faust_app`, Faust fixes applied) and RocksDB options, and per event only
parses the JSON and sends one small record to the
``predictions`` topic (``partition``, ``offset``, ``latency_ms``: what the benchmark's accounting
reads). With ``NX_FLOOR_TABLE_WRITES=1`` it also writes the event into a RocksDB-backed table (one
changelog record), like the pipeline's one state write per event.

No validation, no state logic, no model, no outcomes, no ordered acks (Faust's automatic ack):
whatever a worker built on Faust's agent API does per event, it cannot be cheaper than this.
"""

from __future__ import annotations

import os
import time

import orjson

from stream_app.app import faust_app, rocksdb_options
from stream_app.settings import get_settings

settings = get_settings()
TABLE_WRITES = int(os.environ.get("NX_FLOOR_TABLE_WRITES", "0"))

data_dir = settings.data_dir.expanduser().absolute() / settings.app_id
data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates the datadir, but not its parents
app = faust_app(settings)  # the worker's Faust configuration (stream_app/app.py), fixes applied
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
