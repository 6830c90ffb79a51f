"""models.checkpoint: round trip, atomic replace, and clear errors for corrupt / mismatched files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig, TrainConfig
from models.encoding import ItemVocab
from models.model import NextActionModel
from models.scorer import TransformerScorer
from models.errors import CheckpointError

torch.set_num_threads(1)  # tiny models: threads only add sync overhead (and thrash on a shared CPU)
ITEMS = [f"i{k}" for k in range(15)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)



@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=len(VOCAB), n_hash_buckets=4, d_model=16, max_len=8)
    model = NextActionModel(cfg).eval()
    path = save_checkpoint(tmp_path / "ck", model, VOCAB, TrainConfig(epochs=3), {"dataset": "toy"})
    return path, model


def test_round_trip_identical_outputs(ckpt, histories15):
    path, model = ckpt
    ck = load_checkpoint(path)
    assert ck.model_config == model.cfg and ck.vocab == VOCAB and ck.train_config.epochs == 3
    assert ck.metadata["dataset"] == "toy" and "created" in ck.metadata and "code_version" in ck.metadata
    a = TransformerScorer(model, VOCAB).run(histories15)
    b = TransformerScorer.from_checkpoint(path, device="cpu").run(histories15)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                       "vocab.json"]
    assert not list(path.parent.glob(".ck.*"))  # no temp dirs left behind


def test_resave_replaces_atomically(ckpt):
    path, model = ckpt
    v1 = load_checkpoint(path).content_hash
    with torch.no_grad():
        model.item_bias.add_(1.0)
    save_checkpoint(path, model, VOCAB)
    assert load_checkpoint(path).content_hash != v1


def test_flipped_byte_names_the_file_and_hashes(ckpt):
    path, _ = ckpt
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"hash mismatch for .*model.safetensors: expected sha256 [0-9a-f]{64}, "
                                              r"got [0-9a-f]{64}"):
        load_checkpoint(path)


def test_missing_file(ckpt):
    path, _ = ckpt
    (path / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="missing vocab.json"):
        load_checkpoint(path)
    shutil.rmtree(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(path)


def _rewrite_config(path, mutate):
    """Edit config.json and re-sign the manifest (a consistent but mismatched checkpoint)."""
    from models.checkpoint import _sha256, content_hash

    cfg = json.loads((path / "config.json").read_text())
    mutate(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    man = json.loads((path / "manifest.json").read_text())
    man["files"]["config.json"] = _sha256(path / "config.json")
    man["content_hash"] = content_hash(man["files"])
    (path / "manifest.json").write_text(json.dumps(man))


def test_config_mismatch_names_field(ckpt):
    path, _ = ckpt
    with pytest.raises(CheckpointError, match="field 'max_len' is 8, expected 50"):
        load_checkpoint(path, expect={"max_len": 50})
    _rewrite_config(path, lambda c: c["model"].update(d_model=32))
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape"):
        load_checkpoint(path)


def test_bad_config_value_and_vocab_size(ckpt):
    path, _ = ckpt
    _rewrite_config(path, lambda c: c["model"].update(n_items=999))
    with pytest.raises(CheckpointError, match="field 'n_items' is 999 but vocab.json has 21 entries"):
        load_checkpoint(path)
    _rewrite_config(path, lambda c: c["model"].update(backbone="lstm"))
    with pytest.raises(CheckpointError, match="config field 'backbone' = 'lstm'"):
        load_checkpoint(path)


def test_checkpoint_without_the_input_map_loads_as_identity(ckpt, tmp_path, rewrite_weights):
    """Checkpoints written before ``item_input`` existed load with every row reading itself."""
    path, model = ckpt
    rewrite_weights(path, lambda state: state.pop("item_input"))
    ck = load_checkpoint(path)
    assert torch.equal(ck.model.item_input, torch.arange(len(VOCAB)))
