"""What do online deltas cost the serving path? Batch latency with a delta every few seconds vs none.

Replays events of the Taobao time slice in stream order (each event extends its user's window as the
stream does) through ``TransformerPredictor.predict(..., users=...)`` in batches of ``--batch``
consecutive events, with the KV cache working as in the worker. First, an
:class:`online.trainer.OnlineTrainer` learns from the outcomes of that same stream (each event is the
outcome of the user's previous prediction) and emits its deltas every ``--rate`` × ``--interval-s``
events: the deltas a worker would receive at that event rate. Then two fresh predictors serve the
stream side by side, in alternating rounds: ``none`` (no deltas) and ``deltas`` (each delta applied
between two batches, where the worker applies it: the next batch waits for it, so its latency
includes the apply, the item-table cache rebuild and any stale user state rebuilt). Reported: p50 /
p99 / max wall ms per batch, and how many cached user states were rebuilt because they went stale
(``kv_max_stale_deltas``) or held a changed row.

    .venv/bin/python benchmarks/delta_cost.py --checkpoint runs/q/taobao

Results go to the ``delta-cost`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/delta_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import TAOBAO_SLICE, command_line, machine, publish, taobao_stream  # noqa: E402

SECTION = "delta-cost"


def learn_deltas(checkpoint: str, reqs: list, batch: int, every: int) -> dict[int, list[bytes]]:
    """The trainer's deltas over the stream: batch index → the deltas a worker receives before it."""
    import orjson

    from models.checkpoint import load_checkpoint
    from models.delta import ModelDelta
    from models.serving import TransformerPredictor
    from online.examples import example_from_outcome
    from online.trainer import OnlineTrainer
    from stream_app.history import as_of
    from stream_app.records import StoredPrediction, outcome_record

    ck = load_checkpoint(checkpoint)
    trainer = OnlineTrainer(ck.model, ck.vocab, ck.version)
    served = TransformerPredictor.from_checkpoint(checkpoint, device="cpu", num_threads=1)
    last: dict[str, tuple[StoredPrediction, object]] = {}
    pending, out = [], {}
    for b0 in range(0, len(reqs), batch):
        chunk = reqs[b0:b0 + batch]
        for off, (u, h, ev) in enumerate(chunk):
            if u in last:
                sp, before = last[u]
                rec = outcome_record(u, sp, served=before, action=ev["action"], item_id=ev["item_id"],
                                     category=ev.get("category", ""), event_ts=ev["ts"], partition=0, offset=b0 + off)
                pending.append(example_from_outcome(orjson.loads(rec)))
        preds = served.predict([h for _, h, _ in chunk], 10, [u for u, _, _ in chunk])
        for (u, h, ev), p in zip(chunk, preds):
            last[u] = (StoredPrediction(str(served.version), ev["ts"], 0, 0, p), as_of(h, ev["ts"]))
        if len(pending) >= 256:
            trainer.learn(pending)
            pending = []
        if (b0 // batch + 1) % max(1, every // batch) == 0:
            ds = [d.encode() for d in trainer.deltas()]
            for d in ds:
                served.apply_delta(ModelDelta.decode(d))
            out[b0 // batch + 1] = ds
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=str(TAOBAO_SLICE), help="Taobao UserBehavior CSV (default: the time slice)")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--rate", type=float, default=500.0, help="events/s the deltas are spaced for")
    ap.add_argument("--interval-s", type=float, default=2.0, help="seconds between deltas (trainer_delta_interval_s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from models.delta import ModelDelta
    from models.serving import TransformerPredictor

    torch.set_num_threads(1)
    t_start = time.time()
    probe = TransformerPredictor.from_checkpoint(args.checkpoint, device="cpu", num_threads=1)
    reqs = taobao_stream(Path(args.data), args.events, probe.cfg.max_len)
    batches = [reqs[i:i + args.batch] for i in range(0, len(reqs), args.batch)]
    every = int(args.rate * args.interval_s)
    deltas = learn_deltas(args.checkpoint, reqs, args.batch, every)
    n_deltas = sum(len(v) for v in deltas.values())
    rows = [ModelDelta.decode(d).n_rows for v in deltas.values() for d in v]
    lat: dict[str, list[float]] = {"none": [], "deltas": []}
    stats = {}
    for _ in range(args.rounds):
        for name in lat:
            p = TransformerPredictor.from_checkpoint(args.checkpoint, device="cpu", num_threads=1)
            # decoded outside the timing: the worker decodes a record on the event loop, and only the
            # apply runs on the inference thread between two batches
            decoded = {k: [ModelDelta.decode(d) for d in v] for k, v in deltas.items()} if name == "deltas" else {}
            for k, b in enumerate(batches):
                t0 = time.perf_counter()
                for d in decoded.get(k, ()):
                    p.apply_delta(d)
                p.predict([h for _, h, _ in b], 10, users=[u for u, _, _ in b])
                lat[name].append(1e3 * (time.perf_counter() - t0))
            stats[name] = dict(p.stats)
    q = {name: (np.percentile(v, 50), np.percentile(v, 99), max(v)) for name, v in lat.items()}
    for name, (p50, p99, mx) in q.items():
        print(f"{name:8s} p50 {p50:.2f} ms  p99 {p99:.2f} ms  max {mx:.1f} ms per batch; stats {stats[name]}")
    md = ["## What online deltas cost the serving path (`benchmarks/delta_cost.py`)", "",
          f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; wall time {time.time() - t_start:.0f} s",
          f"- machine: {machine(probe.device)}",
          f"- command: `{command_line()}`",
          f"- checkpoint `{args.checkpoint}` ({len(probe.vocab):,} vocabulary rows); the first {args.events:,} events "
          f"of `{Path(args.data).name}` in file order, batches of {args.batch}, top-10, {args.rounds} alternating "
          f"rounds; deltas from an OnlineTrainer learning the same stream's outcomes, one chain every {every:,} "
          f"events (a delta every {args.interval_s:g} s at {args.rate:g} events/s): {n_deltas} records, median "
          f"{int(np.median(rows)) if rows else 0} rows (max {max(rows) if rows else 0})",
          "",
          "| variant | p50 ms per batch | p99 ms per batch | max ms | user states rebuilt as stale |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {name} | {q[name][0]:.2f} | {q[name][1]:.2f} | {q[name][2]:.1f} | {stats[name].get('stale', 0):,} |"
           for name in lat]
    md += ["", f"p99 with deltas / without: {q['deltas'][1] / q['none'][1]:.2f}× (same batches, same process, "
               f"alternating)."]
    publish(SECTION, "\n".join(md), write=not args.no_write)


if __name__ == "__main__":
    main()
