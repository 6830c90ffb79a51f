"""stream_app.records: every record's codec round-trips, and old stored values still read."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from models.predictor import Prediction
from models.schema import EventSeq
from stream_app.records import (ModelUpdate, StoredPrediction, UserState, decode_state, dlq_record, encode_state,
                                outcome_record, prediction_record)


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
