"""stream_app.records: every record's codec round-trips, and old stored values still read."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import time
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from models.predictor import Prediction
from models.schema import ACTIONS, EventSeq
from stream_app.records import (CONTROL_HEADER, DLQ_MAX_BYTES, DLQ_MAX_KEY_BYTES, DLQ_MIN_BYTES, SCHEMA_VERSION,
                                SCHEMAS, ForgetRequest, ModelUpdate, StoredPrediction, UserState, decode_state,
                                dlq_key, dlq_record, encode_state, forget_marker, forget_user_of, outcome_record,
                                prediction_record, schema)


def history() -> EventSeq:
    h = EventSeq.empty()
    h = h.appended("商品-1 🍵", "purchase", 1_700_000_000_000, device="ios", location="de-be", category="茶")
    return h.appended("item\"quote", "cart", 1_700_000_060_000)


def stored(partition=1, offset=7) -> StoredPrediction:
    return StoredPrediction("abc", 1_700_000_000_000, partition, offset,
                            Prediction([0.1, 0.2, 0.3, 0.0, 0.4], [("商品-1 🍵", 0.5), ("x", 0.25)], 42.0, "why"))


def test_user_state_round_trips_unicode_columns_and_the_prediction():
    h = history()
    back = decode_state(encode_state(UserState(h)))
    assert back.history == h and back.last is None and back.history.actions.dtype == np.uint8
    both = decode_state(encode_state(UserState(h, stored())))
    assert both.history == h and both.last == stored()
    assert decode_state(None).history == EventSeq.empty() and decode_state(None).last is None


def test_a_state_written_by_earlier_versions_still_decodes():
    h = history()
    assert decode_state(h.pack()) == UserState(h)  # before the prediction joined the window
    old = h.to_json() | {"p": {"v": "m1", "event_ts": 5, "partition": 0, "offset": 3, "p": [0.2, 0.8, 0, 0, 0],
                              "top": [["a", 0.5]], "gap": 60.0}}  # the stored form since session 5
    last = decode_state(orjson.dumps(old)).last
    assert last.version == "m1" and last.prediction.top_items == [("a", 0.5)] and last.covers(0, 3)
    assert not last.covers(0, 4) and not last.covers(1, 3)
    assert last.schema_version == 0 and stored().schema_version == SCHEMA_VERSION  # before the contract / now


def test_an_outcome_of_a_prediction_stored_before_the_contract_reports_no_scores():
    """The user's first event after the upgrade pairs with a prediction whose Transformer scores were
    raw (3.16, 1.72, ...): its outcome leaves them out rather than break the contract, and still
    says where the item ranked."""
    h = history()
    old = h.to_json() | {"p": {"v": "m1", "event_ts": 5, "partition": 0, "offset": 3, "p": [0.2, 0.8, 0, 0, 0],
                              "top": [["a", 3.16], ["b", 1.72]], "gap": 60.0}}
    last = decode_state(orjson.dumps(old)).last
    out = _valid("outcomes", outcome_record("u1", last, served=h, action="cart", item_id="b", category="", event_ts=9,
                                            partition=0, offset=4))
    assert out["context"]["top_items"] == [] and out["happened"]["item_rank"] == 2
    now = decode_state(encode_state(UserState(h, stored()))).last  # stored by this release: kept
    assert outcome_record("u1", now, served=h, action="cart", item_id="x", category="", event_ts=9, partition=0,
                          offset=4) == outcome_record("u1", stored(), served=h, action="cart", item_id="x",
                                                      category="", event_ts=9, partition=0, offset=4)
    assert orjson.loads(outcome_record("u1", now, served=h, action="cart", item_id="x", category="", event_ts=9,
                                       partition=0, offset=4))["context"]["top_items"] == [["商品-1 🍵", 0.5],
                                                                                         ["x", 0.25]]


def test_prediction_and_outcome_records_carry_the_contract_fields():
    rec = orjson.loads(prediction_record("u1", stored(), latency_ms=3.14159, history_len=2, activity=5,
                                         duplicate=False, published_ms=9))
    assert rec["action_probs"] == {"view": 0.1, "click": 0.2, "cart": 0.3, "fav": 0.0, "purchase": 0.4}
    assert rec["top_items"] == [["商品-1 🍵", 0.5], ["x", 0.25]] and rec["latency_ms"] == 3.142
    assert (rec["model_version"], rec["partition"], rec["offset"], rec["explanation"]) == ("abc", 1, 7, "why")
    out = orjson.loads(outcome_record("u1", stored(), served=history(), action="purchase", item_id="x",
                                      category="c1", event_ts=1_700_000_090_000, partition=1, offset=9))
    assert out["happened"] == {"action": "purchase", "item_id": "x", "category": "c1", "ts": 1_700_000_090_000,
                               "gap_s": 90.0, "item_rank": 2, "action_prob": 0.4}
    assert out["context"]["model_version"] == "abc" and out["context"]["offset"] == 7
    assert EventSeq.from_json(out["context"]["window"]) == history()


def test_an_outcome_carries_the_events_item_text_to_the_trainer():
    """``happened.item_text`` (added within version 1): present when the event had text, left out
    otherwise; the trainer's example reads it (a new item starts at its text row)."""
    from online.examples import example_from_outcome

    kw = dict(served=history(), action="view", item_id="new-1", category="", event_ts=1_700_000_090_000,
              partition=1, offset=9)
    with_text = _valid("outcomes", outcome_record("u1", stored(), item_text="Mulan (1998) — 動畫", **kw))
    without = _valid("outcomes", outcome_record("u1", stored(), **kw))
    assert with_text["happened"]["item_text"] == "Mulan (1998) — 動畫" and "item_text" not in without["happened"]
    assert example_from_outcome(with_text).item_text == "Mulan (1998) — 動畫"
    assert example_from_outcome(without).item_text == ""
    with pytest.raises(jsonschema.ValidationError):
        _valid("outcomes", orjson.dumps({**without, "happened": {**without["happened"], "item_text": ""}}))


def test_dlq_record_keeps_bytes_that_are_not_utf8():
    rec = orjson.loads(dlq_record(b"\xff\x00", "not_json", "invalid JSON", topic="events", partition=2, offset=5,
                                  key=b"u1"))
    assert rec["encoding"] == "base64" and rec["key"] == "u1" and rec["source"]["offset"] == 5


def test_dlq_record_keeps_original_bytes_and_source():
    rec = orjson.loads(dlq_record(b"\xff\x00", "not_json", "bad", topic="events", partition=3, offset=17, key=b"u"))
    assert rec["encoding"] == "base64" and rec["source"] == {"topic": "events", "partition": 3, "offset": 17}
    rec = orjson.loads(dlq_record(b'{"a":1}', "not_object", "x", topic="t", partition=0, offset=0))
    assert rec["original"] == '{"a":1}' and rec["key"] is None


@pytest.mark.parametrize("value, problem", [(b"not json", "not JSON"), (b"[1]", "JSON object"),
                                            (b'{"path": ""}', "non-empty"), (None, "JSON object"),
                                            (b'{"path": "/m", "sha256": 5}', "hex string")])
def test_model_update_decode_names_what_is_wrong(value, problem):
    with pytest.raises(ValueError, match=problem):
        ModelUpdate.decode(value)


def test_model_update_round_trip_and_version_match():
    u = ModelUpdate("v7", "/models/v7", "0123456789abcdef" * 4)
    assert ModelUpdate.decode(u.encode()) == u
    assert u.names("0123456789ab") and not u.names("0123") and not u.names("fedcba987654")
    assert not ModelUpdate(None, "/m").names("0123456789ab")


# --- dead letters always fit the producer's limit ---------------------------------------------------------------
def _original(rec: dict) -> bytes:
    return rec["original"].encode() if rec["encoding"] == "utf-8" else base64.b64decode(rec["original"])


_nasty_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=3000)  # control chars, surrogates
_payload = st.one_of(
    st.binary(max_size=4000),
    _nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates: invalid UTF-8
    st.tuples(st.sampled_from(["\x00", "\x1f", '"', "\\", "é", "🍵", "a"]), st.integers(0, 60_000)).map(
        lambda cn: (cn[0] * cn[1]).encode()),  # long runs of the costliest characters to escape
    st.tuples(st.binary(min_size=1, max_size=40), st.integers(0, 5_000)).map(lambda bn: bn[0] * bn[1]),  # big blocks
    st.tuples(_nasty_text, st.integers(0, 500)).map(lambda tn: (tn[0] * tn[1]).encode("utf-8", "surrogatepass")),
)


_huge = st.tuples(st.one_of(st.binary(min_size=1, max_size=40),
                            _nasty_text.filter(bool).map(lambda t: t.encode("utf-8", "surrogatepass"))),
                  st.integers(1, 3000)).map(lambda bn: bn[0] * (70_000 // len(bn[0]) + bn[1]))  # > every bound


@settings(max_examples=1000, deadline=None)
@given(raw=st.none() | _payload | _huge, key=st.none() | _payload, detail=_nasty_text, reason=_nasty_text,
       topic=st.text(max_size=300), max_bytes=st.sampled_from([DLQ_MIN_BYTES, 20_000, 65_536]))
def test_dlq_record_never_exceeds_its_bound_and_keeps_a_matching_prefix(raw, key, detail, reason, topic, max_bytes):
    out = dlq_record(raw, reason, detail, topic=topic, partition=3, offset=2**40, key=key, max_bytes=max_bytes)
    assert len(out) <= max_bytes
    rec = orjson.loads(out)
    raw = raw or b""
    kept = _original(rec)
    event(f"truncated={bool(rec.get('truncated'))} encoding={rec['encoding']}")
    if rec.get("truncated"):
        assert rec["original_bytes"] == len(raw) and rec["original_sha256"] == hashlib.sha256(raw).hexdigest()
        assert raw.startswith(kept) and len(kept) < len(raw)
        assert len(out) > max_bytes - 16  # the prefix fills the room: at most one escaped character short
    else:
        assert kept == raw and "original_sha256" not in rec
    assert rec["source"]["offset"] == 2**40 and len(rec["detail"]) <= 1024
    if key and len(key) > DLQ_MAX_KEY_BYTES:
        assert rec["key_bytes"] == len(key) and rec["key_sha256"] == hashlib.sha256(key).hexdigest()
    assert dlq_key(key) == (key[:DLQ_MAX_KEY_BYTES] if key is not None else None)


def test_dlq_record_of_a_megabyte_and_of_escaped_control_characters_fits_the_default_bound():
    for raw in (b"x" * 1_000_000, b"\x01" * 170_000, orjson.dumps({"user_id": "u", "t": "\x00" * 170_000})):
        out = dlq_record(raw, "too_large", "d", topic="events", partition=0, offset=1, key=b"k" * 900_000)
        rec = orjson.loads(out)
        assert len(out) <= DLQ_MAX_BYTES and rec["truncated"] and rec["original_bytes"] == len(raw)
        assert raw.startswith(rec["original"].encode()) and len(rec["original"]) > DLQ_MAX_BYTES // 7
    assert DLQ_MAX_BYTES + DLQ_MAX_KEY_BYTES + 1024 < 1_000_000  # the producer's max_request_size (Faust's default)
    small = dlq_record(b'{"a":1}', "not_object", "x", topic="t", partition=0, offset=0)
    assert "truncated" not in orjson.loads(small)


@pytest.mark.parametrize("value", [b"garbage", b"[1]", b'{"i": "abc", "a": [0], "t": [1], "d": [""], "l": [""]}',
                                   b'{"i": ["a"], "a": [0, 1], "t": [1], "d": [""], "l": [""]}',
                                   b'{"i": ["a"], "a": [-1], "t": [1], "d": [""], "l": [""]}',
                                   b'{"i": ["a", "b"], "a": [0, 0], "t": [5, 1], "d": ["", ""], "l": ["", ""]}',
                                   b'{"i": [1], "a": [0], "t": [1], "d": [""], "l": [""]}',
                                   b'{"i": ["a"], "a": [[0]], "t": [1], "d": [""], "l": [""]}',
                                   b'{"i": ["a"], "a": [0], "t": ["x"], "d": [""], "l": [""]}',
                                   b'{"i": ["a"], "a": [0], "t": [1e300], "d": [""], "l": [""]}',
                                   b'{"i": ["a"], "a": [0], "t": [1], "d": [""], "l": [""], "p": {"v": "m"}}',
                                   b'{"i": ["a"], "a": [0], "t": [1], "d": [""], "l": [""], "p": 5}'])
def test_decode_state_raises_value_error_on_any_unreadable_value(value):
    with pytest.raises(ValueError, match="stored state unreadable"):
        decode_state(value)


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=200) | st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["i", "a", "t", "d", "l", "c", "p", "v",
                                                                         "event_ts", "partition", "offset", "top",
                                                                         "gap"]), c, max_size=7),
    max_leaves=20).map(orjson.dumps))
def test_decode_state_only_raises_value_error(value):
    try:
        state = decode_state(value)
    except ValueError:
        return
    n = len(state.history)
    assert len(state.history.ts) == len(state.history.categories) == n


# --- the contract: schema_version and the JSON Schemas (stream_app/schemas/, docs/contract.md) ---------------
def _valid(topic: str, record: bytes | dict) -> dict:
    """``record`` decoded and validated against ``topic``'s schema (raises naming the failure)."""
    rec = orjson.loads(record) if isinstance(record, bytes) else record
    jsonschema.Draft202012Validator(schema(topic), format_checker=jsonschema.FormatChecker()).validate(rec)
    return rec


def test_the_schemas_are_valid_draft_2020_12_files_shipped_with_the_package():
    import tomllib

    root = Path(__file__).resolve().parents[3]
    for name, file in SCHEMAS.items():
        s = schema(name)
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert (root / "stream_app" / "schemas" / file).is_file()
        consts = [d["properties"]["schema_version"]["const"] for d in (s, *s.get("$defs", {}).values())
                  if "schema_version" in d.get("properties", {})]
        assert consts and set(consts) == {SCHEMA_VERSION}, name
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "schemas/*.json" in data["stream_app"]  # installed with the package, not only in the checkout
    with pytest.raises(ValueError, match="no schema for 'events'"):
        schema("events")


def test_records_built_by_the_codecs_carry_schema_version_and_validate():
    pred = _valid("predictions", prediction_record("u1", stored(), latency_ms=3.0, history_len=2, activity=5,
                                                   duplicate=False, published_ms=9))
    out = _valid("outcomes", outcome_record("u1", stored(), served=history(), action="purchase", item_id="x",
                                            category="c1", event_ts=1_700_000_090_000, partition=1, offset=9))
    marker = _valid("outcomes", forget_marker("u1", "idle"))
    dlq = _valid("events.dlq", dlq_record(b"\xff", "not_json", "bad", topic="events", partition=0, offset=1, key=b"k"))
    big = _valid("events.dlq", dlq_record(b"x" * 300_000, "too_large", "big", topic="events", partition=0, offset=2,
                                          key=b"k" * 5000))
    update = _valid("model-updates", ModelUpdate("0123456789ab", "/m/v1", "0123456789abcdef" * 4).encode())
    online = _valid("model-updates", ModelUpdate("0123456789ab", "/m/v2", "ab" * 32, 3, "rollback").encode())
    for rec in (pred, out, marker, dlq, big, update, online):
        assert rec["schema_version"] == SCHEMA_VERSION == 1
    assert big["truncated"] and "key_sha256" in big


def _set(path: str, value):
    """A change to a decoded record: set the field at the dotted ``path`` to ``value``."""
    def change(rec: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            rec = rec[key]
        rec[last] = value
    return change


@pytest.mark.parametrize("topic, change, why", [
    ("predictions", _set("top_items", [["a", 1.5]]), "1.5 is greater than the maximum of 1"),
    ("predictions", _set("top_items", [["a", -0.1]]), "-0.1 is less than the minimum of 0"),
    ("predictions", _set("action_probs", {"view": 1.0}), "'click' is a required property"),
    ("predictions", _set("schema_version", 2), "1 was expected"),
    ("predictions", _set("surprise", 1), "Additional properties are not allowed"),
    ("outcomes", _set("happened.action", "teleport"), "is not valid under any of the given schemas"),
    ("outcomes", _set("context.top_items", [["a", 2]]), "is not valid under any of the given schemas"),
    ("events.dlq", _set("reason", "because"), "'because' is not one of"),
    ("model-updates", _set("sha256", "abc"), "does not match"),
])
def test_the_schemas_reject_what_breaks_the_contract(topic, change, why):
    """A schema that accepted anything would prove nothing: each field the contract fixes is checked."""
    good = {"predictions": prediction_record("u1", stored(), latency_ms=3.0, history_len=2, activity=5,
                                             duplicate=False, published_ms=9),
            "outcomes": outcome_record("u1", stored(), served=history(), action="purchase", item_id="x",
                                       category="c1", event_ts=1_700_000_090_000, partition=1, offset=9),
            "events.dlq": dlq_record(b"{", "not_json", "bad", topic="events", partition=0, offset=1),
            "model-updates": ModelUpdate("v", "/m/v1", "ab" * 32).encode()}[topic]
    rec = _valid(topic, good)
    change(rec)
    with pytest.raises(jsonschema.ValidationError, match=why):
        _valid(topic, rec)


def test_the_dead_letter_schema_names_every_reason_the_worker_writes():
    from stream_app.batcher import PREDICT_FAILED
    from stream_app.events import REASONS
    from stream_app.pipeline import PROCESSING_FAILED, STATE_RESET

    assert set(schema("events.dlq")["properties"]["reason"]["enum"]) == {*REASONS, PROCESSING_FAILED, STATE_RESET,
                                                                        PREDICT_FAILED}


_probability = st.floats(0, 1, allow_nan=False)
_ids = st.text(st.characters(codec="utf-8"), max_size=20)


@settings(max_examples=300, deadline=None)
@given(probs=st.lists(st.floats(0.001, 10), min_size=5, max_size=5),
       tops=st.lists(st.tuples(_ids, _probability), max_size=10), gap=st.floats(0, 1e9), explanation=_ids,
       user=_ids.filter(bool), duplicate=st.booleans(), action=st.sampled_from(ACTIONS))
def test_any_prediction_a_predictor_may_make_gives_valid_records(probs, tops, gap, explanation, user, duplicate,
                                                                 action):
    """What the batcher lets through (``stream_app.batcher.check_prediction``: action probabilities
    normalised) with probabilities as scores always makes valid prediction and outcome records."""
    from stream_app.batcher import check_prediction

    tops = sorted(tops, key=lambda t: -t[1])
    p = check_prediction(Prediction(probs, tops, gap, explanation), k=10)
    last = StoredPrediction("v1", 1_700_000_000_000, 2, 3, p)
    rec = _valid("predictions", prediction_record(user, last, latency_ms=1.5, history_len=1, activity=1,
                                                  duplicate=duplicate, published_ms=1))
    assert math.isclose(sum(rec["action_probs"].values()), 1.0, rel_tol=1e-9)
    _valid("outcomes", outcome_record(user, last, served=history(), action=action, item_id=tops[0][0] if tops else "i",
                                      category="", event_ts=1_700_000_001_000, partition=2, offset=4))


@settings(max_examples=200, deadline=None)
@given(raw=st.none() | st.binary(max_size=3000) | st.text(max_size=3000).map(str.encode),
       key=st.none() | st.binary(max_size=2000), detail=st.text(max_size=2000),
       reason=st.sampled_from(sorted(schema("events.dlq")["properties"]["reason"]["enum"])))
def test_any_dead_letter_is_a_valid_record(raw, key, detail, reason):
    _valid("events.dlq", dlq_record(raw, reason, detail, topic="events", partition=1, offset=2, key=key,
                                    max_bytes=DLQ_MIN_BYTES))


def test_a_model_update_from_a_newer_contract_is_refused_and_one_from_before_it_read():
    assert ModelUpdate.decode(b'{"path": "/m", "sha256": "' + b"ab" * 32 + b'"}').path == "/m"  # before the field
    newer = orjson.dumps({"schema_version": SCHEMA_VERSION + 1, "path": "/m", "sha256": "ab" * 32})
    with pytest.raises(ValueError, match="'schema_version' 2 is not one this worker reads"):
        ModelUpdate.decode(newer)
    with pytest.raises(ValueError, match="schema_version"):
        ModelUpdate.decode(b'{"schema_version": true, "path": "/m"}')


def test_every_record_the_pipeline_publishes_validates(make_app):
    """The real pipeline (Faust agent in ``test_context``, RocksDB tables, the baseline learning): good
    events, bad events and a forget request; every record it sends validates against its topic's schema."""
    app, rec = make_app()
    t = int(time.time() * 1000) - 60_000

    def ev(user, item, n, action="view"):
        return orjson.dumps({"user_id": user, "item_id": item, "action": action, "ts": t + n * 1_000})

    msgs = [(f"u{n % 3}".encode(), ev(f"u{n % 3}", f"i{n % 5}", n, ACTIONS[n % 5]), None) for n in range(30)]
    msgs += [(b"u1", b"{broken", None), (b"u2", ev("u1", "i1", 40), None), (None, ev("u3", "i1", 41), None),
             (b"u1", orjson.dumps({"user_id": "u1", "item_id": "i1", "action": "teleport", "ts": t}), None),
             (b"u1", ForgetRequest().encode(), [(CONTROL_HEADER, b"forget")])]

    async def run():
        async with app.pipeline.agent.test_context() as agent:
            for key, value, headers in msgs:
                await agent.put(value, key=key, headers=headers)
                await app.pipeline.batcher.drain()

    asyncio.run(run())
    topics = {"predictions": "predictions", "outcomes": "outcomes", "dlq": "events.dlq"}
    seen = {kind: [_valid(topics[kind], value) for value in rec.of(kind)] for kind in topics}
    assert len(seen["predictions"]) == 30 and len(seen["dlq"]) == 4 and len(seen["outcomes"]) == 27 + 1
    assert any(forget_user_of(o) == "u1" for o in seen["outcomes"])
    tops = [p["top_items"] for p in seen["predictions"] if p["top_items"]]
    assert tops and all(sum(s for _, s in top) <= 1 + 1e-9 for top in tops)
