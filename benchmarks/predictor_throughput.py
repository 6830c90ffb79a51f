"""Predictor throughput and latency vs batch size, our serving path next to a bare PyTorch loop.

Question: how close does :class:`models.serving.TransformerPredictor` (``predict``: encoding,
collation, padding to length buckets, host→device copies, model, device top-K, result objects) get to
the ceiling — a bare loop of ``model.score_last`` + ``torch.topk`` over the *same* model on tensors
built before timing (same chunking, same copies)? Target: ≥ 75 % of the bare loop at large batches;
on an H100 with d=64, 2 layers, sequence 50, a 100k catalogue: ≥ 400k sequences/s.

Also measured: incremental inference (KV cache, one new token per event) against full
recomputation, per event, and the memory each cached user costs.

Both variants run interleaved in one process (alternating repetitions) so machine load hits both
alike. Results go to the ``predictor-throughput`` section of ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/predictor_throughput.py                 # device auto, sizes per device
    .venv/bin/python benchmarks/predictor_throughput.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/predictor_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _serving_bench as sb  # noqa: E402
from benchmarks.common import command_line, machine, publish  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.devices import default_cpu_threads, resolve_device  # noqa: E402
from models.encoding import collate, encode  # noqa: E402
from models.serving import TransformerPredictor  # noqa: E402

SECTION = "predictor-throughput"


def bare_loop(pred: TransformerPredictor, batch_cpu: dict[str, torch.Tensor], k: int):
    """The ceiling: pre-built (pinned on CUDA) tensors → device → score_last → top-K → host."""
    dev, rows = pred.device, pred.max_rows
    B = batch_cpu["item"].shape[0]
    chunks = [{key: t[s: s + rows] for key, t in batch_cpu.items()} for s in range(0, B, rows)]
    if pred.cuda:
        chunks = [{key: t.pin_memory() for key, t in c.items()} for c in chunks]

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=pred.cuda):
            for c in chunks:
                b = {key: t.to(dev, non_blocking=True) for key, t in c.items()}
                o = pred._score_last(b, k, pred.score_dtype)  # device top-K, the same scan precision
                o["top_scores"].float().cpu(), o["top_items"].cpu(), o["action_probs"].float().cpu()
                o["gap_log_s"].float().cpu()
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--catalog", type=int, default=100_000)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=50, help="history length = model max_len")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-sizes", type=str, default=None,
                    help="comma list (default: CPU 1,4,16,64,256,1024,4096; CUDA powers of 2 up to 4096)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per batch size and variant")
    ap.add_argument("--incr-batch", type=int, default=None, help="users per batch in the incremental test")
    ap.add_argument("--incr-reps", type=int, default=None, help="events per user timed in the incremental test")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: cores - 1)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the scorer (both variants)")
    ap.add_argument("--score-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="catalogue scan precision (both variants; see models.serving)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    args = ap.parse_args(argv)

    dev = torch.device(resolve_device(args.device))
    cuda = dev.type == "cuda"
    sizes = ([int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else
             [2 ** p for p in range(13)] if cuda else [1, 4, 16, 64, 256, 1024, 4096])
    min_time = args.min_time if args.min_time is not None else (1.0 if cuda else 1.5)
    threads = args.threads or default_cpu_threads()
    t_start = time.time()

    model, vocab = sb.build_model(args.catalog, d_model=args.d_model, n_layers=args.layers, max_len=args.seq)
    tmp = tempfile.TemporaryDirectory(prefix="nextaction-bench-")
    path = save_checkpoint(Path(tmp.name) / "ck", model, vocab)
    opts = dict(device=args.device, num_threads=threads, compile=args.compile, score_dtype=args.score_dtype)
    full = TransformerPredictor.from_checkpoint(path, incremental=False, **opts)
    pool = sb.histories(max(sizes), args.seq, args.catalog, seed=1)
    print(f"device {full.device}, threads {full.num_threads}, catalogue {args.catalog:,} (+{vocab.n_hash_buckets} "
          f"hash buckets), d={args.d_model}, layers={args.layers}, seq={args.seq}, k={args.k}, "
          f"rows/chunk {full.max_rows}", flush=True)

    # ---- 1. throughput vs batch size, ours vs bare loop (interleaved repetitions) -----------------
    rows = []
    full.predict(pool[:8], args.k)  # warm-up (lazy inits, compile)
    for B in sizes:
        hs = pool[:B]
        batch = collate([encode(h, vocab, full.cfg) for h in hs], pad_to=full.buckets[-1])
        bare = bare_loop(full, batch, args.k)
        if B <= 256:
            bare(), full.predict(hs, args.k)  # warm-up at this shape
        ours_t, bare_t = [], []
        t_end = time.perf_counter() + 2 * min_time
        while len(ours_t) < 2 or (time.perf_counter() < t_end and len(ours_t) < 200):
            ours_t += sb.once(dev, full.predict, hs, args.k)
            bare_t += sb.once(dev, bare)
        o, b = sb.med(ours_t), sb.med(bare_t)
        rows.append((B, B / o, o * 1e3, B / b, b * 1e3, b / o, len(ours_t), sum(ours_t), sum(bare_t)))
        print(f"B={B:5d}  ours {B / o:10.0f} seq/s {o * 1e3:9.2f} ms   bare {B / b:10.0f} seq/s {b * 1e3:9.2f} ms"
              f"   ratio {b / o:5.2f}  ({len(ours_t)} reps)", flush=True)

    # ---- 2. incremental (KV cache) vs full recomputation, per event ------------------------------
    L = args.seq
    IB = args.incr_batch or (1024 if cuda else 128)
    R = args.incr_reps or (16 if cuda else 8)
    base = L // 2  # exact mode: windows growing from L/2 (no overflow during the timed events)
    users = [f"u{j}" for j in range(IB)]
    long = sb.histories(IB, L + R + 1, args.catalog, seed=2)
    exact = TransformerPredictor.from_checkpoint(path, overflow="exact", cache_users=10 * IB, **opts)
    evict = TransformerPredictor.from_checkpoint(path, overflow="evict", refresh_every=R, cache_users=10 * IB, **opts)
    exact.predict([h[:base - 1] for h in long], args.k, users=users)  # fill the caches (untimed)
    evict.predict([h[:L] for h in long], args.k, users=users)
    t_full, t_exact, t_full_cap, t_evict = [], [], [], []
    for r in range(R):
        grow = [h[:base + r] for h in long]  # window below max_len: exact stepping
        cap = [h[: L + 1 + r] for h in long]  # window full: every event pushes one out
        t_full += sb.once(dev, full.predict, grow, args.k)
        t_exact += sb.once(dev, exact.predict, grow, args.k, users=users)
        t_full_cap += sb.once(dev, full.predict, cap, args.k)
        t_evict += sb.once(dev, evict.predict, cap, args.k, users=users)
    per = {n: 1e3 * float(np.mean(v)) / IB for n, v in
           (("full", t_full), ("exact", t_exact), ("full_cap", t_full_cap), ("evict", t_evict))}
    info_x, info_e = exact.cache_info(), evict.cache_info()
    assert info_x["steps"] == IB * R, info_x  # every timed event was a cache hit (one token each)
    mem_x = info_x["bytes"] / max(info_x["entries"], 1)
    mem_e = info_e["bytes"] / max(info_e["entries"], 1)
    bpt = exact.bytes_per_token()
    print(f"per event: full {per['full']:.3f} ms, incremental {per['exact']:.3f} ms "
          f"(x{per['full'] / per['exact']:.2f}); at the cap: full {per['full_cap']:.3f} ms, evict "
          f"{per['evict']:.3f} ms (x{per['full_cap'] / per['evict']:.2f}); {bpt} B/token, "
          f"{mem_x / 1024:.1f} KiB/user at ~{mem_x / bpt:.0f} tokens, {mem_e / 1024:.1f} KiB at {L}", flush=True)

    # ---- 3. report ------------------------------------------------------------------------------
    big = [r for r in rows if r[0] >= 1024] or rows[-1:]
    ratio_big = sum(r[8] for r in big) / sum(r[7] for r in big)  # pooled over every repetition
    gpu_note = ("" if cuda else
                "\n**No GPU was available in this task**: every number here is CPU-only. The GPU target "
                "(≥ 400k sequences/s on one H100 including host↔device copies) is **unmeasured**; run on a GPU "
                "node:\n\n    .venv/bin/python benchmarks/predictor_throughput.py --device cuda\n"
                "    .venv/bin/python benchmarks/predictor_throughput.py --device cuda --compile\n"
                "    .venv/bin/python -m pytest -q tests/unit/models/test_serving.py   # includes the CPU/CUDA agreement test\n")
    md = [f"## Predictor throughput vs batch size ({'CUDA' if cuda else 'CPU only'})", "",
          f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; wall time {time.time() - t_start:.0f} s",
          f"- machine: {machine(dev)}",
          f"- command: `{command_line()}`",
          f"- model: random init, d={args.d_model}, {args.layers} layers (llama), sequence {args.seq}, catalogue "
          f"{args.catalog:,} items, full-catalogue top-{args.k} + action + gap heads; device `{full.device}`, "
          f"{'bf16 autocast' if cuda else 'fp32'}, catalogue scan "
          f"{'fp32 (exact)' if full.score_dtype is None else 'bf16 + exact fp32 rescoring of the best k + 32'} "
          f"(`--score-dtype {args.score_dtype}`), {full.num_threads} intra-op thread(s), compile={args.compile}, "
          f"{full.max_rows} rows per model call (score-matrix budget)",
          "- *ours* = `TransformerPredictor.predict` on `EventSeq` histories (encoding, collation, bucket padding, "
          "copies, model, device top-K, `Prediction` objects), full recomputation; *bare* = `score_last` + "
          "`topk` on tensors collated before timing (same chunks, same copies). Repetitions alternate; median "
          "batch latency.", gpu_note,
          "| batch | ours seq/s | ours ms/batch | bare seq/s | bare ms/batch | ours / bare | reps |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {B} | {a:,.0f} | {am:.2f} | {b:,.0f} | {bm:.2f} | {ra:.0%} | {n} |" for B, a, am, b, bm, ra, n, *_ in rows]
    md += ["", f"At batch ≥ 1024 our path reaches **{ratio_big:.0%}** of the bare loop's throughput (total time over "
               f"all repetitions of those sizes; target ≥ 75 %). Single batches on this shared machine vary by "
               f"±30 %, so compare the pooled figure, not one row.", "",
           f"### Incremental inference (KV cache) vs full recomputation, {IB} users per batch, {R} events each", "",
           "| case | ms per event | speed-up |", "|---|---:|---:|",
           f"| full recomputation, window {base}–{base + R - 1} events | {per['full']:.3f} | 1.00× |",
           f"| incremental `exact` (one token via `step`), same events | {per['exact']:.3f} | "
           f"**{per['full'] / per['exact']:.2f}×** |",
           f"| full recomputation, window full ({L} events) | {per['full_cap']:.3f} | 1.00× |",
           f"| incremental `evict` at the cap (sliding window, re-prefill every {R} evictions, amortised) | "
           f"{per['evict']:.3f} | **{per['full_cap'] / per['evict']:.2f}×** |",
           "| `exact` mode at the cap | = full recomputation (re-prefill; such users are not cached) | 1.00× |", "",
           f"Memory per cached user ({'bf16' if cuda else 'fp32'} keys/values of {args.layers} layers + repeat-head "
           f"key + item id): **{bpt:,} B per event token**, measured {mem_x / 1024:.1f} KiB per user at "
           f"~{mem_x / bpt:.0f} tokens and {mem_e / 1024:.1f} KiB per user with a full {L}-event window "
           f"(so 1 GiB holds ≈ {2 ** 30 / mem_e:,.0f} full-window users).",
           "The catalogue scoring (`[batch, catalogue] × d` matmul + top-K) is paid per event on both paths, so "
           "the end-to-end speed-up is bounded by its share; the encoder work itself drops from a whole window "
           "to one token."]
    publish(SECTION, "\n".join(md), write=not args.no_write)
    tmp.cleanup()


if __name__ == "__main__":
    main()
