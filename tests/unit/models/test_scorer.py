"""models.scorer: a checkpoint served by TransformerScorer keeps the Predictor protocol and the
requested item order."""

from __future__ import annotations

import numpy as np

from models.checkpoint import load_checkpoint
from models.encoding import ItemVocab
from models.predictor import Predictor
from models.scorer import TransformerScorer

ITEMS = [f"i{k}" for k in range(15)]
VOCAB = ItemVocab(ITEMS, n_hash_buckets=4)



def test_predictor_protocol(make_checkpoint, histories15):
    path = make_checkpoint(0, items=len(ITEMS))  # its vocabulary is VOCAB
    s = TransformerScorer.from_checkpoint(path, ITEMS[::-1], device="cpu")
    assert isinstance(s, Predictor) and s.version == load_checkpoint(path).content_hash[:12]
    preds = s.predict(histories15, k=5)
    assert len(preds) == 3
    for p in preds:
        assert abs(sum(p.action_probs) - 1) < 1e-6 and len(p.action_probs) == 5
        assert len(p.top_items) == 5 and all(i in ITEMS for i, _ in p.top_items)
        assert [sc for _, sc in p.top_items] == sorted((sc for _, sc in p.top_items), reverse=True)
        assert p.next_gap_s >= 0
    # score_items columns follow the requested item order
    full = s.run(histories15)["item_scores"]
    np.testing.assert_array_equal(s.score_items(histories15), full[:, VOCAB.indices(ITEMS[::-1])])
