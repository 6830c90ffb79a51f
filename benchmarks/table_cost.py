"""What do the item tables cost the serving path? Top-10 per request with and without them.

Scores the first ``--cases`` test histories of each dataset with its checkpoint's
``NextActionModel.score_last(batch, k=10)`` (the serving heads: catalogue scan, repeat scores, the
tables, top-K and normaliser) in batches of ``--batch``, one CPU thread, in three variants of the
same model, alternating, ``--rounds`` times: ``tables`` (as trained: transition and neighbour
tables), ``transitions only`` (neighbour weight 0) and ``no tables`` (both weights 0). Reported: the
median over rounds of milliseconds per request, and each table's entries per request.

    .venv/bin/python benchmarks/table_cost.py --checkpoints runs/q4 --datasets beauty taobao

Results go to the ``table-cost`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/table_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, machine, publish  # noqa: E402

SECTION = "table-cost"


def measure(checkpoint: Path, dataset: str, cases: int, batch: int, rounds: int) -> dict:
    """``{variant: median ms per request}`` plus the model's window and table sizes."""
    import numpy as np
    import torch

    from models.checkpoint import load_checkpoint
    from models.datasets import load_split
    from models.encoding import collate, encode

    ds, split = load_split(dataset)
    ck = load_checkpoint(checkpoint, device="cpu")
    m = ck.model.eval()
    hists = [c.history for c in split.test[:cases]]
    batches = [collate([encode(h, ck.vocab, m.cfg) for h in hists[i:i + batch]]) for i in range(0, len(hists), batch)]
    on = m.cfg
    variants = {"tables": on, "transitions only": dataclasses.replace(on, neighbour_weight=0.0),
                "no tables": dataclasses.replace(on, neighbour_weight=0.0, transition_weight=0.0)}
    ms: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, cfg in variants.items():
                m.cfg = cfg
                t0 = time.perf_counter()
                for b in batches:
                    m.score_last(b, k=10)
                ms[name].append(1e3 * (time.perf_counter() - t0) / len(hists))
    m.cfg = on
    per_row = {name: (np.diff(ptr.numpy()).mean() if ptr.numel() else 0.0)
               for name, ptr in (("transitions", m.trans_ptr), ("neighbours", m.nbr_ptr))}
    return {"dataset": dataset, "items": len(ck.vocab), "cases": len(hists),
            "ms": {k: float(np.median(v)) for k, v in ms.items()},
            "spread": float(max(ms["no tables"]) / min(ms["no tables"]) - 1.0),
            "transition_entries": per_row["transitions"] if m.uses_transitions else 0.0,
            "neighbour_entries": per_row["neighbours"] * on.neighbour_window if m.uses_neighbours else 0.0,
            "window": on.neighbour_window if m.uses_neighbours else 0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", required=True, help="folder with one checkpoint per dataset (DIR/<dataset>)")
    ap.add_argument("--datasets", nargs="+", default=["beauty", "taobao"])
    ap.add_argument("--cases", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    rows = [measure(Path(args.checkpoints) / d, d, args.cases, args.batch, args.rounds) for d in args.datasets]
    md = ["## What the item tables cost the serving path (`benchmarks/table_cost.py`)", "",
          f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; wall time {time.time() - t_start:.0f} s",
          f"- machine: {machine('cpu')}",
          f"- command: `{command_line()}`",
          f"- `score_last(batch, k=10)` on the first {args.cases:,} test histories, batches of {args.batch}, "
          f"{args.rounds} alternating rounds of the three variants of one model; median ms per request",
          "",
          "| dataset | items | tables (as trained) | transitions only | no tables | neighbours / transitions entries "
          "per request (mean) | tables / no tables | spread of no tables over rounds |",
          "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        md.append(f"| {r['dataset']} | {r['items']:,} | {ms['tables']:.3f} | {ms['transitions only']:.3f} | "
                  f"{ms['no tables']:.3f} | {r['neighbour_entries']:.0f} (window {r['window']}) / "
                  f"{r['transition_entries']:.0f} | {ms['tables'] / ms['no tables']:.2f}× | {100 * r['spread']:.0f} % |")
    md += ["", "A ratio within the spread is noise: the tables add a gather and a scatter-add of the entries "
               "above to a scan of the whole catalogue."]
    publish(SECTION, "\n".join(md), write=not args.no_write)


if __name__ == "__main__":
    main()
