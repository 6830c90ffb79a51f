"""A shared check: every serving path of a model scores what one full pass over the history scores."""

from __future__ import annotations

import torch

from models.encoding import ItemVocab, collate, encode, encode_last
from models.model import NextActionModel
from models.schema import EventSeq


def assert_every_path_scores_as_the_full_pass(m: NextActionModel, vocab: ItemVocab, hists: list[EventSeq]) -> None:
    """prefill + step (the KV state's last items), the heads of a prefill's last positions, the exact
    rescoring of candidates and the bf16 top-K with exact rescoring all give what ``score_last``
    (one full pass) gives for ``hists``."""
    first = vocab.first_item
    with torch.no_grad():
        full = m.score_last(collate([encode(h, vocab, m.cfg) for h in hists]))["item_scores"]
        _, state = m.prefill(collate([encode(h[:-1], vocab, m.cfg) for h in hists if len(h) > 1]))
        inc, _ = m.step(collate([encode_last(h, vocab, m.cfg) for h in hists if len(h) > 1]), state, evict=True)
        keep = [b for b, h in enumerate(hists) if 1 < len(h) <= m.cfg.max_len]  # windows not cut yet
        torch.testing.assert_close(inc["item_scores"][[b - 1 for b in keep]], full[keep], rtol=0, atol=1e-4)
        last, _ = m.prefill(collate([encode(h, vocab, m.cfg) for h in hists]), heads=False)
        assert last.item.shape == (len(hists), m.last_window)
        ref = m.item_logits(last.h, last.rep, last.hist, last.item)
        torch.testing.assert_close(ref, full, rtol=0, atol=1e-5)
        cand = torch.arange(first, len(vocab)).repeat(len(hists), 1)
        torch.testing.assert_close(m.rescore_items(last.h, last.rep, last.hist, last.item, cand),
                                   ref.gather(1, cand), rtol=0, atol=1e-5)
        s, i, _ = m.top_items(last.h, last.rep, last.hist, last.item, 5, coarse=torch.bfloat16,
                              margin=len(vocab) - first)
        exact_s, exact_i = torch.topk(ref[:, first:], 5, dim=1)
        assert torch.equal(i, exact_i + first)
        torch.testing.assert_close(s, exact_s, rtol=0, atol=1e-5)
