"""Kafka admin helpers for any cluster (the user's or the embedded one): topics, reachability, clients.

- :func:`ensure_topics` creates the app's topics that are missing (:func:`app_topics`);
- :func:`probe` / :func:`require_broker` tell whether ``settings.broker_url`` answers;
- :func:`start_client` starts an aiokafka client and turns a failure into a :class:`BrokerError`
  naming the broker (:func:`unreachable`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from stream_app.errors import BrokerError
from stream_app.kafka_security import client_kwargs
from stream_app.settings import Settings, SettingsType

_T = TypeVar("_T")


def app_topics(settings: SettingsType) -> list[str]:
    """The topics the app reads and writes, by their configured names (the repartition topic too, when
    ``reroute_mispartitioned``)."""
    topics = [settings.topic_events, settings.topic_dlq, settings.topic_predictions, settings.topic_outcomes,
              settings.topic_model_updates]
    if settings.reroute_mispartitioned:
        topics.insert(1, settings.topic_repartition)
    return topics


def user_topics(settings: SettingsType) -> list[str]:
    """The app's topics that hold per-user records (raw events or records derived from them): a
    forgotten user's records stay there until retention deletes them (docs/privacy.md)."""
    return [settings.topic_events, settings.topic_dlq, settings.topic_predictions, settings.topic_outcomes]


def topic_config(settings: SettingsType, topic: str) -> dict[str, str]:
    """The configs the product sets when it creates ``topic``: ``retention.ms`` of the per-user topics
    (``topic_retention_s``; none when 0, the broker's default applies).

    >>> from stream_app.settings import Settings
    >>> s = Settings(topic_retention_s=60)
    >>> off = Settings(topic_retention_s=0)
    >>> topic_config(s, "events.dlq"), topic_config(s, "model-updates"), topic_config(off, "outcomes")
    ({'retention.ms': '60000'}, {}, {})
    """
    if settings.topic_retention_s and topic in user_topics(settings):
        return {"retention.ms": str(settings.topic_retention_s * 1000)}
    return {}


def ensure_topics(settings: SettingsType | None = None, topics: Iterable[str] | None = None, *,
                  partitions: int | None = None, replication: int = 1, timeout: float = 30.0) -> dict[str, int]:
    """Create the app's topics (or ``topics``) that are missing, on ``settings.broker_url``.

    Returns ``{topic: partition count}`` for every requested topic (existing topics are left as they
    are, even if their partition count or configs differ; new ones get :func:`topic_config`). A missing
    repartition topic gets the partition count of an existing ``events`` topic: the worker co-partitions the two.
    """
    settings = settings or Settings()
    return run_async(ensure_topics_async(settings, topics, partitions=partitions, replication=replication,
                                          timeout=timeout))


async def ensure_topics_async(settings: SettingsType, topics: Iterable[str] | None = None, *,
                              partitions: int | None = None, replication: int = 1,
                              timeout: float = 30.0) -> dict[str, int]:
    """Async :func:`ensure_topics`, for callers that already run an event loop."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    names = list(dict.fromkeys(topics if topics is not None else app_topics(settings)))
    n_partitions = partitions or settings.partitions
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_kwargs(settings), request_timeout_ms=int(timeout * 1000))
    await start_client(settings, admin.start, admin.close, timeout)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in names if t not in existing]
        if missing:
            counts = {t: n_partitions for t in missing}
            if settings.topic_repartition in counts and settings.topic_events in existing:
                have = await _partition_counts(admin, [settings.topic_events], settings,
                                               deadline=time.monotonic() + timeout)
                counts[settings.topic_repartition] = have[settings.topic_events]
            resp = await admin.create_topics(
                [NewTopic(t, num_partitions=counts[t], replication_factor=replication,
                          topic_configs=topic_config(settings, t) or None) for t in missing],
                timeout_ms=int(timeout * 1000))
            for topic, code, *rest in resp.topic_errors:
                if code not in (0, 36):  # 36 = TOPIC_ALREADY_EXISTS (a concurrent creator won)
                    msg = rest[0] if rest and rest[0] else f"error code {code}"
                    raise BrokerError(f"could not create topic {topic!r} on {settings.bootstrap_servers}: {msg}")
        return await _partition_counts(admin, names, settings, deadline=time.monotonic() + timeout)
    finally:
        await close_quietly(admin)


async def _partition_counts(admin: Any, names: list[str], settings: SettingsType, *, deadline: float) -> dict[str, int]:
    # Freshly created topics can take a moment to show their partitions in metadata.
    while True:
        counts: dict[str, int] = {}
        for desc in await admin.describe_topics(names):
            if desc.get("error_code", 0) == 0 and desc.get("partitions"):
                counts[desc["topic"]] = len(desc["partitions"])
        if len(counts) == len(names) or time.monotonic() >= deadline:
            missing = [t for t in names if t not in counts]
            if missing:
                raise BrokerError(f"topics {missing} on {settings.bootstrap_servers} have no partitions in metadata")
            return {t: counts[t] for t in names}
        await asyncio.sleep(0.2)


def probe(bootstrap: str, timeout: float = 3.0, settings: SettingsType | None = None) -> int:
    """How many brokers the cluster at ``bootstrap`` (``host:port[,...]``) reports; 0 if it does not answer.
    With ``settings``, through their security settings (:mod:`stream_app.kafka_security`); without, in
    plain text (the embedded broker's loopback listener)."""
    security = client_kwargs(settings) if settings is not None else {"security_protocol": "PLAINTEXT"}
    return run_async(_probe(bootstrap, timeout, security))


def require_broker(settings: SettingsType, timeout: float = 5.0) -> int:
    """Raise :class:`BrokerError` unless ``settings.broker_url`` answers a metadata request."""
    brokers = probe(settings.bootstrap_servers, timeout, settings)
    if not brokers:
        raise unreachable(settings)
    return brokers


async def start_client(settings: SettingsType, start: Callable[[], Awaitable[Any]],
                       close: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> None:
    """Start an aiokafka client (``start``); on failure close it (``close``) and raise the
    :class:`BrokerError` naming the broker (:func:`unreachable`)."""
    from aiokafka.errors import KafkaError

    try:
        await asyncio.wait_for(start(), timeout)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        try:
            await asyncio.wait_for(close(), 5.0)
        except Exception:  # noqa: BLE001 - closing a client that never connected
            pass
        raise unreachable(settings, exc) from None


def unreachable(settings: SettingsType, exc: BaseException | None = None) -> BrokerError:
    """The error to raise when ``settings.broker_url`` does not answer."""
    why = f" ({type(exc).__name__}: {exc})" if exc is not None and str(exc) else ""
    return BrokerError(f"cannot reach Kafka at {settings.bootstrap_servers} (broker_url={settings.broker_url!r}){why}; "
                       f"start the embedded broker with `nextaction kafka start` or set NEXTACTION_BROKER_URL")


async def _probe(bootstrap: str, timeout: float, security: dict[str, Any]) -> int:
    """Number of brokers in the metadata answered at ``bootstrap``; 0 if it does not answer in time."""
    import logging

    from aiokafka import AIOKafkaClient

    # While the broker boots, refused connections are expected: keep aiokafka's errors off the console.
    log = logging.getLogger("aiokafka")
    level = log.level
    log.setLevel(logging.CRITICAL)
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                            retry_backoff_ms=100, connections_max_idle_ms=10_000, **security)
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
        return len(client.cluster.brokers())
    except Exception:  # noqa: BLE001 - any failure means "not answering (yet)"
        return 0
    finally:
        await close_quietly(client)
        log.setLevel(level)


async def close_quietly(client: Any) -> None:
    try:
        await asyncio.wait_for(client.close(), 5.0)
    except Exception:  # noqa: BLE001 - closing a client that never connected
        pass


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from sync code, even when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
