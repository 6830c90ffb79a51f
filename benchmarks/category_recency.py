"""What does the category-recency term give, and cost? Test ranking with and without it, and its serving cost.

For each checkpoint (a model with item categories, trained by ``nextaction train``, whose
``category_weight`` / ``category_weight_unseen`` were fitted on validation after training:
``models.train.fit_category_recency``), on the dataset's leave-one-out test cases:

* **ranking**: NDCG@10 / HR@10, full ranking, history allowed (as served by default) and history
  masked (the discovery feed, ``exclude_seen``), with the fitted weights and with both set to 0 (the
  same checkpoint otherwise), compared case by case (sign test, ``models.metrics.paired_sign_test``);
  HR@10 on the cases whose target the training saw at most once (cold items) is reported apart;
* **cost**: ``score_last(batch, k=10)`` in the discovery mode, milliseconds per request with the term
  and without it, alternating ``--rounds`` times, one CPU thread.

    .venv/bin/python -m benchmarks.category_recency --dataset taobao --checkpoints runs/q8/taobao

Results go to the ``category-recency`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/category_recency.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, machine, publish  # noqa: E402

SECTION = "category-recency"
READING = ('Reading: "with" and "without" are the same checkpoint, so the sign test isolates the term; cold '
           "HR@10 counts the cases whose target the training saw at most once (the term reads the catalogue's "
           "category, so it reaches those items too). A fitted weight of 0 means the fit kept the term off (no "
           "validation gain, or a gain not significant case by case: the checkpoint's metadata says which).")


def _cost(ck, hists, batch: int, rounds: int) -> tuple[float, float]:
    """Median ms per request of ``score_last(k=10)`` in the discovery mode, with the term and without."""
    import numpy as np
    import torch

    from models.encoding import collate, encode

    m = ck.model.eval()
    on = m.cfg
    off = dataclasses.replace(on, category_weight=0.0, category_weight_unseen=0.0)
    batches = [collate([encode(h, ck.vocab, on) for h in hists[i:i + batch]]) for i in range(0, len(hists), batch)]
    ms: dict[str, list[float]] = {"on": [], "off": []}
    m.exclude_seen = True
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for name, cfg in (("on", on), ("off", off)):
                    m.cfg = cfg
                    t0 = time.perf_counter()
                    for b in batches:
                        m.score_last(b, k=10)
                    ms[name].append(1e3 * (time.perf_counter() - t0) / len(hists))
    finally:
        m.cfg, m.exclude_seen = on, False
    return float(np.median(ms["on"])), float(np.median(ms["off"]))


def measure(checkpoint: Path, dataset: str, rounds: int, batch: int) -> dict:
    import numpy as np

    from models.checkpoint import load_checkpoint
    from models.datasets import fit_sequences, load_split
    from models.evaluate import evaluate
    from models.metrics import paired_sign_test
    from models.scorer import TransformerScorer

    ds, split = load_split(dataset)
    ck = load_checkpoint(checkpoint, device="cpu")
    cfg = ck.model.cfg
    if not cfg.item_categories:
        raise SystemExit(f"{checkpoint}: the model has no item categories (nothing to measure)")
    cases = split.test
    seen = {}
    for s in fit_sequences(split, "test").values():
        for it in s.items:
            seen[it] = seen.get(it, 0) + 1
    cold = np.array([seen.get(c.target_item, 0) <= 1 for c in cases])
    off = dataclasses.replace(cfg, category_weight=0.0, category_weight_unseen=0.0)
    out = {"checkpoint": str(checkpoint), "dataset": dataset, "buckets": cfg.n_category_buckets,
           "window": cfg.category_window, "weight": cfg.category_weight, "weight_unseen": cfg.category_weight_unseen,
           "fits": {k: ck.metadata.get(k, {}) for k in ("categories", "categories_unseen")}, "n": len(cases),
           "n_cold": int(cold.sum())}
    for masked in (False, True):
        res = {}
        for name, c in (("on", cfg), ("off", off)):
            ck.model.cfg = c
            scorer = TransformerScorer(ck.model, ck.vocab, ds.items, version=ck.version, device="cpu",
                                       exclude_seen=masked)
            res[name] = evaluate(scorer, ds, cases, mask_history=masked, beyond_accuracy=False, calibration=False,
                                 return_ranks=True)
        ck.model.cfg = cfg
        key = "masked" if masked else "allowed"
        out[key] = {name: {"NDCG@10": r["NDCG@10"], "HR@10": r["HR@10"],
                           "cold_HR@10": float((r["ranks"][cold] < 10).mean()) if cold.any() else float("nan")}
                    for name, r in res.items()}
        out[key]["sign"] = paired_sign_test(res["on"]["ranks"], res["off"]["ranks"])
    out["ms_on"], out["ms_off"] = _cost(ck, [c.history for c in cases], batch, rounds)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint directories (models with categories)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    rows = [measure(Path(c), args.dataset, args.rounds, args.batch) for c in args.checkpoints]
    md = ["## Category recency (`benchmarks/category_recency.py`)", "",
          f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; wall time {time.time() - t_start:.0f} s",
          f"- machine: {machine('cpu')}",
          f"- command: `{command_line()}`",
          f"- {args.dataset} leave-one-out test cases, full ranking; \"with\" = the checkpoint's fitted weights "
          "(history allowed: `category_weight`; masked, as the discovery feed `EXCLUDE_SEEN` ranks: "
          "`category_weight_unseen`), \"without\" = both 0, the same checkpoint otherwise; cold = target seen at "
          "most once in training; cost: `score_last(k=10)` in the discovery mode, batches of "
          f"{args.batch}, one thread, median of {args.rounds} alternating rounds",
          "",
          "| checkpoint | buckets | fitted (window, allowed / masked weight) | protocol | NDCG@10 with / without | "
          "HR@10 with / without | cold HR@10 with / without | with better/worse, sign test | ms per request with / "
          "without |",
          "|---|---:|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in ("allowed", "masked"):
            on, off, (b, w, p) = r[key]["on"], r[key]["off"], r[key]["sign"]
            md.append(f"| {r['checkpoint']} | {r['buckets']:,} | {r['window']}, {r['weight']:g} / {r['weight_unseen']:g} "
                      f"| {key} | {on['NDCG@10']:.4f} / {off['NDCG@10']:.4f} | {on['HR@10']:.4f} / {off['HR@10']:.4f} "
                      f"| {on['cold_HR@10']:.4f} / {off['cold_HR@10']:.4f} ({r['n_cold']} cases) | {b}/{w}, p = {p:.2g} "
                      f"| {r['ms_on']:.3f} / {r['ms_off']:.3f} ({r['ms_on'] / r['ms_off']:.2f}×) |")
    md += ["", READING]
    publish(SECTION, "\n".join(md), write=not args.no_write)


if __name__ == "__main__":
    main()
