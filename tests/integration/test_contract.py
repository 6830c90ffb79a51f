"""The record contract (docs/contract.md) on the real pipeline: a Faust worker serving a Transformer
checkpoint (in its inference process) on the test broker, good and bad events, a ``nextaction
deploy`` of a second checkpoint, more events, a ``nextaction forget``; then every record of the four
topics downstream teams read (``predictions``, ``outcomes``, ``events.dlq``, ``model-updates``) is read
back and validated against its JSON Schema (stream_app/schemas/), and the probabilities are checked:
top items in (0, 1], best first, summing to at most 1; action probabilities summing to 1.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import orjson
import pytest

from stream_app import kafka_admin
from stream_app.records import DELTA, SCHEMA_VERSION, control_kind, forget_user_of, schema, update_kind
from stream_app.replay import produce, synthetic
from tests.conftest import settings_env
from tests.integration.accounting import metric, read_topics, wait_for_metric

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
NEXTACTION = str(Path(sys.executable).parent / "nextaction")


def _cli(settings, *args: str) -> None:
    done = subprocess.run([NEXTACTION, *args], cwd=REPO, env=settings_env(settings), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _outputs_cover(s, n_inputs: int):
    """``until`` for read_topics: every input has its prediction or dead letter."""
    def done(out) -> bool:
        covered = {(p["partition"], p["offset"]) for p in map(_json, out[s.topic_predictions])}
        covered |= {(d["source"]["partition"], d["source"]["offset"]) for d in map(_json, out[s.topic_dlq])}
        return len(covered) >= n_inputs
    return done


def _json(msg) -> dict:
    return orjson.loads(msg.value)


def _check_probabilities(top_items: list, action_probs: dict) -> None:
    scores = [s for _, s in top_items]
    assert all(0 < s <= 1 for s in scores), scores
    assert scores == sorted(scores, reverse=True), scores
    assert sum(scores) <= 1 + 1e-6, sum(scores)
    assert math.isclose(sum(action_probs.values()), 1.0, abs_tol=1e-9), action_probs


def test_every_record_of_the_four_topics_validates_against_its_schema(app_settings, make_checkpoint, service_process,
                                                                      tmp_path):
    from models.checkpoint import read_manifest

    v1, v2 = make_checkpoint(0, items=40), make_checkpoint(1, items=40)
    ver1, ver2 = (read_manifest(v)["content_hash"][:12] for v in (v1, v2))
    s = app_settings.model_copy(update={"checkpoint": v1, "device": "cpu", "serve_threads": 1,
                                        "window_events": 1000, "window_ttl_s": 10 * 365 * 86400,
                                        "explain_top": 2})  # every prediction carries its `why` (docs/explanations.md)
    kafka_admin.ensure_topics(s)
    first = list(synthetic(400, 40, seed=31, bad_fraction=0.05))
    shift = max(e["ts"] for e in first if isinstance(e, dict) and isinstance(e.get("ts"), int)) + 1000 - min(
        e["ts"] for e in synthetic(300, 40, seed=32))
    second = [{**e, "ts": e["ts"] + shift} if isinstance(e.get("ts"), int) else e
              for e in synthetic(300, 40, seed=32, bad_fraction=0.05)]
    second = [{**e, "item_text": f"Title of {e['item_id']}"} if k % 5 == 0 and isinstance(e.get("item_id"), str) else e
              for k, e in enumerate(second)]  # some events carry their item's text: their outcomes pass it on
    n_inputs = len(first) + len(second)
    worker = service_process("worker", s, tmp_path / "worker.log")
    worker.start()
    try:
        assert asyncio.run(produce(s, first, progress=False)) == len(first)
        asyncio.run(read_topics(s, [s.topic_predictions, s.topic_dlq], _outputs_cover(s, len(first)), 180))
        _cli(s, "deploy", str(v2))  # the real CLI writes the model-updates record
        wait_for_metric(worker, 'nextaction_model_updates_total{result="applied"}', 1, timeout=120)
        assert asyncio.run(produce(s, second, progress=False)) == len(second)
        asyncio.run(read_topics(s, [s.topic_predictions, s.topic_dlq], _outputs_cover(s, n_inputs), 180))
        _cli(s, "forget", "u01")  # a forget marker on outcomes

        topics = [s.topic_events, s.topic_predictions, s.topic_outcomes, s.topic_dlq, s.topic_model_updates]
        out = asyncio.run(read_topics(s, topics, lambda o: any(forget_user_of(_json(m)) for m in o[s.topic_outcomes]),
                                      120))
        text = worker.metrics()
    finally:
        rc = worker.stop()
    assert rc == 0, worker.tail()

    validators = {name: jsonschema.Draft202012Validator(schema(name), format_checker=jsonschema.FormatChecker())
                  for name in ("predictions", "outcomes", "events.dlq", "model-updates")}
    by_topic = {s.topic_predictions: "predictions", s.topic_outcomes: "outcomes", s.topic_dlq: "events.dlq",
                s.topic_model_updates: "model-updates"}
    counts: Counter = Counter()
    for topic, name in by_topic.items():
        for m in out[topic]:
            if name == "model-updates" and update_kind(m.headers) == DELTA:  # binary (none here: no trainer)
                continue
            rec = _json(m)
            errors = sorted(validators[name].iter_errors(rec), key=str)
            assert not errors, f"{name} record at {m.partition}@{m.offset} breaks the contract: {errors[0]}\n{rec}"
            assert rec["schema_version"] == SCHEMA_VERSION
            counts[name] += 1

    preds = [_json(m) for m in out[s.topic_predictions]]
    for p in preds:
        _check_probabilities(p["top_items"], p["action_probs"])
        assert p["top_items"], p  # a Transformer always ranks its catalogue
        assert p["why"]["label"] == max(p["action_probs"], key=p["action_probs"].get), p  # explains the served action
        assert len(p["why"]["events"]) <= 2 and p["why"]["text"].startswith("likely to "), p
    assert {p["model_version"] for p in preds} == {ver1, ver2}  # both checkpoints served, both validated
    outcomes = [_json(m) for m in out[s.topic_outcomes]]
    for o in outcomes:
        if forget_user_of(o) is None:
            _check_probabilities(o["context"]["top_items"], o["context"]["action_probs"])
            assert o["happened"]["item_rank"] is None or 1 <= o["happened"]["item_rank"] <= len(o["context"]["top_items"])
    with_text = [o["happened"] for o in outcomes if "item_text" in o.get("happened", {})]
    assert with_text and all(h["item_text"] == f"Title of {h['item_id']}" for h in with_text)
    dlq = [_json(m) for m in out[s.topic_dlq]]
    updates = [_json(m) for m in out[s.topic_model_updates]]
    assert updates == [{"schema_version": SCHEMA_VERSION, "version": ver2, "path": str(v2.absolute()),
                        "sha256": read_manifest(v2)["content_hash"]}]
    events = [m for m in out[s.topic_events] if control_kind(m.headers) is None]  # not the forget request
    assert counts["predictions"] + counts["events.dlq"] == n_inputs == len(events)
    assert len(dlq) >= 10 and len({d["reason"] for d in dlq}) >= 3  # a few kinds of bad input
    markers = [forget_user_of(o) for o in outcomes if forget_user_of(o) is not None]
    assert counts["outcomes"] > 300 and markers and set(markers) == {"u01"}  # one per partition the request went to
    assert metric(text, "nextaction_predictions_out_total") == counts["predictions"]
    print("\nCONTRACT", {**counts, "dlq_reasons": dict(Counter(d["reason"] for d in dlq))})
