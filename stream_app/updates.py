"""Model updates reach **every** worker: a group-less reader of the ``model-updates`` topic.

A Faust agent reads its topic inside the app's consumer group, so with several workers each
``model-updates`` record would reach exactly one of them and the fleet would serve mixed versions.
Instead every worker runs one :class:`ModelUpdateListener`: a plain ``aiokafka`` consumer with no
group (``group_id=None``, nothing committed) that assigns itself every partition of the topic.

At start the listener first **catches up**: it reads the newest record of the topic (the last
offset of each partition, newest by record time) and applies it, so a worker that starts or
restarts after an update serves the fleet's current version, not the older ``settings.checkpoint``
(a record for the version already served is skipped by the handler). Then it follows the topic
from its end; after a broker error it reconnects and resumes at the next unread offset. Each
record goes to the ``handle`` coroutine (:meth:`stream_app.agents.Pipeline.handle_model_update`),
which loads, verifies and swaps; it never raises for a bad record. The listener never stops the
worker.

Records are :class:`~stream_app.records.ModelUpdate`\\ s; ``nextaction deploy <checkpoint>`` writes
one (:func:`update_record`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from stream_app.kafka_admin import ensure_topics_async, start_client
from stream_app.records import ModelUpdate
from stream_app.settings import SettingsType

log = logging.getLogger(__name__)

Handle = Callable[[bytes | None], Awaitable[str]]


def update_record(checkpoint: str | Path, version: str | None = None) -> ModelUpdate:
    """The update announcing ``checkpoint`` (every file's hash is verified first: a broken checkpoint
    is refused here, before any worker sees it). Raises :class:`~models.errors.CheckpointError`."""
    from models.checkpoint import verify_checkpoint  # noqa: PLC0415 - imports safetensors/torch

    path = Path(checkpoint).expanduser().absolute()
    sha = verify_checkpoint(path)
    return ModelUpdate(version or sha[:12], str(path), sha)


class ModelUpdateListener:
    """Follows ``settings.topic_model_updates`` on this worker and hands each record to ``handle``.

    Arguments:
        settings: broker address and topic name.
        handle: coroutine applying one record's value (returns what happened, never raises for bad
            input).
        catch_up: apply the topic's newest record at start (default; see the module docstring).
    """

    def __init__(self, settings: SettingsType, handle: Handle, *, catch_up: bool = True,
                 retry_s: float = 2.0) -> None:
        self.settings, self.handle, self.catch_up = settings, handle, catch_up
        self.retry_s = retry_s
        self.topic = settings.topic_model_updates
        self._next: dict[int, int] = {}  # partition -> next offset to read (empty until first connected)

    async def run(self) -> None:
        """Follow the topic until cancelled; after a broker error, reconnect and resume where it stopped."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must never stop the worker
                log.warning("model-updates listener on %r: %s: %s; retrying in %.1f s", self.topic,
                            type(exc).__name__, exc, self.retry_s)
                await asyncio.sleep(self.retry_s)

    async def _follow(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: PLC0415

        n = (await ensure_topics_async(self.settings, [self.topic], partitions=1))[self.topic]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="latest",
                                    client_id=f"{self.settings.app_id}-model-updates")
        await start_client(self.settings, consumer.start, consumer.stop)
        try:
            tps = [TopicPartition(self.topic, p) for p in range(n)]
            consumer.assign(tps)
            if not self._next:  # first connection: start at the end, after catching up with the newest record
                ends = await consumer.end_offsets(tps)
                if self.catch_up:
                    await self._catch_up(consumer, ends)
                self._next = {tp.partition: ends[tp] for tp in tps}
            for tp in tps:
                consumer.seek(tp, self._next.get(tp.partition, 0))
            log.info("model-updates listener following %r (%d partitions) from offsets %s", self.topic, n,
                     self._next)
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for tp in sorted(batch, key=lambda t: t.partition):
                    for rec in batch[tp]:
                        await self._apply(rec)
                        self._next[tp.partition] = rec.offset + 1
        finally:
            await consumer.stop()

    async def _catch_up(self, consumer: Any, ends: dict) -> None:
        """Apply the newest record of the topic (by record time across partitions), if any."""
        newest = None
        for tp, end in ends.items():
            if end <= 0:
                continue
            consumer.seek(tp, end - 1)
            got = await consumer.getmany(tp, timeout_ms=5000)
            for rec in got.get(tp, []):
                if newest is None or rec.timestamp >= newest.timestamp:
                    newest = rec
        if newest is not None:
            log.info("model-updates: catching up with the newest record (%s[%d]@%d)", newest.topic,
                     newest.partition, newest.offset)
            await self._apply(newest)

    async def _apply(self, rec: Any) -> None:
        result = await self.handle(rec.value)
        log.info("model-updates %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, result)
