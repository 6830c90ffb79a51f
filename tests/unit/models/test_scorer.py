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


def test_top_items_and_item_probs_are_the_softmax_over_the_catalogue(make_checkpoint, histories15):
    """What the scorer predicts is what the stream serves: each top item's probability of being the
    next item (the softmax over the known items); ``item_probs`` gives all of them, in the columns of
    ``score_items``, summing to 1."""
    path = make_checkpoint(0, items=len(ITEMS))
    s = TransformerScorer.from_checkpoint(path, ITEMS[::-1], device="cpu")
    probs = s.item_probs(histories15)
    scores = s.score_items(histories15)
    ref = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(probs, ref / ref.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    for b, p in enumerate(s.predict(histories15, k=len(ITEMS))):
        col = {item: j for j, item in enumerate(ITEMS[::-1])}
        np.testing.assert_allclose([sc for _, sc in p.top_items], [probs[b, col[i]] for i, _ in p.top_items],
                                   rtol=1e-5)
        assert abs(sum(sc for _, sc in p.top_items) - 1) < 1e-5 and all(0 < sc <= 1 for _, sc in p.top_items)
