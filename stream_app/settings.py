"""One settings object for the whole product, read once at start.

Every field can be set with an environment variable ``NEXTACTION_<FIELD>`` (upper case), e.g.
``NEXTACTION_BROKER_URL=kafka://broker:9092``. The CLI passes its options through
:func:`get_settings` overrides; nothing else reads the environment.

>>> s = Settings(window_events=20)
>>> s.window_events, s.topic_events, s.broker_url
(20, 'events', 'kafka://127.0.0.1:9092')
>>> Settings(window_events=0)
Traceback (most recent call last):
...
models.errors.ConfigError: 'window_events' = 0: must be >= 1
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.errors import ConfigError

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nextaction"


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEXTACTION_", extra="forbid", frozen=True)

    # --- Kafka ---------------------------------------------------------------------------------
    broker_url: str = "kafka://127.0.0.1:9092"
    app_id: str = "nextaction"
    topic_events: str = "events"
    topic_dlq: str = "events.dlq"
    topic_predictions: str = "predictions"
    topic_outcomes: str = "outcomes"
    topic_model_updates: str = "model-updates"
    partitions: int = 4
    # Producer linger (ms): how long the producer waits to fill a batch (every event makes ~5 Kafka
    # messages: 3 changelog records + prediction + outcome). Up to this much latency is added per
    # publish at low rates. 5 vs 20 ms (and commit 1 vs 2 s, gc_freeze) measured within noise on
    # the shared 2-core box (benchmarks/RESULTS.md, e2e-analysis), so the defaults stay as they were.
    producer_linger_ms: float = 5.0
    # Offset commit interval (s). A commit first flushes the producer. At-least-once either way: a
    # crash reprocesses at most about this much input.
    commit_interval_s: float = 1.0
    # Faust's producer buffer for table changelog records: past this many, Faust stops feeding the
    # stream until it drains ("producer buffer full"). Faust's 100 is less than one delivered batch
    # writes (one histories record per event), so at ~1,000 events/s it stalled the stream for 9-31 ms
    # about once a second (benchmarks/RESULTS.md, e2e-analysis). A full prediction queue's worth.
    producer_buffer_max_messages: int = 4096
    # Faust: messages buffered per partition stream and records per consumer poll (0 = Faust default).
    stream_buffer_maxsize: int = 4096
    max_poll_records: int = 0
    # gc.freeze() the start-up heap once the worker serves (and in the inference process), so full
    # collections skip it: at ~1,000 ev/s the worker's full-GC pauses went from 38 ms on average
    # (p99 bucket <= 100 ms) to 9 ms (<= 50 ms); nextaction_gc_pause_seconds on /metrics.
    gc_freeze: bool = True
    # --- embedded broker (``nextaction kafka start``) -------------------------------------------
    kafka_version: str = "3.9.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_home: Path = CACHE_ROOT / "kafka"  # jars, outside the clone, shared by every checkout
    # --- state ---------------------------------------------------------------------------------
    data_dir: Path = Path("var")
    window_events: int = 50  # per-user history bound by count ...
    window_ttl_s: int = 7 * 24 * 3600  # ... and by age, relative to the user's newest event
    activity_window_s: int = 3600  # tumbling window of the per-user activity counts
    # --- validation ----------------------------------------------------------------------------
    max_event_bytes: int = 16_384
    max_future_skew_s: int = 300  # events stamped further ahead of the worker clock are rejected
    max_event_age_s: int = 0  # 0 = accept any past timestamp (replays of old logs)
    # --- prediction ----------------------------------------------------------------------------
    top_k: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint: Path | None = None
    # at start, apply the newest ``model-updates`` record (the fleet's current version) over ``checkpoint``
    model_updates_catch_up: bool = True
    max_batch: int = 256
    max_wait_ms: float = 5.0
    predict_queue: int = 4096
    serve_threads: int = 0  # intra-op threads for CPU inference; 0 = cores - 1 (the event loop keeps one)
    serve_compile: bool = False  # torch.compile the model (CUDA nodes)
    # catalogue scan precision before the exact rescoring of the best k + 32 (models.serving):
    # auto = bf16 on CUDA, and on CPUs with AVX512-BF16/AMX for fp32 item tables > 8 MiB; else float32
    serve_score_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # run the Transformer in a child process (stream_app.remote): inference outside the worker's GIL
    serve_process: bool = True
    # GIL switch interval of the worker process (Python's default is 5 ms): the inference thread
    # releases the GIL around every torch op and must win it back from a busy event loop each time
    gil_switch_interval_ms: float = 5.0
    kv_cache_users: int = 100_000  # per-user attention key/value cache: at most this many users ...
    kv_cache_mb: int = 1024  # ... and this many MiB
    kv_overflow: Literal["exact", "evict"] = "exact"  # at max_len: rebuild (exact) or drop oldest token
    kv_refresh_every: int = 16  # with "evict": rebuild after this many dropped tokens
    # --- operations ----------------------------------------------------------------------------
    web_bind: str = "127.0.0.1"
    web_port: int = 6066
    log_level: str = "info"

    @field_validator("partitions", "window_events", "window_ttl_s", "activity_window_s", "max_event_bytes",
                     "top_k", "max_batch", "predict_queue", "kafka_port", "kafka_controller_port",
                     "kv_cache_users", "kv_cache_mb", "kv_refresh_every", "stream_buffer_maxsize",
                     "producer_buffer_max_messages")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("max_future_skew_s", "max_event_age_s", "max_wait_ms", "serve_threads", "producer_linger_ms",
                     "max_poll_records")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("commit_interval_s", "gil_switch_interval_ms")
    @classmethod
    def _positive_float(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("broker_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("kafka://", "aiokafka://")) or len(v.split("://", 1)[1]) == 0:
            raise ValueError("must look like kafka://host:port[;host:port]")
        return v

    @property
    def bootstrap_servers(self) -> str:
        """``host:port[,host:port]`` for plain aiokafka clients."""
        return self.broker_url.split("://", 1)[1].replace(";", ",")


def Settings(**overrides) -> _Settings:  # noqa: N802 - reads like a class at call sites
    """Build settings from env + ``overrides``, turning pydantic errors into :class:`ConfigError`."""
    try:
        return _Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "?"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(name, err.get("input"), msg) from None


SettingsType = _Settings


@lru_cache(maxsize=1)
def get_settings() -> _Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
