"""Model updates reach **every** worker: a group-less reader of the ``model-updates`` topic.

A Faust agent reads its topic inside the app's consumer group, so with several workers each
``model-updates`` record would reach exactly one of them and the fleet would serve mixed versions.
Instead every worker runs one :class:`ModelUpdateListener`: a plain ``aiokafka`` consumer with no
group (``group_id=None``, nothing committed) that assigns itself every partition of the topic.

Two kinds of record share the topic, in one partition (one key), so every worker sees them in the
same order (:func:`stream_app.records.update_kind`): a **full** version (a checkpoint path, the
existing hot swap) and a **delta** (bytes on the topic: rows applied in place, chained to the
version they follow). At start the listener **catches up** with the *lineage*: the newest full
record and every record after it (:func:`lineage_start`), so a worker that starts or restarts
serves exactly the weights the rest of the fleet serves. Then it follows the topic; a handler
result of ``gap`` (a delta whose predecessor this worker never applied) makes it read the lineage
again from its full record (applying a delta twice is refused by its chain, so the replay is safe).
After a broker error it reconnects and resumes at the next unread offset. The handler
(:meth:`stream_app.pipeline.Pipeline.handle_model_update`) never raises for a bad record, and the
listener never stops the worker.

``nextaction deploy <checkpoint>`` writes a full record (:func:`update_record`); the online trainer
writes both kinds (:mod:`stream_app.training`). A full record is loaded only if :func:`admit` accepts
it: a ``sha256``, and a path that resolves under one of :func:`checkpoint_roots` (docs/security.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Awaitable, Callable

from stream_app.kafka_admin import ensure_topics_async, start_client
from stream_app.kafka_security import client_kwargs
from stream_app.records import FULL, ModelUpdate, update_kind
from stream_app.settings import SettingsType

log = logging.getLogger(__name__)

#: ``handle(kind, value) -> what happened``; ``"gap"`` asks the listener to replay the lineage.
Handle = Callable[[str, bytes | None], Awaitable[str]]
#: Records read per step when scanning back from the end of the topic for the newest full record.
SCAN_CHUNK = 500


async def read_range(consumer: Any, tp: Any, start: int, stop: int, timeout_s: float = 10.0) -> list[Any]:
    """The records of ``tp`` at offsets ``start <= offset < stop`` (an assigned group-less consumer)."""
    import time  # noqa: PLC0415

    consumer.seek(tp, start)
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while await consumer.position(tp) < stop:
        out += [r for r in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []) if r.offset < stop]
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {tp.topic}[{tp.partition}] offsets {start}..{stop}: got {len(out)} records")
    return out


async def lineage_start(consumer: Any, tps: list[Any], ends: dict) -> tuple[Any, int] | None:
    """``(partition, offset)`` of the newest full record across ``tps`` (by record time), scanning
    back from each partition's end in chunks; ``None`` when the topic holds no full record."""
    best = None
    for tp in tps:
        hi = ends[tp]
        while hi > 0:
            lo = max(0, hi - SCAN_CHUNK)
            fulls = [r for r in await read_range(consumer, tp, lo, hi) if update_kind(r.headers) == FULL]
            if fulls:
                rec = fulls[-1]
                if best is None or rec.timestamp >= best[2]:
                    best = (tp, rec.offset, rec.timestamp)
                break
            hi = lo
    return None if best is None else (best[0], best[1])


#: What a ``model-updates`` full record must carry: the checkpoint's content hash, 64 hex digits.
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class UpdateRejected(ValueError):
    """A full ``model-updates`` record the fleet must not load: ``reason`` (a short code, the label of
    the rejection in the logs and in the result) and ``detail`` (what was wrong, with the bad value)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def checkpoint_roots(settings: SettingsType) -> list[Path]:
    """The folders a full record may name a checkpoint under (each resolved: symlinks followed):
    ``models_dir`` (default ``data_dir/models``: where the trainer writes), the folder holding
    ``checkpoint`` (where ``nextaction train`` put it, and its siblings), and ``checkpoint_roots``."""
    roots = [Path(settings.models_dir or Path(settings.data_dir) / "models")]
    if settings.checkpoint is not None:
        roots.append(Path(settings.checkpoint).expanduser().absolute().parent)
    roots += [Path(r) for r in settings.checkpoint_roots.split(":") if r.strip()]
    out: list[Path] = []
    for r in roots:
        resolved = Path(os.path.realpath(r.expanduser().absolute()))
        if resolved not in out:
            out.append(resolved)
    return out


def admit(value: bytes | None, roots: list[Path]) -> ModelUpdate:
    """The full record in ``value`` if the fleet may load it, with its path resolved; else
    :class:`UpdateRejected`: ``bad_record`` (not a record), ``no_sha256`` / ``bad_sha256`` (the content
    hash is missing or is not 64 hex digits), ``relative_path`` (a path that depends on the worker's
    working directory), ``path_not_allowed`` (the path, resolved with symlinks and ``..``, is not under
    one of ``roots``: :func:`checkpoint_roots`). The checkpoint's files are checked against the hash
    when it is loaded (:func:`stream_app.predictors.load_successor`)."""
    try:
        update = ModelUpdate.decode(value)
    except ValueError as exc:
        raise UpdateRejected("bad_record", f"{exc} (record {(value or b'')[:200]!r})") from None
    if update.sha256 is None:
        raise UpdateRejected("no_sha256", f"the record for {update.path!r} carries no 'sha256' (the checkpoint's "
                                          f"content hash, which `nextaction deploy` computes)")
    if not SHA256.fullmatch(update.sha256):
        raise UpdateRejected("bad_sha256", f"'sha256' must be 64 hex digits (got {update.sha256[:80]!r})")
    if not os.path.isabs(update.path):
        raise UpdateRejected("relative_path", f"{update.path[:300]!r} is not an absolute path")
    resolved = Path(os.path.realpath(update.path))
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise UpdateRejected("path_not_allowed", f"{update.path[:300]!r} (resolved: {str(resolved)[:300]!r}) is "
                             f"under none of the checkpoint roots {[str(r) for r in roots]} (settings "
                             f"models_dir, checkpoint, checkpoint_roots)")
    return dataclasses.replace(update, path=str(resolved))


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
        catch_up: at start, apply the newest full record and the deltas after it (default; module docstring).
    """

    def __init__(self, settings: SettingsType, handle: Handle, *, catch_up: bool = True,
                 retry_s: float = 2.0) -> None:
        self.settings, self.handle, self.catch_up = settings, handle, catch_up
        self.retry_s = retry_s
        self.topic = settings.topic_model_updates
        self._next: dict[int, int] = {}  # partition -> next offset to read (empty until first connected)
        self._full: dict[int, int] = {}  # partition -> offset of the newest full record read

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
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers, **client_kwargs(self.settings), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="latest",
                                    client_id=f"{self.settings.app_id}-model-updates")
        await start_client(self.settings, consumer.start, consumer.stop)
        try:
            tps = [TopicPartition(self.topic, p) for p in range(n)]
            consumer.assign(tps)
            if not self._next:  # first connection: from the newest full record on (catch-up), else the end
                ends = await consumer.end_offsets(tps)
                self._next = {tp.partition: ends[tp] for tp in tps}
                start = await lineage_start(consumer, tps, ends) if self.catch_up else None
                if start is not None:
                    log.info("model-updates: catching up from the newest full record (%s[%d]@%d)", self.topic,
                             start[0].partition, start[1])
                    self._next[start[0].partition] = start[1]
            while True:
                for tp in tps:
                    consumer.seek(tp, self._next.get(tp.partition, 0))
                log.info("model-updates listener following %r (%d partitions) from offsets %s", self.topic, n,
                         self._next)
                await self._read(consumer, tps)
        finally:
            await consumer.stop()

    async def _read(self, consumer: Any, tps: list[Any]) -> None:
        """Apply records until one asks for a replay of the lineage (then return to re-seek)."""
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            for tp in sorted(batch, key=lambda t: t.partition):
                for rec in batch[tp]:
                    kind = update_kind(rec.headers)
                    result = await self._apply(rec, kind)
                    if kind == FULL:
                        self._full[tp.partition] = rec.offset
                    self._next[tp.partition] = rec.offset + 1
                    if result == "gap" and tp.partition in self._full:
                        log.warning("model-updates: a delta's predecessor is missing here: replaying from the "
                                    "full record at %s[%d]@%d", self.topic, tp.partition, self._full[tp.partition])
                        self._next[tp.partition] = self._full[tp.partition]
                        return

    async def _apply(self, rec: Any, kind: str) -> str:
        result = await self.handle(kind, rec.value)
        (log.info if kind == FULL or not result.startswith("delta:") else log.debug)(
            "model-updates %s[%d]@%d (%s): %s", rec.topic, rec.partition, rec.offset, kind, result)
        return result
