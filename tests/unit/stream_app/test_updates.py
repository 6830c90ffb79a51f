"""``model-updates`` records: what ``nextaction deploy`` announces (the listener itself needs a broker:
tests/integration/test_pipeline.py runs it in two workers and a restarted one)."""

from __future__ import annotations

import shutil

import orjson
import pytest

from models.errors import CheckpointError
from stream_app.updates import update_record


def test_update_record_names_the_verified_checkpoint(make_checkpoint):
    from models.checkpoint import read_manifest

    path = make_checkpoint(0, items=30)
    rec = orjson.loads(update_record(path).encode())
    sha = read_manifest(path)["content_hash"]
    assert rec == {"version": sha[:12], "path": str(path.absolute()), "sha256": sha}
    assert update_record(path, version="canary-7").version == "canary-7"


def test_update_record_refuses_a_corrupt_or_missing_checkpoint(make_checkpoint, tmp_path):
    path = shutil.copytree(make_checkpoint(0, items=30), tmp_path / "v1")  # a copy: this test corrupts it
    weights = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensors
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        update_record(path)
    with pytest.raises(CheckpointError):
        update_record(tmp_path / "nowhere")
