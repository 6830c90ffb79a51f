"""Fixtures of the stream_app unit tests: a Faust app built for ``agent.test_context()`` and the
recorder that stands in for its Kafka producer."""

from __future__ import annotations

import itertools

import orjson
import pytest

_ids = itertools.count()


class Recorder:
    """The pipeline's publisher in tests: keeps every (kind, key, decoded value) it is asked to send."""

    def __init__(self):
        self.sent: list[tuple[str, bytes | None, dict]] = []

    async def send(self, kind, key, value):
        self.sent.append((kind, key, orjson.loads(value)))

    def of(self, kind):
        return [v for k, _, v in self.sent if k == kind]


@pytest.fixture
def make_app(tmp_path):
    """``make(**settings) -> (app, recorder)``: a finalized Faust app (stream_app.app.create_app) with
    RocksDB tables in ``tmp_path``, one partition (``partitions=``), a 5-event window, and its outputs going to a
    :class:`Recorder` instead of a broker. ``predictor_factory=`` replaces the predictor."""
    from stream_app.app import create_app
    from stream_app.settings import Settings

    def make(**kw):
        factory = kw.pop("predictor_factory", None)
        # gc_freeze off: in one long test process, freezing would pin every earlier test's objects
        # (torch/nanobind ones included), which nanobind then reports as leaks at exit.
        kw.setdefault("gc_freeze", False)
        kw.setdefault("max_wait_ms", 1)
        kw.setdefault("partitions", 1)
        s = Settings(app_id=f"test-agents-{next(_ids)}", data_dir=tmp_path, **{"window_events": 5, **kw})
        rec = Recorder()
        app = create_app(s, publisher=rec, predictor_factory=factory)
        app.finalize()
        app.flow_control.resume()
        return app, rec

    return make
