"""stream_app/training.py without a broker: which full record a resuming trainer continues from when
the newest ones are rejected (:func:`load_full`, :func:`choose_full`) — real checkpoints, real checks."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from models.checkpoint import read_manifest
from stream_app.records import FULL, KIND_HEADER, ModelUpdate
from stream_app.training import choose_full, load_full


@dataclass
class Rec:
    """What the trainer reads of a ``model-updates`` record."""

    value: bytes
    offset: int
    partition: int = 0
    timestamp: int = 0
    headers: tuple = ((KIND_HEADER, FULL.encode()),)


def full(path: Path | str, sha: str | None, offset: int) -> Rec:
    return Rec(ModelUpdate(None if sha is None else sha[:12], str(path), sha, offset + 1, "online").encode(), offset)


async def _aiter(items):
    for item in items:
        yield item


def choose(recs, roots):
    return asyncio.run(choose_full(_aiter(recs), lambda rec: load_full(rec, roots, "cpu")))


@pytest.fixture
def models(make_checkpoint, tmp_path) -> tuple[list[Path], Path, Path]:
    """``(roots, good, other)``: two real checkpoints copied under one checkpoint root."""
    root = tmp_path / "models"
    root.mkdir()
    good = Path(shutil.copytree(make_checkpoint(0, items=20), root / "v000001"))
    other = Path(shutil.copytree(make_checkpoint(1, items=20), root / "v000002"))
    return [root.resolve()], good, other


def test_the_newest_admissible_full_record_is_chosen_past_every_kind_of_rejected_one(models, tmp_path):
    roots, good, other = models
    sha, other_sha = read_manifest(good)["content_hash"], read_manifest(other)["content_hash"]
    corrupt = Path(shutil.copytree(good, roots[0] / "v000003"))
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    outside = Path(shutil.copytree(good, tmp_path / "elsewhere"))
    newest_first = [
        full(good, "abc", 7),  # not a sha256
        full(outside, sha, 6),  # a good checkpoint, outside the roots
        full(roots[0] / "v000099", sha, 5),  # missing
        full(corrupt, sha, 4),  # a file does not match its manifest
        full(other, sha, 3),  # another checkpoint than the one announced
        full(good, sha, 2),  # the one to continue from
        full(other, other_sha, 1),  # older: never looked at
    ]
    rec, (update, ck), rejected = choose(newest_first, roots)
    assert rec is newest_first[5]
    assert update.path == str(good.resolve()) and ck.content_hash == sha
    assert [(r.offset, exc.reason) for r, exc in rejected] == [
        (7, "bad_sha256"), (6, "path_not_allowed"), (5, "checkpoint_unreadable"), (4, "checkpoint_unreadable"),
        (3, "hash_mismatch")]
    assert "v000099" in rejected[2][1].detail and "v000003" in rejected[3][1].detail  # the bad value is named
    assert sha in rejected[4][1].detail and other_sha in rejected[4][1].detail


def test_nothing_is_chosen_when_every_full_record_is_rejected(models):
    roots, good, _ = models
    rec, loaded, rejected = choose([full(good, "0" * 64, 1), Rec(b"not json", 0)], roots)
    assert rec is None and loaded is None
    assert [exc.reason for _, exc in rejected] == ["hash_mismatch", "bad_record"]
    assert choose([], roots) == (None, None, [])


def test_an_admissible_newest_record_is_chosen_with_nothing_rejected(models):
    roots, good, _ = models
    newest = full(good, read_manifest(good)["content_hash"], 3)
    rec, (update, _), rejected = choose([newest], roots)
    assert rec is newest and rejected == [] and update.n == 4


def test_a_forget_marker_drops_the_users_pending_and_replayed_examples_counted_and_logged_without_the_id(
        make_checkpoint, caplog):
    """TrainingService._forget (the loop's handling of a forget marker on ``outcomes``), with a real
    OnlineTrainer: the user's pending examples and replay-buffer examples go, the counters say how
    many, and the INFO line does not name the user."""
    import logging

    from models.checkpoint import load_checkpoint
    from models.schema import ACTION_INDEX, EventSeq
    from online.examples import Example
    from online.trainer import OnlineConfig, OnlineTrainer
    from stream_app import monitoring
    from stream_app.settings import Settings
    from stream_app.training import TrainingService

    t0 = 1_700_000_000_000

    def ex(user: str, target: str, k: int) -> Example:
        window = EventSeq.from_columns(["i1", "i2"], ["view"] * 2, [t0, t0 + 1000])
        return Example(user, window, target, ACTION_INDEX["view"], t0 + 2000 + k, "", "v", None, 0.2, 0, k)

    ck = load_checkpoint(make_checkpoint(0, items=20))
    service = TrainingService(Settings())
    service.trainer = OnlineTrainer(ck.model, ck.vocab, ck.version, OnlineConfig(replay_ratio=0.0))
    service.trainer.learn([ex("gone-7c1", "i3", 0), ex("gone-7c1", "i4", 1), ex("kept", "i5", 2)])
    pending = [ex("kept", "i6", 3), ex("gone-7c1", "i7", 4)]

    def count(where: str) -> float:
        return monitoring.REGISTRY.get_sample_value("nextaction_online_forgotten_examples_total", {"where": where}) or 0

    before = count("pending"), count("replay")
    with caplog.at_level(logging.DEBUG, logger="stream_app.training"):
        kept = service._forget("gone-7c1", pending)  # noqa: SLF001 - the loop's step, without a broker
    service.pool.shutdown()
    assert [e.user_id for e in kept] == ["kept"]
    assert (count("pending") - before[0], count("replay") - before[1]) == (1, 2)
    replayed = service.trainer.replay.recent_items() + service.trainer.replay.reservoir_items()
    assert {e.user_id for e in replayed} == {"kept"}
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info == ["forget marker: dropped 1 pending and 2 replayed examples"]
    assert any("gone-7c1" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


def test_full_versions_and_rollbacks_keep_the_checkpoints_text_projection(text_checkpoint, tmp_path):
    """Cold-start items (docs/cold-start.md): the workers give new items text rows only while the served
    checkpoint has a text projection, so the trainer's full versions (and the version a rollback
    republishes) carry the projection of the checkpoint it started from."""
    import numpy as np

    from models.checkpoint import load_checkpoint
    from online.trainer import OnlineConfig, OnlineTrainer
    from stream_app.settings import Settings
    from stream_app.training import Lineage, TrainingService

    ck = load_checkpoint(text_checkpoint)
    service = TrainingService(Settings(models_dir=tmp_path / "models"))
    service.trainer = OnlineTrainer(ck.model, ck.vocab, ck.version, OnlineConfig(),
                                    text_projection=ck.text_projection)
    service.lineage = Lineage(Path(text_checkpoint), ck.content_hash, 1, 1, None, 0, 0)
    service.last_good = (Path(text_checkpoint), ck.content_hash)
    sent = []

    async def send(kind, value):
        sent.append(kind)

    service._send = send  # noqa: SLF001 - no broker
    asyncio.run(service._publish_full("online"))  # noqa: SLF001
    asyncio.run(service._rollback())  # noqa: SLF001
    service.pool.shutdown()
    assert [p["reason"] for p in service.published if p["kind"] == FULL] == ["online", "rollback"]
    for p in service.published:
        if p["kind"] == FULL:
            proj = load_checkpoint(p["path"]).text_projection
            assert proj is not None and np.array_equal(proj.weight, ck.text_projection.weight)
