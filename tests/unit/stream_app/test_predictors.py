"""stream_app.predictors: what a worker serves from its settings, and the hot-swap successor."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from models.errors import CheckpointError, ConfigError
from models.serving import TransformerPredictor
from online.baseline import PopularityMarkovPredictor
from stream_app import predictors
from stream_app.settings import Settings


def test_missing_corrupt_or_unset_checkpoint_falls_back_loudly(make_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stream_app.predictors")
    missing = tmp_path / "no-such-ckpt"
    assert isinstance(predictors.load_local(Settings(checkpoint=missing, device="cpu")), PopularityMarkovPredictor)
    assert str(missing) in caplog.text and "FALLING BACK" in caplog.text and "does not exist" in caplog.text

    bad = tmp_path / "corrupt"
    shutil.copytree(make_checkpoint(), bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    caplog.clear()
    assert isinstance(predictors.load_local(Settings(checkpoint=bad, device="cpu")), PopularityMarkovPredictor)
    assert str(bad) in caplog.text and "hash mismatch" in caplog.text

    caplog.clear()
    assert isinstance(predictors.load_local(Settings(device="cpu")), PopularityMarkovPredictor)
    assert "no model checkpoint configured" in caplog.text

    caplog.clear()
    good = predictors.load_local(Settings(checkpoint=make_checkpoint(), device="cpu", serve_threads=1))
    assert isinstance(good, TransformerPredictor) and not caplog.records and good.num_threads == 1
    assert good.cache_info()["requests"] == 0 and len(good.cache) == 0  # warm-up leaves no trace


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: device=cuda is a valid setting here")
def test_a_wrong_device_setting_is_a_config_error_not_a_fallback(make_checkpoint):
    with pytest.raises(ConfigError, match="CUDA requested"):
        predictors.load_local(Settings(checkpoint=make_checkpoint(), device="cuda"))


def test_settings_map_onto_the_serving_options(make_checkpoint):
    s = Settings(device="cpu", serve_threads=1, kv_cache_users=7, kv_cache_mb=3, kv_overflow="evict",
                 kv_refresh_every=5, serve_score_dtype="float32")
    p = predictors.load_transformer(s, make_checkpoint())
    assert (p.num_threads, p.cache.max_entries, p.cache.max_bytes, p.overflow, p.refresh_every, p.score_dtype) == (
        1, 7, 3 << 20, "evict", 5, None)
    assert not p.model.exclude_seen  # the default: every item ranked, repeats included
    q = predictors.load_transformer(Settings(device="cpu", serve_threads=1, exclude_seen=True), make_checkpoint())
    assert q.model.exclude_seen and q.successor(make_checkpoint(1)).model.exclude_seen  # a hot swap keeps it


def test_successor_is_checked_against_the_announced_hash_and_built_like_the_current(make_checkpoint):
    from models.checkpoint import read_manifest

    s = Settings(device="cpu", serve_threads=1, kv_cache_users=9)
    current = predictors.load_transformer(s, make_checkpoint(0))
    path = make_checkpoint(1)
    sha = read_manifest(path)["content_hash"]
    new = predictors.load_successor(current, path, sha, build=lambda p: pytest.fail("the current one builds it"))
    assert new.version == sha[:12] and new.cache.max_entries == 9
    with pytest.raises(CheckpointError, match="content hash"):
        predictors.load_successor(current, path, "f" * 64, build=lambda p: None)
    # a predictor that serves no checkpoint (the baseline) leaves the building to the caller
    built = predictors.load_successor(PopularityMarkovPredictor(), path, sha,
                                      build=lambda p: predictors.load_transformer(s, p))
    assert built.version == sha[:12]
