"""Validation of the ``events`` topic: one test per reject reason, accepted edge cases, a fuzz test."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.errors import EventRejected
from stream_app.events import MAX_ID_LEN, REASONS, Event, parse_event

NOW = 1_700_000_000_000
GOOD = {"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW}


def parse(obj=None, raw: bytes | None = None, **kw) -> Event:
    return parse_event(raw if raw is not None else orjson.dumps(obj), now_ms=NOW, **kw)


def reason(obj=None, raw: bytes | None = None, **kw) -> str:
    with pytest.raises(EventRejected) as info:
        parse(obj, raw, **kw)
    return info.value.reason


# --- one test per reject reason (the list below must cover events.REASONS) ---------------------------
def test_too_large():
    assert reason({**GOOD, "item_text": "x" * 500}, max_bytes=200) == "too_large"


def test_not_json():
    assert reason(raw=b"{not json") == "not_json"
    assert reason(raw=b"\xff\xfe") == "not_json"


def test_not_object():
    assert reason(raw=b"[1, 2]") == "not_object"
    assert reason(raw=b'"u1"') == "not_object"


def test_missing_field():
    for field in ("user_id", "action", "ts", "item_id"):
        assert reason({k: v for k, v in GOOD.items() if k != field}) == "missing_field", field
    assert reason({**GOOD, "ts": None}) == "missing_field"


def test_bad_type():
    assert reason({**GOOD, "ts": str(NOW)}) == "bad_type"
    assert reason({**GOOD, "ts": True}) == "bad_type"
    assert reason({**GOOD, "user_id": ["u"]}) == "bad_type"
    assert reason({**GOOD, "action": 3}) == "bad_type"
    assert reason({**GOOD, "device": 7}) == "bad_type"
    assert reason({**GOOD, "price": "9.99"}) == "bad_type"


def test_bad_value():
    assert reason({**GOOD, "user_id": ""}) == "bad_value"
    assert reason({**GOOD, "item_id": "x" * (MAX_ID_LEN + 1)}) == "bad_value"
    assert reason({**GOOD, "price": -1}) == "bad_value"
    assert reason({**GOOD, "item_text": "t" * 5000}) == "bad_value"


def test_bad_action():
    assert reason({**GOOD, "action": "pv"}) == "bad_action"  # aliases are the loader's job


def test_bad_ts():
    assert reason({**GOOD, "ts": NOW // 1000}) == "bad_ts"  # seconds
    assert reason(raw=b'{"user_id":"u1","item_id":"i","action":"view","ts":NaN}') in ("not_json", "bad_ts")


def test_clock_skew():
    assert reason({**GOOD, "ts": NOW + 301_000}) == "clock_skew"
    assert reason({**GOOD, "ts": NOW - 3_600_000}, max_age_ms=60_000) == "clock_skew"


def test_key_mismatch():
    assert reason(GOOD, key=b"u2") == "key_mismatch"
    assert reason(GOOD, key=b"") == "key_mismatch"


def test_every_reason_has_a_test():
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(REASONS) <= tested, set(REASONS) - tested


# --- accepted edge cases ---------------------------------------------------------------------------
def test_accepts_minimal_and_optional_fields():
    e = parse({**GOOD, "device": "ios", "location": "de-be", "category": "c1", "price": 0, "session_id": "s",
               "item_text": "Grüner Tee 🍵", "unknown_field": {"nested": 1}}, key=b"u1")
    assert (e.device, e.location, e.category, e.price, e.item_text) == ("ios", "de-be", "c1", 0.0, "Grüner Tee 🍵")
    assert "unknown_field" not in orjson.loads(e.to_json())


def test_accepts_numeric_ids_float_ts_and_skew_boundary():
    e = parse({**GOOD, "user_id": 42, "item_id": 7, "ts": float(NOW) + 0.9})
    assert (e.user_id, e.item_id, e.ts) == ("42", "7", NOW)
    assert parse({**GOOD, "ts": NOW + 300_000}).ts == NOW + 300_000
    assert parse({**GOOD, "user_id": "ü" * MAX_ID_LEN}).user_id == "ü" * MAX_ID_LEN


# --- fuzz: any bytes are either an Event or an EventRejected with a known reason -------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=10)


@settings(max_examples=120, deadline=None)
@given(raw=st.binary(max_size=300), key=st.none() | st.binary(max_size=10))
def test_fuzz_bytes_only_raise_event_rejected(raw, key):
    try:
        parse_event(raw, now_ms=NOW, key=key)
    except EventRejected as exc:
        assert exc.reason in REASONS


@settings(max_examples=120, deadline=None)
@given(obj=st.fixed_dictionaries({}, optional={"user_id": json_values, "item_id": json_values,
                                               "action": st.sampled_from(["view", "buy", "cart"]) | json_values,
                                               "ts": st.integers() | json_values, "price": json_values,
                                               "device": json_values, "item_text": json_values}))
def test_fuzz_objects_only_raise_event_rejected(obj):
    try:
        e = parse_event(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), now_ms=NOW)
    except EventRejected as exc:
        assert exc.reason in REASONS
    except orjson.JSONEncodeError:
        pass
    else:
        assert isinstance(e, Event) and e.user_id and e.ts >= 946_684_800_000
