"""benchmarks/quality.py: the bars summary reads the sign tests and the action log loss right."""

from __future__ import annotations

import doctest

import benchmarks.quality as quality
from benchmarks.quality import NO_TRANSITIONS, PAIRED, bars


def _paired(raw: dict) -> dict:
    return {"dataset": "d", "protocol": "full/allowed", "metric": PAIRED, "raw": raw}


def test_a_bar_needs_more_wins_and_significance_against_every_baseline():
    met = bars([_paired({"markov": (40, 3, 1e-9), NO_TRANSITIONS: (2, 9, 0.06)})])[-1]
    assert "| met |" in met  # the ablation column is not a baseline
    assert "not met: item_knn 20/12 p=0.22" in bars([_paired({"item_knn": (20, 12, 0.22)})])[-1]
    assert "not met: gru4rec 12/40 p=1e-05" in bars([_paired({"gru4rec": (12, 40, 1e-5)})])[-1]  # significant, wrong way


def test_the_action_bar_compares_log_loss_with_both_action_baselines():
    loss = {"dataset": "d", "protocol": "full/allowed", "metric": "action/log_loss",
            "values": {"ours": 0.60, "last_action_markov": 0.59, "majority_action": 0.70}}
    assert bars([_paired({"markov": (40, 3, 1e-9)}), loss])[-1].endswith("| not met (0.6000 vs 0.5900 / 0.7000) |")
    alone = {**loss, "values": {"ours": 0.60}}  # --baselines without the action ones: no action bar to judge
    assert bars([_paired({"markov": (40, 3, 1e-9)}), alone])[-1] == "| d | full/allowed | met |  |"


def test_doctests():
    assert doctest.testmod(quality).failed == 0


def test_the_gru4rec_baseline_trains_with_its_dataset_settings(monkeypatch, tmp_path):
    import argparse

    seen = {}
    monkeypatch.setattr(quality, "_checkpoint_scorer",
                        lambda name, ds, args, ck, model, budget, label, train=None: seen.update(
                            ck=ck, model=model, train=train, budget=budget))
    args = argparse.Namespace(checkpoints=tmp_path, gru=True, model_config='{"dropout": 0.4, "d_model": 8}',
                              gru_budget_min=5.0)
    quality._gru4rec("taobao", None, args)
    assert seen["ck"] == tmp_path / "taobao.gru4rec" and seen["budget"] == 5.0
    assert seen["model"]["backbone"] == "gru" and seen["model"]["n_negatives"] == 2048
    assert seen["model"]["dropout"] == 0.4 and "d_model" not in seen["model"]  # --model-config: three keys only
    assert seen["train"] == {"batch_size": 64, "lr": 0.002}
    quality._gru4rec("a-log-of-mine", None, args)
    assert seen["train"] == {} and seen["model"]["dropout"] == 0.4  # unknown dataset: auto, and the overrides


def test_the_masked_rows_score_our_checkpoint_as_the_discovery_feed_serves_it():
    """History masked: ``_discovery`` is the same model and vocabulary in the ``exclude_seen`` mode, and
    scoring with it leaves the model shared with the allowed rows' scorer in the default mode."""
    from models.config import ModelConfig
    from models.encoding import ItemVocab
    from models.model import NextActionModel
    from models.schema import EventSeq
    from models.scorer import TransformerScorer

    vocab = ItemVocab(["a", "b", "c", "d"], n_hash_buckets=2)
    ours = TransformerScorer(NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=2, d_model=8)), vocab,
                             device="cpu")
    disc = quality._discovery(ours)
    assert disc.model is ours.model and disc.exclude_seen and not ours.exclude_seen
    h = [EventSeq.from_columns(["a", "b"], [0, 0], [0, 1000])]
    s = disc.score_items(h)[0]
    assert s[0] == s[1] == float("-inf") and (s[2:] > float("-inf")).all() and not ours.model.exclude_seen
    assert (ours.score_items(h)[0] > float("-inf")).all()


def test_a_users_log_is_benchmarked_under_its_label(tmp_path):
    """``LABEL=csv:PATH``: the log is loaded from the file, its rows are named by the label, and it
    needs no shipped datasets (baselines only here: no checkpoints)."""
    import argparse

    lines = ["user_id,item_id,behavior_type,timestamp"]
    for u in range(30):
        for k in range(6):
            lines.append(f"u{u},i{(u + k * 7) % 40},{'pv' if k % 3 else 'cart'},{1_600_000_000 + 3600 * k}")
    (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
    args = argparse.Namespace(root=tmp_path / "no-datasets-here", max_cases=None, baselines=["popularity", "markov"],
                              checkpoints=None, gru=False)
    rows = quality.run_dataset(f"mylog=csv:{tmp_path / 'events.csv'}", args)
    metrics = {(r["protocol"], r["metric"]) for r in rows}
    assert {r["dataset"] for r in rows} == {"mylog"} and ("full/allowed", "NDCG@10") in metrics
    assert all(r["n"] == 30 for r in rows)
    assert set(rows[0]["values"]) == {"popularity", "markov"}
    # 40 items: too few for 100 sampled negatives per user, so that protocol is left out, not crashed on
    assert {p for p, _ in metrics} == {"full/allowed", "full/masked"}


def test_a_malformed_label_is_refused_by_name():
    import pytest

    from benchmarks.common import BenchError

    for bad in ("=csv:x.csv", "mine=", "a/b=csv:x.csv"):
        with pytest.raises(BenchError, match="expected LABEL=SPEC"):
            quality.label_and_spec(bad)
