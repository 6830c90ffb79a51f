"""stream_app.faust_fixes patches the installed faust-streaming where its bugs are (the wrappers
themselves are tested by their doctests)."""

import inspect
from importlib import metadata

from faust.tables.recovery import Recovery
from aiokafka import AIOKafkaConsumer
from faust.transport.consumer import Consumer, ThreadDelegateConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from stream_app import faust_fixes


def test_the_pinned_faust_is_the_one_the_fixes_were_written_for():
    assert metadata.version("faust-streaming") == faust_fixes.FAUST_VERSION


def test_the_patched_faust_code_still_has_the_bugs_the_fixes_describe():
    """A faust-streaming upgrade that fixes (or moves) this code makes this fail: then re-check the
    fixes rather than keep patching code that changed under them."""
    faust_fixes.apply()
    resume_then_seek = ["resume_partitions(", "perform_seek()"]
    for name in ("on_recovery_completed", "_resume_streams"):
        source = inspect.getsource(inspect.unwrap(getattr(Recovery, name)))
        assert [source.index(s) for s in resume_then_seek] == sorted(source.index(s) for s in resume_then_seek), name
    drain = inspect.getsource(Consumer._drain_messages)
    assert "await self._add_gap(tp, r_offset + 1, offset)" in drain
    revoke = inspect.getsource(inspect.unwrap(Consumer.on_partitions_revoked))
    assert "self._acked.pop(tp, None)" in revoke and "self.commit(" not in revoke
    seek = inspect.getsource(AIOKafkaConsumer.seek_to_committed)  # leaves a None/0 offset where it is
    assert "if offset and offset > 0:" in seek
    getmany = inspect.getsource(Consumer.getmany)  # drops fetched records, counting on a later seek
    assert "Seek back to committed offsets" in getmany and "Cancelling getmany" in getmany


def test_apply_wraps_each_method_once():
    faust_fixes.apply()
    def methods():
        return [Recovery.on_recovery_completed, Recovery._resume_streams, ThreadDelegateConsumer._getmany,
                Consumer._add_gap, Consumer.on_partitions_revoked, AIOKafkaConsumerThread.seek_to_committed,
                Consumer.perform_seek]

    patched = methods()
    faust_fixes.apply()
    assert methods() == patched
    for method in patched:
        assert getattr(method, "_nextaction_faust_fix") is True
        assert not hasattr(inspect.unwrap(method), "_nextaction_faust_fix")
