"""The one encoding: windowing, token-local features, stable hashing, training == serving input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import ModelConfig
from models.encoding import ItemVocab, collate, encode, encode_last
from models.features import FEATURES
from models.schema import EventSeq
from models.scorer import TransformerScorer
from models.train import build_examples
from models.errors import CheckpointError

ITEMS = [f"i{k}" for k in range(20)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=8)
CFG = ModelConfig(n_items=len(VOCAB), n_hash_buckets=8, max_len=6, d_model=16)


def _seq(n: int, seed: int = 0) -> EventSeq:
    rng = np.random.default_rng(seed)
    return EventSeq.from_columns([ITEMS[rng.integers(20)] for _ in range(n)], rng.integers(0, 5, n),
                                 1_700_000_000_000 + np.cumsum(rng.integers(0, 10 ** 8, n)),
                                 devices=[["ios", "web", ""][k % 3] for k in range(n)],
                                 locations=[["de", "fr"][k % 2] for k in range(n)])


def test_window_is_last_max_len_left_aligned():
    s = _seq(10)
    x = encode(s, VOCAB, CFG)
    assert all(len(v) == 6 for v in x.values())
    assert x["item"].tolist() == VOCAB.indices(s.items[-6:]).tolist()
    assert x["action"].tolist() == (s.actions[-6:].astype(int) + 1).tolist()
    short = encode(s[:3], VOCAB, CFG)
    assert len(short["item"]) == 3 and short["gap"][0] == 1  # first event of the user: special bucket


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 15), seed=st.integers(0, 1000))
def test_token_features_are_local(n, seed):
    """Token i's features depend only on event i and its predecessor: the encoding of a prefix is
    a prefix of the encoding, and encode_last equals the tail of encode."""
    s = _seq(n, seed)
    full = encode(s, VOCAB, CFG, max_len=100)
    for m in range(1, n + 1):
        pre = encode(s[:m], VOCAB, CFG, max_len=100)
        for k in (*FEATURES, "gap_log"):
            np.testing.assert_array_equal(pre[k], full[k][:m])
    last = encode_last(s, VOCAB, CFG)
    windowed = encode(s, VOCAB, CFG)
    for k in (*FEATURES, "gap_log"):
        np.testing.assert_array_equal(last[k], windowed[k][-1:])


@pytest.mark.slow  # a child interpreter with another PYTHONHASHSEED
def test_unknown_items_hash_into_buckets_stably():
    idx = VOCAB.index("never-seen")
    assert 2 <= idx < 2 + VOCAB.n_hash_buckets
    code = ("from models.encoding import ItemVocab; "
            f"print(ItemVocab({ITEMS!r}, n_hash_buckets=8).index('never-seen'))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert int(other.stdout) == idx  # not Python's salted hash()


def test_vocab_json_round_trip_and_errors():
    assert ItemVocab.from_json(VOCAB.to_json()) == VOCAB
    with pytest.raises(CheckpointError, match="format"):
        ItemVocab.from_json(json.dumps({"format": "other", "items": [], "n_hash_buckets": 1}))
    with pytest.raises(ValueError, match="duplicate"):
        ItemVocab(["a", "a"])


def test_set_items_appends_and_reuses_rows_in_place():
    v = ItemVocab(["a", "b", "c"], n_hash_buckets=4)
    first = v.first_item
    assert v.set_items([first + 4, first + 3, first + 1], ["e", "d", "b"]) == []  # appends in index order; b: no-op
    assert len(v) == first + 5 and v.items == ["a", "b", "c", "d", "e"] and v.index("e") == first + 4
    assert v.set_items([first], ["z"]) == [first]  # row reuse: "a" is now unknown
    assert v.index("z") == first and "a" not in v and v.index("a") == v.bucket("a")
    assert v.set_items([first + 1, first + 2], ["c", "b"]) == [first + 1, first + 2]  # a swap in one call
    assert (v.index("b"), v.index("c")) == (first + 2, first + 1)
    assert ItemVocab.from_json(v.to_json()) == v and v.extended(["y", "z"]).items[-1] == "y"
    snapshot = list(v.items)
    for idx, ids, match in (([first - 1], ["q"], f"index {first - 1} is below the first item row"),
                            ([0], ["q"], "index 0 is below"),
                            ([len(v) + 1], ["q"], f"index {len(v) + 1} leaves a gap"),
                            ([first, first], ["q", "r"], f"index {first} is given twice"),
                            ([len(v), len(v) + 1], ["q", "q"], "'q' is given to rows"),
                            ([len(v)], ["b"], "'b' is already at row"),
                            ([first], ["q", "r"], "1 indices but 2 ids")):
        with pytest.raises(ValueError, match=match):
            v.set_items(idx, ids)
        assert v.items == snapshot  # a refused call changes nothing


def test_disabled_features_are_zero():
    cfg = CFG.replace(features=("item", "action"))
    x = encode(_seq(5), VOCAB, cfg)
    for k in ("gap", "hour", "dow", "device", "location"):
        assert not x[k].any()


def test_collate_right_pads():
    b = collate([encode(_seq(5), VOCAB, CFG), encode(_seq(2), VOCAB, CFG)])
    assert b["item"].shape == (2, 5) and b["lengths"].tolist() == [5, 2]
    assert (b["item"][1, 2:] == 0).all() and b["item"].dtype == torch.int64


def test_served_input_equals_training_example():
    """The scorer's input for a prefix is exactly the training example's input for that prefix."""
    from models.model import NextActionModel

    s = _seq(9, seed=3)
    train_ex = build_examples({"u": s}, VOCAB, CFG, stride=0)[0]  # max_len + 1 events: inputs + target
    scorer = TransformerScorer(NextActionModel(CFG), VOCAB)
    served = scorer.encode_batch([s[:-1]])  # what predict() sees just before the last event
    for k in (*FEATURES, "gap_log"):
        np.testing.assert_array_equal(served[k][0].numpy(), train_ex[k][:-1])
