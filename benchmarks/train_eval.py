#!/usr/bin/env python
"""Train one configuration on one dataset, then evaluate its test split in every protocol.

Question: what does this training configuration reach on this dataset's test split? The driver
behind the recipe and ablation tables in ``benchmarks/RESULTS.md`` ("Transformer training"):
:func:`models.train.train` with the given overrides (1 CPU thread, no progress bars by default),
then :func:`models.evaluate.evaluate` on the test cases — full ranking with history masked and
allowed, and 100 sampled negatives (YOOCHOOSE: session-rec next click) — with seed 0, as the
Quality table does. Writes the checkpoint to ``out``, prints one ``RESULT {json}`` line and appends
it to ``--results`` (default ``runs/results.jsonl``); it does not touch RESULTS.md.

    .venv/bin/python benchmarks/train_eval.py taobao runs/tb_A \\
        --model-config '{"n_negatives": 2048, "dropout": 0.5, "action_loss_weight": 1.0}' \\
        --train-config '{"batch_size": 64, "lr": 0.002, "max_eval_users": 0, "eval_protocol": "allowed",
                         "window_stride": 10, "epochs": 6, "patience": 10}'
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRICS = ("HR@10", "NDCG@10", "HR@20", "MRR@20", "action/log_loss", "purchase_session_auc")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="beauty | games | ml-100k | taobao | yoochoose | ... (models.datasets.load)")
    ap.add_argument("out", help="checkpoint directory to write")
    ap.add_argument("--model-config", default="{}", help="ModelConfig overrides (JSON)")
    ap.add_argument("--train-config", default="{}", help="TrainConfig overrides (JSON)")
    ap.add_argument("--results", default="runs/results.jsonl", help="append the result line here")
    args = ap.parse_args(argv)

    import torch

    from models.config import ModelConfig, TrainConfig
    from models.datasets import load_split
    from models.evaluate import evaluate
    from models.scorer import TransformerScorer
    from models.train import train

    mkw, tkw = json.loads(args.model_config), json.loads(args.train_config)
    tkw.setdefault("num_threads", 1)
    tkw.setdefault("progress", False)
    torch.set_num_threads(tkw["num_threads"])
    t0 = time.perf_counter()
    ds, sp = load_split(args.dataset)
    if args.dataset == "yoochoose":
        protos = [("session/allowed", "full", False)]
    else:
        protos = [("full/masked", "full", True), ("full/allowed", "full", False),
                  ("sampled100/allowed", "sampled100", False)]
    path, hist = train(ds, ModelConfig.from_dict(mkw), TrainConfig.from_dict(tkw), args.out, split=sp,
                       eval_test=False)
    train_s = time.perf_counter() - t0
    for h in hist:
        print(h, flush=True)
    scorer = TransformerScorer.from_checkpoint(path, ds)
    test = {}
    for key, protocol, masked in protos:
        r = evaluate(scorer, ds, sp.test, protocol=protocol, mask_history=masked, seed=0, beyond_accuracy=False)
        test[key] = {k: round(v, 4) for k, v in r.items() if k in METRICS}
    rec = {"dataset": args.dataset, "out": args.out, "model": mkw, "train": tkw, "train_s": round(train_s, 1),
           "epochs": sum(1 for h in hist if "loss" in h),
           "best_valid": max((h["valid"]["NDCG@10"] for h in hist if "valid" in h), default=None),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "test": test,
           "eval_s": round(time.perf_counter() - t0 - train_s, 1)}
    print("RESULT", json.dumps(rec), flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


if __name__ == "__main__":
    main()
