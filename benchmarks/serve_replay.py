"""How much CPU does the predictor spend per request serving a real event stream (no Kafka, no Faust)?

Replays the first events of the Taobao time slice in stream order: each event extends its user's
history exactly as the stream does (``stream_app.history.add_event``), and every ``--batch``
consecutive events form one ``TransformerPredictor.predict(..., users=...)`` call (the KV cache
works as in the worker: first sights prefill, later events step). Variants run side by side, in
alternating rounds on the same batches, so their ratio survives a noisy box:

* the serving defaults (``score_dtype='auto'``, ``llama_forward``);
* ``--score-dtype float32``: one exact fp32 catalogue scan;
* ``transformers``: the backbone through ``LlamaModel.forward`` instead of ``llama_forward``.

    .venv/bin/python benchmarks/serve_replay.py --checkpoint runs/q/taobao
    .venv/bin/python benchmarks/serve_replay.py --checkpoint runs/q/taobao --batch 32 --no-write

Results go to the ``serve-replay`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/serve_replay.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import TAOBAO_SLICE, command_line, machine, publish, taobao_stream  # noqa: E402

SECTION = "serve-replay"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=str(TAOBAO_SLICE), help="Taobao UserBehavior CSV (default: the time slice)")
    ap.add_argument("--events", type=int, default=12_000)
    ap.add_argument("--warm", type=int, default=2_000, help="events served before timing (per variant)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    from models.serving import TransformerPredictor

    t_start = time.time()
    variants = {
        "defaults": dict(score_dtype="auto"),
        "fp32 scan": dict(score_dtype="float32"),
        "transformers forward": dict(score_dtype="auto"),
    }
    preds = {name: TransformerPredictor.from_checkpoint(args.checkpoint, device="cpu", **opts)
             for name, opts in variants.items()}
    preds["transformers forward"].model.lean_serving = False
    reqs = [(u, h) for u, h, _ in taobao_stream(Path(args.data), args.warm + args.events, preds["defaults"].cfg.max_len)]
    batches = [reqs[i:i + args.batch] for i in range(0, len(reqs), args.batch)]
    n_warm = args.warm // args.batch
    cpu = {name: 0.0 for name in preds}
    served = {name: 0 for name in preds}
    for _ in range(args.rounds):
        for name, p in preds.items():
            p.clear_cache()
            for b in batches[:n_warm]:  # first sights and cache fill, untimed
                p.predict([h for _, h in b], args.k, users=[u for u, _ in b])
            c0 = time.process_time()
            for b in batches[n_warm:]:
                p.predict([h for _, h in b], args.k, users=[u for u, _ in b])
            cpu[name] += time.process_time() - c0
            served[name] += sum(len(b) for b in batches[n_warm:])
    ms = {name: 1e3 * cpu[name] / served[name] for name in preds}
    stats = preds["defaults"].stats
    for name in preds:
        print(f"{name:22s} {ms[name]:.3f} ms CPU per request", flush=True)

    scan = "bf16 + exact fp32 rescoring" if preds["defaults"].score_dtype is not None else "fp32"
    md = ["## Serving a replayed stream, CPU per request (`benchmarks/serve_replay.py`)", "",
          f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; wall time {time.time() - t_start:.0f} s",
          f"- machine: {machine(preds['defaults'].device)}",
          f"- command: `{command_line()}`",
          f"- checkpoint `{args.checkpoint}` (version {preds['defaults'].version}, {len(preds['defaults'].vocab):,} "
          f"vocabulary rows); the first {args.warm + args.events:,} events of `{Path(args.data).name}` in file "
          f"order, batches of {args.batch} consecutive events, top-{args.k}; {args.warm:,} events untimed per "
          f"variant and round (cache fill), {args.rounds} alternating rounds; requests served by the defaults: "
          f"{stats['steps']:,} steps, {stats['prefills']:,} prefills",
          "",
          "| variant | CPU ms per request | vs defaults |",
          "|---|---:|---:|"]
    md += [f"| {name}{' (' + scan + ', `llama_forward`)' if name == 'defaults' else ''} | {ms[name]:.3f} | "
           f"{ms[name] / ms['defaults']:.2f}× |" for name in preds]
    publish(SECTION, "\n".join(md), write=not args.no_write)


if __name__ == "__main__":
    main()
