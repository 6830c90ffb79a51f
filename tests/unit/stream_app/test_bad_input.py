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
import time

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stream_app.events import FIELDS, MAX_ID_LEN
from stream_app.records import DLQ_MAX_BYTES

pytestmark = pytest.mark.timeout(300)

NOW_MS = int(time.time() * 1000)
BATCH = 50
EXAMPLES = 200

users = st.sampled_from([f"u{i}" for i in range(12)] + ["ü-ßer", "用户", "u\x01ctl", "u" * MAX_ID_LEN])
ints = st.integers(-2**63, 2**63 - 1)  # JSON numbers orjson writes
text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)  # any valid unicode, controls included
recent_ts = st.integers(NOW_MS - 30 * 86400_000, NOW_MS - 1000)


@st.composite
def case(draw) -> tuple[bytes | None, bytes, str]:
    """(key, value, expected): ``ok`` or the DLQ reason."""
    user = draw(users)
    base = {"user_id": user, "item_id": draw(text), "action": draw(st.sampled_from(["view", "click", "cart", "fav",
                                                                                   "purchase"])),
            "ts": draw(recent_ts)}
    key = user.encode()
    kind = draw(st.sampled_from(["ok", "extra", "optional", "not_json", "not_object", "missing", "null", "bad_type_ts",
                                 "bad_type_action", "bad_type_item", "bad_action", "bad_ts_seconds", "nan_text",
                                 "clock_skew", "too_long_id", "empty_id", "key_mismatch", "huge_key", "no_key", "too_large",
                                 "bad_optional", "negative_price", "float_ts"]))
    ev, expected = dict(base), "ok"
    if kind == "extra":
        ev[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS))] = draw(
            st.one_of(ints, text, st.lists(ints, max_size=3)))
    elif kind == "optional":
        ev.update(device=draw(text), location=draw(text), category=draw(text), price=draw(st.floats(0, 1e6)))
    elif kind == "not_json":
        return key, draw(st.binary(min_size=1, max_size=60).filter(_not_json)), "not_json"
    elif kind == "not_object":
        return key, orjson.dumps(draw(st.one_of(ints, text, st.lists(ints, max_size=3)))), \
            "not_object"
    elif kind == "missing":
        del ev[draw(st.sampled_from(["user_id", "item_id", "action", "ts"]))]
        expected = "missing_field"
    elif kind == "null":  # JSON null (also what NaN/inf floats become in orjson) counts as missing
        ev[draw(st.sampled_from(["user_id", "item_id", "action", "ts"]))] = None
        expected = "missing_field"
    elif kind == "bad_type_ts":
        ev["ts"], expected = draw(st.one_of(text, st.booleans(), st.lists(ints, max_size=2))), "bad_type"
    elif kind == "bad_type_action":
        ev["action"], expected = draw(st.one_of(ints, st.booleans())), "bad_type"
    elif kind == "bad_type_item":
        ev["item_id"], expected = draw(st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.lists(ints, max_size=2),
                                                 st.dictionaries(text, ints, max_size=2))), "bad_type"
    elif kind == "bad_action":
        ev["action"], expected = draw(text.filter(lambda a: a not in ("view", "click", "cart", "fav", "purchase"))), \
            "bad_action"
    elif kind == "bad_ts_seconds":
        ev["ts"], expected = draw(st.integers(-10**12, 946_684_799_999)), "bad_ts"
    elif kind == "nan_text":  # NaN / Infinity are not JSON
        return key, orjson.dumps(ev).replace(str(ev["ts"]).encode(), draw(st.sampled_from([b"NaN", b"Infinity",
                                                                                           b"-Infinity"]))), "not_json"
    elif kind == "clock_skew":
        ev["ts"], expected = draw(st.integers(NOW_MS + 3_600_000, 2**62)), "clock_skew"
    elif kind == "too_long_id":
        ev["item_id"], expected = "i" * draw(st.integers(MAX_ID_LEN + 1, 5000)), "bad_value"
    elif kind == "empty_id":
        ev["item_id"], expected = "", "bad_value"
    elif kind == "key_mismatch":
        key, expected = (user + "x").encode(), "key_mismatch"
    elif kind == "huge_key":
        key, expected = user.encode() * draw(st.integers(2_000, 20_000)), "key_mismatch"
    elif kind == "no_key":
        key, expected = None, "key_mismatch"
    elif kind == "too_large":
        ev["item_text"], expected = "x" * draw(st.integers(17_000, 40_000)), "too_large"
    elif kind == "bad_optional":
        ev[draw(st.sampled_from(["device", "location", "category", "session_id"]))] = draw(ints)
        expected = "bad_type"
    elif kind == "negative_price":
        ev["price"], expected = draw(st.floats(max_value=-0.01, allow_infinity=False)), "bad_value"
    elif kind == "float_ts":
        ev["ts"] = float(ev["ts"]) + 0.5
    return key, orjson.dumps(ev), expected


def _not_json(b: bytes) -> bool:
    try:
        orjson.loads(b)
    except orjson.JSONDecodeError:
        return True
    return False


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
