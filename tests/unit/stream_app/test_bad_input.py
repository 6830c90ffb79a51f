"""Bad input at scale through the real :class:`~stream_app.pipeline.Pipeline` (Faust agent in
``test_context``, real RocksDB tables, the baseline predictor): every message ends as exactly one
prediction or exactly one dead letter with the reason its construction calls for.

The expected outcome is known by construction, not by asking ``parse_event``: each case starts from
a valid event and applies one mutation whose reason the event schema names (docs: stream_app/events.py);
valid oddities (control characters, odd unicode, extra fields, duplicates, out-of-order times) must
be predicted. 200 examples × 50 messages (+ up to 5 redeliveries each) = over 10,000 cases per run,
about 12 s here; no shrinking (a failure names the first wrong messages itself). Small examples keep
hypothesis's generation inside its buffer (250-message examples overran it and ran for minutes).
"""

from __future__ import annotations

import asyncio
import math

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stream_app.records import DLQ_MAX_BYTES
from tests.fuzz_cases import case

pytestmark = pytest.mark.timeout(300)
BATCH = 50
EXAMPLES = 200


async def _run(app, messages):
    async with app.pipeline.agent.test_context() as agent:
        for key, value, _ in messages:
            await agent.put(value, key=key)
        await app.pipeline.batcher.drain()
        assert app.pipeline.pending == {}
        return dict(agent.results)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(st.lists(case(), min_size=BATCH, max_size=BATCH))
def test_every_bad_or_odd_message_is_predicted_or_dead_lettered_with_its_reason(make_app, messages):
    # a fresh app per example (the batcher lives on one event loop); a long window, so every repeat
    # below is still in the user's history and must come out marked duplicate
    app, rec = make_app(window_events=1000, window_ttl_s=10 * 365 * 86400)
    # a few exact repeats (redeliveries) of valid events: predicted again, marked duplicate
    repeats = [m for m in messages if m[2] == "ok"][:5]
    messages = messages + repeats
    start = len(rec.sent)
    results = asyncio.run(_run(app, messages))
    sent = rec.sent[start:]
    preds = [v for k, _, v in sent if k == "predictions"]
    dlq = [v for k, _, v in sent if k == "dlq"]
    assert len(results) == len(messages)
    got = [r.removeprefix("rejected:") if r.startswith("rejected:") else "ok" if r in ("queued", "duplicate") else r
           for r in results.values()]
    wrong = [(m[2], g, m[1][:200]) for m, g in zip(messages, got) if m[2] != g]
    assert not wrong, wrong[:5]
    expected = [m[2] for m in messages]
    assert sorted(d["reason"] for d in dlq) == sorted(e for e in expected if e != "ok")
    assert len(preds) == expected.count("ok")
    for d in dlq:
        assert len(orjson.dumps(d)) <= DLQ_MAX_BYTES
    for p in preds:
        assert math.isclose(sum(p["action_probs"].values()), 1.0, abs_tol=1e-9)
        assert all(math.isfinite(s) for _, s in p["top_items"]) and p["history_len"] >= 1
    assert sum(p["duplicate"] for p in preds) >= len(repeats)  # the repeats at least
    for o in (v for k, _, v in sent if k == "outcomes"):
        assert o["happened"]["gap_s"] >= 0  # out-of-order events give no outcome with a negative gap
