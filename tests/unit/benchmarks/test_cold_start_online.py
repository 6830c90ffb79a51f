"""benchmarks/cold_start_online.py's pure parts: the stream of new items and the prequential ranks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.cold_start import held_out
from benchmarks.cold_start_online import MISS, ranks_now, stream_examples
from models.checkpoint import load_checkpoint
from models.encoding import collate, encode
from models.schema import EventSeq
from online.examples import Example
from online.trainer import OnlineConfig, OnlineTrainer


def test_held_out_items_are_a_seeded_share():
    items = [f"i{k}" for k in range(100)]
    assert held_out(items, 0.1, 0) == held_out(items, 0.1, 0) and len(held_out(items, 0.1, 0)) == 10
    assert held_out(items, 0.1, 0) != held_out(items, 0.1, 1)


def test_the_stream_renames_new_items_in_time_order_with_their_text_and_a_window_before_them():
    t = 1_000_000
    ds = SimpleNamespace(sequences={
        "a": EventSeq.from_columns(["i1", "i9", "i2", "i9"], ["view"] * 4, [t, t + 10, t + 20, t + 30]),
        "b": EventSeq.from_columns(["i9", "i3", "i9"], ["view"] * 3, [t + 5, t + 6, t + 25]),
    })
    exs = stream_examples(ds, {"i9"}, {"i9": "Toy Story (1995)"}, max_len=2, max_examples=10, version="v1")
    # every event but a user's first (no window), by time; the held-out item renamed, with its text
    assert [(e.user_id, e.ts, e.item) for e in exs] == [("b", t + 6, "i3"), ("a", t + 10, "new:i9"),
                                                        ("a", t + 20, "i2"), ("b", t + 25, "new:i9"),
                                                        ("a", t + 30, "new:i9")]
    assert [e.item_text for e in exs] == ["", "Toy Story (1995)", "", "Toy Story (1995)", "Toy Story (1995)"]
    assert exs[4].window.items == ["new:i9", "i2"]  # the last max_len events before it, renamed
    assert exs[3].window.items == ["new:i9", "i3"] and [e.offset for e in exs] == [0, 1, 2, 3, 4]
    assert len(stream_examples(ds, {"i9"}, {}, max_len=2, max_examples=2, version="v1")) == 2


def test_ranks_are_misses_for_unknown_items_and_follow_the_model_for_known_ones(make_checkpoint):
    ck = load_checkpoint(make_checkpoint(0, items=30))
    tr = OnlineTrainer(ck.model, ck.vocab, ck.version, OnlineConfig())
    t = 1_000_000
    w = EventSeq.from_columns(["i1", "i2"], ["view"] * 2, [t, t + 1])

    def ex(item):
        return Example("u", w, item, 0, t + 2, "", "v", None, 0.2, 0, 0)

    r, among_new = ranks_now(tr, [ex("new:x"), ex("i5"), ex("i1")])
    with torch.no_grad():
        scores = tr.model.score_last(collate([encode(w, tr.vocab, tr.model.cfg)]))["item_scores"][0, tr.first:]
    scores = scores.double().numpy()
    scores[[tr.vocab.index("i1") - tr.first, tr.vocab.index("i2") - tr.first]] = -np.inf  # the window, masked
    assert r[0] == MISS  # not in the vocabulary
    assert r[1] == int((scores > scores[tr.vocab.index("i5") - tr.first]).sum()) and 0 <= r[1] < 28
    assert r[2] == 28  # a window item is masked: behind the 28 others
    assert list(among_new) == [MISS, 0, 0]  # no item added online yet: nothing to be behind
    tr.learn([ex("new:x"), ex("new:y")])  # two items added online
    r, among_new = ranks_now(tr, [ex("new:x"), ex("new:y")])
    assert sorted(among_new) == [0, 1] and all(0 <= x <= 30 for x in r)
