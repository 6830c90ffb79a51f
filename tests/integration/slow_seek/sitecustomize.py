"""Test-only fault injection, loaded at start-up by a worker whose PYTHONPATH starts with this folder
(tests/integration/test_faults.py): Faust's seek of the stream partitions to their committed offsets
after a rebalance takes ``NX_TEST_SEEK_DELAY_S`` longer. That widens the race stream_app/faust_fixes.py
closes (stream partitions resumed before their seek), which a loaded CI machine hit by chance."""

import asyncio
import os

from faust.transport.consumer import Consumer

_DELAY_S = float(os.environ.get("NX_TEST_SEEK_DELAY_S", "0"))
_perform_seek = Consumer.perform_seek


async def _slow_perform_seek(self):
    await asyncio.sleep(_DELAY_S)
    return await _perform_seek(self)


Consumer.perform_seek = _slow_perform_seek
