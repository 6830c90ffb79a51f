"""``model-updates`` records: what ``nextaction deploy`` announces (the listener itself needs a broker:
tests/integration/test_pipeline.py runs it in two workers and a restarted one)."""

from __future__ import annotations

import shutil

import orjson
import pytest

from models.errors import CheckpointError
from stream_app.records import SCHEMA_VERSION
from stream_app.updates import UpdateRejected, admit, checkpoint_roots, update_record


def test_update_record_names_the_verified_checkpoint(make_checkpoint):
    from models.checkpoint import read_manifest

    path = make_checkpoint(0, items=30)
    rec = orjson.loads(update_record(path).encode())
    sha = read_manifest(path)["content_hash"]
    assert rec == {"schema_version": SCHEMA_VERSION, "version": sha[:12], "path": str(path.absolute()), "sha256": sha}
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


# --- what a worker admits (stream_app.updates.admit): each rejection ------------------------------------
SHA = "ab" * 32


def _rec(path, sha: str | None = SHA) -> bytes:
    return orjson.dumps({"version": "v", "path": str(path), **({"sha256": sha} if sha is not None else {})})


@pytest.fixture
def roots(tmp_path):
    """An allowed root with one checkpoint folder in it, and a folder outside every root."""
    from stream_app.settings import Settings

    models = tmp_path / "models"
    (models / "v1").mkdir(parents=True)
    (tmp_path / "elsewhere" / "evil").mkdir(parents=True)
    return checkpoint_roots(Settings(models_dir=models, data_dir=tmp_path / "var"))


def test_admit_accepts_a_hashed_record_under_a_root_and_resolves_its_path(roots, tmp_path):
    u = admit(_rec(tmp_path / "models" / "v1"), roots)
    assert u.path == str((tmp_path / "models" / "v1").resolve()) and u.sha256 == SHA
    assert admit(_rec(tmp_path / "models" / "sub" / ".." / "v1"), roots).path == u.path  # `..` inside is fine


@pytest.mark.parametrize("value, reason", [
    (b"not json", "bad_record"),
    (b'{"sha256": "' + SHA.encode() + b'"}', "bad_record"),
    (None, "bad_record"),
])
def test_admit_rejects_what_is_not_a_record(roots, value, reason):
    with pytest.raises(UpdateRejected) as exc:
        admit(value, roots)
    assert exc.value.reason == reason


def test_admit_rejects_a_record_without_a_proper_sha256(roots, tmp_path):
    path = tmp_path / "models" / "v1"
    with pytest.raises(UpdateRejected, match="no_sha256: .*carries no 'sha256'") as exc:
        admit(_rec(path, sha=None), roots)
    assert str(path) in exc.value.detail  # the bad value is named
    for bad in ("abc", "g" * 64, SHA + "00"):
        with pytest.raises(UpdateRejected) as exc:
            admit(_rec(path, sha=bad), roots)
        assert exc.value.reason == "bad_sha256" and bad[:20] in exc.value.detail


def test_admit_rejects_paths_outside_the_roots(roots, tmp_path):
    cases = {
        "outside": tmp_path / "elsewhere" / "evil",
        "dotdot": f"{tmp_path}/models/../elsewhere/evil",
        "prefix": tmp_path / "models-evil" / "v1",  # a sibling whose name starts like the root
        "root": "/",
    }
    link = tmp_path / "models" / "link"
    link.symlink_to(tmp_path / "elsewhere")  # a symlink inside the root pointing out of it
    cases["symlink"] = link / "evil"
    for name, path in cases.items():
        with pytest.raises(UpdateRejected) as exc:
            admit(_rec(path), roots)
        assert exc.value.reason == "path_not_allowed", name
        assert str(path) in exc.value.detail, name
    with pytest.raises(UpdateRejected) as exc:
        admit(_rec("models/v1"), roots)
    assert exc.value.reason == "relative_path"


def test_checkpoint_roots_default_and_extra(tmp_path):
    from stream_app.settings import Settings

    s = Settings(data_dir=tmp_path / "var")
    assert checkpoint_roots(s) == [(tmp_path / "var" / "models").resolve()]
    s = Settings(data_dir=tmp_path / "var", models_dir=tmp_path / "m", checkpoint=tmp_path / "runs" / "beauty",
                 checkpoint_roots=f"{tmp_path}/a:{tmp_path}/b")
    assert checkpoint_roots(s) == [p.resolve() for p in (tmp_path / "m", tmp_path / "runs", tmp_path / "a",
                                                         tmp_path / "b")]
