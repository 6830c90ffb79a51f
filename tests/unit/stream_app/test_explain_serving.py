"""Explanations in serving: off by default (no ``why``), on per worker with the setting ``explain_top``; the
``why`` of a real model's prediction survives every hop (inference process JSON, the batcher's check, the
stored state) and validates against the ``predictions`` JSON Schema, which rejects a malformed one."""

from __future__ import annotations

import copy

import jsonschema
import numpy as np
import orjson
import pytest

from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.encoding import ItemVocab
from models.errors import ConfigError
from models.model import NextActionModel
from models.predictor import Prediction
from models.schema import EventSeq
from models.serving import TransformerPredictor
from online.baseline import PopularityMarkovPredictor
from stream_app.batcher import check_prediction
from stream_app.predictors import load_transformer, serving_options
from stream_app.records import StoredPrediction, UserState, decode_state, encode_state, prediction_record, schema
from stream_app.settings import Settings

ITEMS = [f"i{k}" for k in range(20)]
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    vocab = ItemVocab(ITEMS, n_hash_buckets=4)
    torch.manual_seed(0)
    model = NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=16, max_len=8, dropout=0.0,
                                        n_device_buckets=8, n_location_buckets=8))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "m", model, vocab)


def _histories() -> list[EventSeq]:
    rng = np.random.default_rng(0)
    return [EventSeq.from_columns([ITEMS[k] for k in rng.integers(0, 20, n)], rng.integers(0, 5, n),
                                  T0 + np.cumsum(rng.integers(1000, 10 ** 6, n)), devices=["ios"] * n,
                                  locations=["de"] * n) for n in (1, 4, 12)]


def _record(p: Prediction) -> dict:
    rec = orjson.loads(prediction_record("u1", StoredPrediction("v1", T0, 0, 3, p), latency_ms=1.0, history_len=2,
                                         activity=1, duplicate=False, published_ms=T0))
    jsonschema.Draft202012Validator(schema("predictions")).validate(rec)
    return rec


def test_explanations_are_off_by_default(checkpoint):
    assert Settings().explain_top == 0 and serving_options(Settings())["explain_top"] == 0
    pred = load_transformer(Settings(device="cpu", serve_threads=1), checkpoint)
    assert pred.explain_top == 0
    hs = _histories()
    for p in pred.predict(hs, k=3, users=["a", "b", "c"]) + pred.predict_full(hs, k=3):
        assert p.why is None and "why" not in _record(p) and "w" not in p.to_json()
    assert all(p.why is None for p in PopularityMarkovPredictor().predict(hs, k=3))  # the baseline never explains


def test_the_setting_turns_them_on_and_the_why_reaches_the_record(checkpoint, monkeypatch):
    monkeypatch.setenv("NEXTACTION_EXPLAIN_TOP", "2")
    pred = load_transformer(Settings(device="cpu", serve_threads=1), checkpoint)
    assert pred.explain_top == 2
    hs = _histories()
    cached, full = pred.predict(hs, k=3, users=["a", "b", "c"]), pred.predict_full(hs, k=3)
    assert [p.why for p in cached] == [p.why for p in full]  # the same explanation whichever path served
    for h, p in zip(hs, cached):
        why = p.why
        assert why["target"] == "action" and why["method"] == "occlusion"
        assert why["label"] == max(p.action_dict(), key=p.action_dict().get)  # explains the served argmax
        assert why["prob"] == pytest.approx(max(p.action_probs), abs=1e-4)
        assert len(why["events"]) <= 2 and all(e["weight"] > 0 for e in why["events"])
        assert all(h.items[len(h) - 1 - e["offset_in_history"]] == e["item_id"] for e in why["events"])
        assert set(why["context"]) == {"hour", "dow", "device", "location"}
        # every hop: the inference process (JSON), the batcher's check, the record, the stored state
        back = check_prediction(Prediction.from_json(orjson.loads(orjson.dumps(p.to_json()))), k=3)
        assert back.why == why
        assert _record(back)["why"] == why
        state = UserState(h, StoredPrediction("v1", T0, 0, 3, back))
        assert decode_state(encode_state(state)).last.prediction.why == why


@pytest.mark.parametrize("path, value, message", [
    (("events", 0, "offset_in_history"), -1, "less than the minimum"),
    (("events", 0, "action"), "teleport", "is not one of"),
    (("context",), {"weather": {"value": "rain", "weight": 0.1}}, "is not one of"),
    (("method",), "lime", "is not one of"),
    (("prob",), 1.5, "greater than the maximum"),
])
def test_the_schema_rejects_a_malformed_why(checkpoint, path, value, message):
    pred = TransformerPredictor.from_checkpoint(checkpoint, device="cpu", num_threads=1, explain_top=3)
    p = pred.predict_full([EventSeq.from_columns(ITEMS[:5], ["view", "cart", "view", "fav", "view"],
                                                 T0 + 60_000 * np.arange(5))], k=2)[0]
    rec = _record(p)  # valid as made
    if path[0] == "events" and not rec["why"]["events"]:
        rec["why"]["events"] = [{"offset_in_history": 0, "item_id": "i0", "action": "view", "ts": T0, "weight": 0.1}]
        _record(p)
    bad = copy.deepcopy(rec)
    node = bad["why"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.Draft202012Validator(schema("predictions")).validate(bad)


def test_a_bad_explain_top_names_the_setting(checkpoint):
    with pytest.raises(ConfigError, match="explain_top"):
        TransformerPredictor.from_checkpoint(checkpoint, device="cpu", num_threads=1, explain_top=-1)
    with pytest.raises(ValueError, match="explain_top"):
        Settings(explain_top=-2)
