"""How does the predictor's cost grow with the catalogue (10k / 100k / 1M items) and the sequence
length (50 / 200 events), at a fixed batch size?

For each cell: :meth:`TransformerPredictor.predict` with full recomputation (every window encoded),
and incremental inference (KV cache, ``exact`` mode, windows half full so every event is one
``step``). Sequences/s and milliseconds per batch, median of the repetitions; the two variants
alternate so machine load hits both alike. Results go to the ``predictor-cost-scaling`` section of
``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/cost_scaling.py                    # CPU, batch 128
    .venv/bin/python benchmarks/cost_scaling.py --device cuda --batch 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/cost_scaling.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _serving_bench as sb  # noqa: E402
from benchmarks.common import command_line, machine, publish  # noqa: E402
from models.devices import default_cpu_threads, resolve_device  # noqa: E402
from models.serving import TransformerPredictor  # noqa: E402

SECTION = "predictor-cost-scaling"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--catalogs", default="10000,100000,1000000")
    ap.add_argument("--seqs", default="50,200")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: cores - 1)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    dev = torch.device(resolve_device(args.device))
    threads = args.threads or default_cpu_threads()
    B, t_start = args.batch, time.time()
    users = [f"u{j}" for j in range(B)]
    rows = []
    for n_cat in (int(x) for x in args.catalogs.split(",")):
        for L in (int(x) for x in args.seqs.split(",")):
            model, vocab = sb.build_model(n_cat, max_len=L)
            opts = dict(version="random-init", device=args.device, num_threads=threads)
            full = TransformerPredictor(model, vocab, incremental=False, **opts)
            incr = TransformerPredictor(model, vocab, overflow="exact", cache_users=4 * B, **opts)
            # the same, scanning the catalogue in fp32 (what `auto` does on CPUs without bf16 instructions)
            incr32 = TransformerPredictor(model, vocab, overflow="exact", cache_users=4 * B, score_dtype="float32",
                                          **opts)
            hs = sb.histories(B, L, n_cat, seed=3)
            base = L // 2
            full.predict(hs[:8], args.k)  # warm-up
            for p in (incr, incr32):
                p.predict([h[:base - 1] for h in hs], args.k, users=users)  # fill the cache (untimed)
            t_full, t_incr, t_incr32 = [], [], []
            for r in range(args.reps):
                t_full += sb.once(dev, full.predict, hs, args.k)
                grow = [h[:base + r] for h in hs]
                t_incr += sb.once(dev, incr.predict, grow, args.k, users=users)
                t_incr32 += sb.once(dev, incr32.predict, grow, args.k, users=users)
            assert incr.stats["steps"] == incr32.stats["steps"] == B * args.reps, incr.cache_info()
            f, i, i32 = sb.med(t_full), sb.med(t_incr), sb.med(t_incr32)
            mb = model.item_emb.weight.numel() * 4 / 2 ** 20
            scan = "fp32" if incr.score_dtype is None else "bf16 + rescoring"
            rows.append((n_cat, L, B / f, f * 1e3, B / i, i * 1e3, f / i, scan, i32 * 1e3, full.max_rows, mb))
            print(f"catalogue {n_cat:>9,} seq {L:4d}: full {B / f:8.0f} seq/s {f * 1e3:9.1f} ms | incremental "
                  f"{B / i:8.0f} seq/s {i * 1e3:9.1f} ms | x{f / i:.2f} | incremental, fp32 scan {i32 * 1e3:.1f} ms",
                  flush=True)
            del model, full, incr, incr32

    gpu_note = ("" if dev.type == "cuda" else
                "\n**CPU only** — no GPU was available in this task. On a GPU node: "
                "`.venv/bin/python benchmarks/cost_scaling.py --device cuda --batch 1024`.\n")
    md = [f"## Predictor cost vs catalogue size and sequence length ({dev.type.upper()})", "",
          f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; wall time {time.time() - t_start:.0f} s",
          f"- machine: {machine(dev)}",
          f"- command: `{command_line()}`",
          f"- model: random init, d=64, 2 layers (llama), full-catalogue top-{args.k}; batch {B}; median of "
          f"{args.reps} batches; *full* = `predict` re-encoding every window, *incremental* = `predict` with the "
          "KV cache (`exact`, windows half full: one `step` token per event); *scan* = what `score_dtype='auto'` "
          "chose for both (bf16 + exact fp32 rescoring of the best k + 32, or one fp32 scan); the last timing "
          "column is the incremental path with an exact fp32 scan",
          gpu_note,
          "| catalogue | sequence | full seq/s | full ms/batch | incremental seq/s | incremental ms/batch | speed-up "
          "| scan | incremental, fp32 scan ms/batch | rows per model call | item table MiB |",
          "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    md += [f"| {c:,} | {L} | {a:,.0f} | {am:.1f} | {b:,.0f} | {bm:.1f} | {s:.2f}× | {sc} | {i32:.1f} | {mr} | "
           f"{mb:.0f} |" for c, L, a, am, b, bm, s, sc, i32, mr, mb in rows]
    md += ["", "Reading: the per-event cost is the encoder (grows with the sequence for full recomputation, "
               "constant per token for incremental) plus the catalogue scoring (`d × catalogue` multiply-adds "
               "and a top-K over the catalogue per event, identical on both paths). At 1M items the "
               "scoring dominates and caching the encoder barely helps; at small catalogues and long "
               "sequences the encoder dominates and incremental inference pays most. The bf16 scan with exact "
               "rescoring cuts the scoring where the item table is large (compare the fp32-scan column); "
               "below 8 MiB of fp32 table `auto` keeps the fp32 scan, which is as fast there."]
    publish(SECTION, "\n".join(md), write=not args.no_write)


if __name__ == "__main__":
    main()
