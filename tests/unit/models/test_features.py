"""models.features is the one declaration of the token features and the vocabulary layout: the
config, the encoding and the model all follow it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.encoding import ItemVocab, collate, encode
from models.errors import ConfigError
from models.features import FEATURES, MASK, N_SPECIAL, PAD, TOKEN_FEATURES, embedding_rows, first_item
from models.model import NextActionModel
from models.schema import EventSeq

ITEMS = ["a", "b", "c", "d"]


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"n_items": len(ItemVocab(ITEMS, n_hash_buckets=4)), "n_hash_buckets": 4, "d_model": 16,
                          "max_len": 6, "n_gap_buckets": 12, "n_device_buckets": 8, "n_location_buckets": 16, **kw})


def _history() -> EventSeq:
    return EventSeq.from_columns(["a", "zzz", "c"], ["view", "cart", "purchase"],
                                 [1_700_000_000_000, 1_700_000_060_000, 1_700_003_600_000],
                                 devices=["ios", "", "web"], locations=["de", "fr", ""])


@pytest.mark.parametrize("features", [FEATURES, ("item",), ("item", "action", "dow", "location")])
def test_encode_collate_and_model_follow_the_declaration(features):
    cfg = _cfg(features=features)
    vocab = ItemVocab(ITEMS, n_hash_buckets=cfg.n_hash_buckets)
    x = encode(_history(), vocab, cfg)
    assert list(x) == [*FEATURES, "gap_log"]  # every declared feature, in order, then the time target
    for name in FEATURES:
        assert x[name].dtype == np.int64
        assert (x[name] == 0).all() if not cfg.uses(name) else (x[name] < TOKEN_FEATURES[name].rows(cfg)).all()
    assert set(collate([x])) == {*FEATURES, "gap_log", "lengths"}
    model = NextActionModel(cfg)
    assert {f: e.num_embeddings for f, e in model.feat_emb.items()} == embedding_rows(cfg)
    assert list(model.feat_emb) == [f for f in FEATURES if f != "item" and cfg.uses(f)]
    assert model.item_emb.num_embeddings == TOKEN_FEATURES["item"].rows(cfg) == cfg.n_items


def test_vocabulary_layout_is_shared():
    vocab = ItemVocab(ITEMS, n_hash_buckets=4)
    cfg = _cfg()
    model = NextActionModel(cfg).eval()
    assert (PAD, MASK, N_SPECIAL) == (0, 1, 2)
    assert vocab.first_item == model.first_item == first_item(4) == N_SPECIAL + 4
    assert vocab.index("a") == first_item(4) and N_SPECIAL <= vocab.index("unknown id") < first_item(4)
    with torch.no_grad():
        scores = model.score_last(collate([encode(_history(), vocab, cfg)]))["item_scores"]
    assert torch.isinf(scores[0, :N_SPECIAL]).all() and torch.isfinite(scores[0, N_SPECIAL:]).all()


def test_config_validates_against_the_declaration():
    with pytest.raises(ConfigError, match="features"):
        _cfg(features=("item", "weather"))
    with pytest.raises(ConfigError, match=f"n_hash_buckets \\+ 3 = {first_item(4) + 1}"):
        ModelConfig(n_items=first_item(4), n_hash_buckets=4)
    assert ModelConfig(n_items=first_item(4) + 1, n_hash_buckets=4).features == FEATURES
