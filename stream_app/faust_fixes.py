"""Fixes for faust-streaming bugs that lose or repeat events, applied once by :func:`apply` (from ``create_app``).

Written against faust-streaming 0.15.3 (the pinned version); :func:`apply` warns when another
version is installed, since a later release may have changed the code patched here.

**Seek before resume.** After a rebalance, Faust's recovery (``Recovery.on_recovery_completed`` and,
for an app without tables, ``Recovery._resume_streams``) resumes the stream partitions *first* and
only then seeks them to their committed offsets (``consumer.perform_seek()``, awaited). The consumer
flow is already running at that point (recovery resumed it to read the changelogs), so the fetcher
delivers records of a stream partition from where the *old* assignment's fetch position was, while
the seek is in flight; the seek then resets Faust's read offset under the fetcher's feet. Seen in the
three-worker fault test (tests/integration/test_faults.py): records ``445…1117`` delivered before the
seek finished, the read offset then set back to ``445``, and the next record (``472``) made Faust
record ``446…472`` as a "gap" (offsets it treats as acked, meant for compacted topics and
transaction markers). When the records fetched early were dropped on their way to the agent (Faust
clears the agents' buffers on a rebalance), nobody processed them, yet the gap let the commit move
past them: 26 events lost for good in CI. faust-streaming fixed this ordering once for apps without
tables (faust-streaming/faust#216, #217); both paths have it again in 0.15.3.

The fix: while those two methods run, a resume of stream partitions is held back and done right
after the seek completed (:func:`seek_before_resume`). Until then the partitions stay paused, so the
fetcher cannot deliver anything from them before they point at the committed offset.

**Fetch only what is active.** Faust hands its fetch thread the *live* set of active partitions,
and aiokafka's ``Fetcher.fetched_records(partitions)`` returns records of *every* assigned partition
when that set is empty. Recovery pauses the changelog partitions while a fetch waits (up to 1 s), so
the set can turn empty under it, and the fetch returns records of paused stream partitions from
their old position; if those partitions are resumed before Faust iterates the batch, they are
delivered after the seek, the same gap as above. The fix (:func:`fetch_active_snapshot`): the fetch
gets a frozen copy of the set taken when it starts, and returns nothing when that copy is empty.
And a fetch that a seek overtook (the thread read records from the positions before a rebalance's
seek, the event loop takes them after it) is dropped and the partitions sought again to their
committed offsets (:func:`count_seeks`): the same gap otherwise, seen in the three-worker test.

**A gap is only what was not read, and it is counted.** Faust records a gap whenever a partition's
next record is more than one offset past the last one read, and counts the gap as acked; but its
range ends *at* the next record, so that record counts as acked before it is processed (a commit
may pass it while it waits in a batch; with a transactional upstream producer, at every
transaction's marker). The fix (:func:`skipped_gap_only`) ends the range one offset earlier. A
transactional producer's markers make one-offset gaps; a wider gap on the events topic means
records were skipped. Each gap is counted (``nextaction_offset_gaps_total{topic}``,
``nextaction_offset_gap_offsets_total{topic}``) and one wider than a single offset is logged as a
warning.

**Keep the acks until the revoke is handled.** On a rebalance, Faust's consumer drops its record of
the revoked partitions' acked offsets (and their committed offsets) in
``Consumer.on_partitions_revoked`` *before* it runs the app's revoke handler, which waits for the
events in flight and commits. That commit then covers only what was acked after the drop: what was
acked since the last periodic commit (under load the periodic commit takes seconds: it flushes the
producer first) went to the next owner again, 1,794–2,922 repeats (marked) in a run with two joins
and a graceful leave. Not a loss, but every deploy or scale-out paid for it. The fix
(:func:`keep_acks_through_revoke`) puts the bookkeeping back for the handler and drops it after.

**A partition without a committed offset is read again from its start.** Faust's recovery seeks every
assigned partition to its committed offset (``perform_seek``), and it drops records it fetched while
the flow was stopped or the generation changed, counting on that seek to read them again. But
aiokafka's ``seek_to_committed`` does not seek a partition whose committed offset is ``None`` (no
commit yet: a new group, or the first seconds of a stream) or ``0``: its fetch position stays past
the dropped records, and they are never read. Seen in the two-worker test
(tests/integration/test_pipeline.py): a worker joined while the first 400 events streamed in, the
other worker's dropped records of its two kept partitions (offsets 39…97 and 13…52) were skipped for
good; the same inputs were missing in a clean-clone CI run. The fix
(:func:`seek_uncommitted_to_start`) seeks such partitions to their beginning when the consumer's
``auto_offset_reset`` is ``earliest`` (Faust's default, and this app's): what a new consumer of the
partition would read. Records it read again are redeliveries, which the pipeline marks.

The other Faust commit bug that loses events (acks out of order; ``Consumer._new_offset``) is worked
around in the pipeline instead: :mod:`stream_app.ackorder`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from importlib import metadata
from typing import Any, Awaitable, Callable

from stream_app import monitoring

log = logging.getLogger(__name__)

#: The faust-streaming version these fixes were written against (pyproject.toml pins it).
FAUST_VERSION = "0.15.3"

_APPLIED = "_nextaction_faust_fix"


def seek_before_resume(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a ``Recovery`` method so that, while it runs, ``consumer.resume_partitions`` only notes
    the partitions and ``consumer.perform_seek`` resumes them once the seek has completed.

    >>> import asyncio
    >>> calls = []
    >>> class Consumer:
    ...     def resume_partitions(self, tps): calls.append(("resume", sorted(tps)))
    ...     async def perform_seek(self): calls.append(("seek",))
    >>> class App:
    ...     consumer = Consumer()
    >>> class Recovery:
    ...     app = App()
    ...     @seek_before_resume
    ...     async def on_recovery_completed(self):  # Faust's order: resume, then seek
    ...         self.app.consumer.resume_partitions({"events-1", "events-0"})
    ...         await self.app.consumer.perform_seek()
    >>> asyncio.run(Recovery().on_recovery_completed())
    >>> calls
    [('seek',), ('resume', ['events-0', 'events-1'])]
    """

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        consumer = self.app.consumer
        resume, seek = consumer.resume_partitions, consumer.perform_seek
        held: set = set()

        def resume_after_seek(tps: Any) -> None:
            held.update(tps)

        async def seek_then_resume() -> None:
            await seek()
            if held:
                resume(set(held))
                held.clear()

        consumer.resume_partitions, consumer.perform_seek = resume_after_seek, seek_then_resume
        try:
            result = await method(self, *args, **kwargs)
        finally:  # a failed or interrupted seek (another rebalance) leaves them paused: the next recovery resumes them
            del consumer.resume_partitions, consumer.perform_seek  # back to the class's methods
        if held:  # resumed without a seek (Faust seeks only when it has an assignment)
            resume(set(held))
        return result

    setattr(wrapper, _APPLIED, True)
    return wrapper


#: Attribute of the Faust consumer counting the seeks begun (:func:`count_seeks`).
_SEEKS = "_nextaction_seeks"


def count_seeks(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap ``Consumer.perform_seek``: count each seek as it begins (:func:`fetch_active_snapshot`
    discards a fetch that a seek overtook).

    >>> import asyncio
    >>> class Consumer:
    ...     @count_seeks
    ...     async def perform_seek(self):
    ...         pass
    >>> c = Consumer(); asyncio.run(c.perform_seek()); asyncio.run(c.perform_seek()); c._nextaction_seeks
    2
    """

    @functools.wraps(method)
    async def wrapper(self: Any) -> Any:
        setattr(self, _SEEKS, getattr(self, _SEEKS, 0) + 1)
        return await method(self)

    setattr(wrapper, _APPLIED, True)
    return wrapper


def fetch_active_snapshot(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap ``ThreadDelegateConsumer._getmany`` so the fetch thread gets a frozen copy of the active
    partitions (``None``, a client-only app's "all", is passed on) and an empty copy fetches nothing;
    and a fetch that a seek overtook (:func:`count_seeks`: one began while the fetch was in flight)
    is discarded and the consumer sought again to its committed offsets.

    The second part: the fetch thread may hand back records read from the positions *before* a
    rebalance's seek, and the event loop take them *after* it (the seek set the read offsets to the
    committed ones): Faust then delivered them and counted the offsets between as a gap, and the
    records read again from the committed offset were dropped as already read. Seen in the
    three-worker test: 17-28 offsets of one partition lost right after a worker joined.

    >>> import asyncio
    >>> class Consumer:
    ...     seeks = 0
    ...     def assignment(self): return {"events-0"}
    ...     async def perform_seek(self): print("sought again")
    ...     @fetch_active_snapshot
    ...     async def _getmany(self, active_partitions, timeout):
    ...         if self.seeks: self._nextaction_seeks = self.seeks  # a seek began meanwhile
    ...         return {"asked": active_partitions}
    >>> asyncio.run(Consumer()._getmany({"events-0"}, 1.0))
    {'asked': frozenset({'events-0'})}
    >>> asyncio.run(Consumer()._getmany(set(), 1.0))  # aiokafka would read an empty set as "all"
    {}
    >>> c = Consumer(); c.seeks = 1; asyncio.run(c._getmany({"events-0"}, 1.0))
    sought again
    {}
    """

    @functools.wraps(method)
    async def wrapper(self: Any, active_partitions: Any, timeout: float) -> Any:
        if active_partitions is not None:
            active_partitions = frozenset(active_partitions)
            if not active_partitions:
                return {}
        seeks = getattr(self, _SEEKS, 0)
        records = await method(self, active_partitions, timeout)
        if records and getattr(self, _SEEKS, 0) != seeks:
            monitoring.STALE_FETCHES.inc()
            log.info("a fetch overtaken by a seek: its records are dropped and the partitions sought again "
                     "to their committed offsets (what was read again is marked duplicate)")
            if self.assignment():
                await self.perform_seek()
            return {}
        return records

    setattr(wrapper, _APPLIED, True)
    return wrapper


def skipped_gap_only(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap ``Consumer._add_gap(tp, offset_from, offset_to)``: the gap is the offsets *not read*
    (``offset_from … offset_to - 1``), count it, warn when it is wider than one offset.

    Faust calls it with ``offset_to`` = the offset of the record it is about to deliver, and the gap
    then includes that record: counted as acked before it is processed, so a commit could pass it
    while it still waits in a batch.

    >>> import asyncio
    >>> from types import SimpleNamespace
    >>> class Consumer:
    ...     @skipped_gap_only
    ...     async def _add_gap(self, tp, offset_from, offset_to):
    ...         print("gap", offset_from, offset_to)
    >>> tp = SimpleNamespace(topic="events", partition=0)
    >>> asyncio.run(Consumer()._add_gap(tp, 41, 42))  # a transaction marker at 41, next record 42
    gap 41 41
    """

    @functools.wraps(method)
    async def wrapper(self: Any, tp: Any, offset_from: int, offset_to: int) -> Any:
        last = offset_to - 1
        skipped = last - offset_from + 1
        if skipped <= 0:
            return None
        monitoring.OFFSET_GAPS.labels(tp.topic).inc()
        monitoring.OFFSET_GAP_OFFSETS.labels(tp.topic).inc(skipped)
        if skipped > 1:
            log.warning("%s[%d]: offsets %d..%d were not read and count as acked (a gap of %d offsets; only "
                        "transaction markers or compaction should make one)", tp.topic, tp.partition,
                        offset_from, last, skipped)
        return await method(self, tp, offset_from, last)

    setattr(wrapper, _APPLIED, True)
    return wrapper


async def _seek_to_start(consumer: Any, tps: list) -> None:
    """Seek the aiokafka ``consumer``'s ``tps`` to their log-start offsets (in its thread)."""
    for tp, offset in (await consumer.beginning_offsets(tps)).items():
        consumer.seek(tp, offset)


def seek_uncommitted_to_start(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap ``AIOKafkaConsumerThread.seek_to_committed()`` (it returns ``{tp: committed offset}``): the
    partitions whose committed offset is ``None`` or ``0``, which aiokafka leaves where they are, are
    sought to their beginning (only with ``auto_offset_reset="earliest"``).

    >>> import asyncio
    >>> from types import SimpleNamespace
    >>> from collections import namedtuple
    >>> TP = namedtuple("TP", "topic partition")
    >>> class Thread:  # the table changelogs are left alone: the recovery reads them from its own offsets
    ...     app = SimpleNamespace(conf=SimpleNamespace(consumer_auto_offset_reset="earliest"),
    ...                           tables=SimpleNamespace(changelog_topics={"app-histories-changelog"}))
    ...     def _ensure_consumer(self):
    ...         async def beginning_offsets(tps): return {tp: 0 for tp in tps}
    ...         return SimpleNamespace(beginning_offsets=beginning_offsets,
    ...                                seek=lambda tp, offset: print("seek", tp.topic, tp.partition, offset))
    ...     async def call_thread(self, fn, *args):
    ...         return await fn(*args)
    ...     @seek_uncommitted_to_start
    ...     async def seek_to_committed(self):
    ...         return {TP("events", 0): 157, TP("events", 2): None, TP("events", 3): 0,
    ...                 TP("app-histories-changelog", 2): None}
    >>> committed = asyncio.run(Thread().seek_to_committed())
    seek events 2 0
    seek events 3 0
    >>> len(committed)
    4
    """

    @functools.wraps(method)
    async def wrapper(self: Any) -> Any:
        committed = await method(self)
        if self.app.conf.consumer_auto_offset_reset == "earliest":
            changelogs = self.app.tables.changelog_topics  # read by the recovery from its own offsets
            uncommitted = [tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs]
            if uncommitted:
                # the log-start offsets, then a plain seek: never an "awaiting reset" state, whose
                # position is None (Faust's livelock detector reads positions and crashed on one)
                result = self.call_thread(_seek_to_start, self._ensure_consumer(), uncommitted)
                if inspect.isawaitable(result):
                    await result
                log.info("no committed offset for %s: read from the beginning",
                         ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(uncommitted)))
        return committed

    setattr(wrapper, _APPLIED, True)
    return wrapper


_ACK_STATE = ("_acked", "_acked_index", "_committed_offset", "_gap")


def keep_acks_through_revoke(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap ``Consumer.on_partitions_revoked(revoked)``: the revoked partitions' ack bookkeeping
    (acked offsets, committed offset, gaps) stays while the app's revoke handler runs (it waits for
    the events in flight and commits), and is dropped after it, as Faust meant to.

    >>> import asyncio
    >>> class Consumer:  # Faust's order: forget the acks, then run the app's handler (which commits)
    ...     def __init__(self):
    ...         self._acked, self._acked_index, self._committed_offset, self._gap = {"e0": [7, 8]}, {}, {"e0": 7}, {}
    ...         self._on_partitions_revoked = self.app_handler
    ...     async def app_handler(self, revoked):
    ...         print("committing", self._acked.get("e0"), "after", self._committed_offset.get("e0"))
    ...     @keep_acks_through_revoke
    ...     async def on_partitions_revoked(self, revoked):
    ...         for tp in revoked:
    ...             self._acked.pop(tp, None); self._committed_offset.pop(tp, None)
    ...         await self._on_partitions_revoked(revoked)
    >>> c = Consumer(); asyncio.run(c.on_partitions_revoked({"e0"}))
    committing [7, 8] after 7
    >>> c._acked, c._committed_offset
    ({}, {})
    """

    @functools.wraps(method)
    async def wrapper(self: Any, revoked: Any) -> Any:
        saved = {(name, tp): getattr(self, name)[tp] for name in _ACK_STATE for tp in revoked
                 if tp in getattr(self, name)}
        app_handler = self._on_partitions_revoked

        async def handler_with_acks(partitions: Any) -> Any:
            for (name, tp), value in saved.items():
                getattr(self, name)[tp] = value
            try:
                return await app_handler(partitions)
            finally:
                for name in _ACK_STATE:
                    for tp in revoked:
                        getattr(self, name).pop(tp, None)

        self._on_partitions_revoked = handler_with_acks
        try:
            return await method(self, revoked)
        finally:
            self._on_partitions_revoked = app_handler

    setattr(wrapper, _APPLIED, True)
    return wrapper


def _patch(owner: type, name: str, fix: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    method = getattr(owner, name)
    if not getattr(method, _APPLIED, False):
        setattr(owner, name, fix(method))


def apply() -> None:
    """Patch faust-streaming (idempotent)."""
    from faust.tables.recovery import Recovery
    from faust.transport.consumer import Consumer, ThreadDelegateConsumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    version = metadata.version("faust-streaming")
    if version != FAUST_VERSION:
        log.warning("faust-streaming %s is installed; stream_app.faust_fixes was written for %s: check that "
                    "the patched methods still have the bugs it describes", version, FAUST_VERSION)
    _patch(Recovery, "on_recovery_completed", seek_before_resume)
    _patch(Recovery, "_resume_streams", seek_before_resume)
    _patch(ThreadDelegateConsumer, "_getmany", fetch_active_snapshot)
    _patch(Consumer, "perform_seek", count_seeks)
    _patch(Consumer, "_add_gap", skipped_gap_only)
    _patch(Consumer, "on_partitions_revoked", keep_acks_through_revoke)
    _patch(AIOKafkaConsumerThread, "seek_to_committed", seek_uncommitted_to_start)
