"""models.scorer: a checkpoint served by TransformerScorer keeps the Predictor protocol and the
requested item order."""

from __future__ import annotations

import numpy as np

from models.checkpoint import load_checkpoint
from models.encoding import ItemVocab
from models.predictor import Predictor
from models.schema import EventSeq
from models.scorer import TransformerScorer

ITEMS = [f"i{k}" for k in range(15)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)


def _hists():
    rng = np.random.default_rng(0)
    return [EventSeq.from_columns([ITEMS[rng.integers(15)] for _ in range(n)], rng.integers(0, 5, n),
                                  1_700_000_000_000 + np.cumsum(rng.integers(1000, 10 ** 7, n)))
            for n in (1, 4, 9)]


def test_predictor_protocol(make_checkpoint):
    path = make_checkpoint(0, items=len(ITEMS))  # its vocabulary is VOCAB
    s = TransformerScorer.from_checkpoint(path, ITEMS[::-1], device="cpu")
    assert isinstance(s, Predictor) and s.version == load_checkpoint(path).content_hash[:12]
    preds = s.predict(_hists(), k=5)
    assert len(preds) == 3
    for p in preds:
        assert abs(sum(p.action_probs) - 1) < 1e-6 and len(p.action_probs) == 5
        assert len(p.top_items) == 5 and all(i in ITEMS for i, _ in p.top_items)
        assert [sc for _, sc in p.top_items] == sorted((sc for _, sc in p.top_items), reverse=True)
        assert p.next_gap_s >= 0
    # score_items columns follow the requested item order
    full = s.run(_hists())["item_scores"]
    np.testing.assert_array_equal(s.score_items(_hists()), full[:, VOCAB.indices(ITEMS[::-1])])
