"""Hypothesis strategies for bad and odd event messages, shared by the unit suite (through the real
:class:`~stream_app.pipeline.Pipeline`) and the broker suite: :func:`case` draws one ``(key, value,
expected)`` message whose expected outcome (``ok`` or the DLQ reason) is known by construction, not by
asking ``parse_event``: each case starts from a valid event and applies one mutation whose reason the
event schema names (stream_app/events.py)."""

from __future__ import annotations

import time

import orjson
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from stream_app.events import FIELDS, MAX_ID_LEN


users = st.sampled_from([f"u{i}" for i in range(12)] + ["ü-ßer", "用户", "u\x01ctl", "u" * MAX_ID_LEN])
ints = st.integers(-2**63, 2**63 - 1)  # JSON numbers orjson writes
text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)  # any valid unicode, controls included
ages_ms = st.integers(1000, 30 * 86400_000)  # event times up to 30 days before the draw


@st.composite
def case(draw) -> tuple[bytes | None, bytes, str]:
    """(key, value, expected): ``ok`` or the DLQ reason."""
    now = int(time.time() * 1000)  # at draw time: a long test session must not age the cases
    user = draw(users)
    base = {"user_id": user, "item_id": draw(text), "action": draw(st.sampled_from(["view", "click", "cart", "fav",
                                                                                   "purchase"])),
            "ts": now - draw(ages_ms)}
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
        ev["ts"], expected = now + draw(st.integers(3_600_000, 2**62)), "clock_skew"
    elif kind == "too_long_id":
        ev["item_id"], expected = "i" * draw(st.integers(MAX_ID_LEN + 1, 5000)), "bad_value"
    elif kind == "empty_id":
        ev["item_id"], expected = "", "bad_value"
    elif kind == "key_mismatch":
        key, expected = (user + "x").encode(), "key_mismatch"
    elif kind == "huge_key":
        n = draw(st.integers(1_000, 200_000))  # longer than any user id: never the event's own
        key, expected = (user.encode() * (n // len(user.encode()) + 1))[:n], "key_mismatch"
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




def hypothesis_cases(examples: int, size: int) -> list[tuple[bytes | None, bytes, str]]:
    """``examples`` × ``size`` cases drawn by hypothesis (derandomized: the same ones every run), for a
    test that sends them all through one long-lived worker rather than one example at a time."""
    out: list[tuple[bytes | None, bytes, str]] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate])
    @given(st.lists(case(), min_size=size, max_size=size))
    def collect(batch):
        out.extend(batch)

    collect()
    return out
