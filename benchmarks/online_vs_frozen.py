#!/usr/bin/env python
"""Does online learning pay? Online vs frozen vs the stream-learning baseline on time-ordered replays.

Question: on a log replayed in time order, with the Transformer trained offline on the earliest part
only (model selection on data before the split), how much better does the model that keeps learning
from the outcomes predict the rest than the same model frozen, and than the popularity + Markov
baseline that learns from the stream? Also: HR@10 on items first seen during the stream (the frozen
model cannot rank them), the trainer's examples/s, and, with ``--switch``, how fast each recovers
after a synthetic stream's behaviour changes at a known time.

Each dataset (``--dataset``, any name the loaders read, incl. ``csv:PATH``) is cut at ``--split`` of
its events (time order); the offline model is trained on the first part (``nextaction train``
defaults, ``--train-budget-min``), then the rest is streamed through the replay harness
(``benchmarks/online/harness.py``: the worker's and the trainer's own code, in one process, no broker).
``--pipeline`` also streams it through the real pipeline (broker, worker, trainer: ``benchmarks/online/
pipeline.py``) for the freshness figure and the agreement check.

Writes the ``online`` section of ``benchmarks/RESULTS.md`` (unless ``--no-write``) and a PNG of
prequential NDCG@10 over stream time (``benchmarks/online_vs_frozen.png``).

    .venv/bin/python benchmarks/online_vs_frozen.py --dataset ml-100k --dataset taobao --dataset yoochoose
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

PLOT = common.ROOT / "benchmarks" / "online_vs_frozen.png"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", action="append", default=None,
                    help="a dataset name (models.datasets.load; repeatable; default ml-100k, taobao, yoochoose)")
    ap.add_argument("--split", type=float, default=0.5, help="fraction of the events (time order) trained offline")
    ap.add_argument("--max-stream", type=int, default=None, help="stream at most this many events per dataset")
    ap.add_argument("--train-budget-min", type=float, default=3.0, help="offline training budget per dataset")
    ap.add_argument("--checkpoints", type=Path, default=common.ROOT / "runs" / "online",
                    help="where the offline checkpoints go (reused when present)")
    ap.add_argument("--events-per-delta", type=int, default=1000,
                    help="stream events between two deltas (the delta interval at the stream's rate)")
    ap.add_argument("--events-per-full", type=int, default=20_000, help="stream events between full versions")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--switch", action="store_true", help="also run the synthetic behaviour switch")
    ap.add_argument("--switch-users", type=int, default=1500, help="users of the synthetic switch stream")
    ap.add_argument("--pipeline", action="store_true",
                    help="also stream the first dataset through broker + worker + trainer (freshness, agreement)")
    ap.add_argument("--pipeline-events", type=int, default=6000, help="streamed events of the pipeline run")
    ap.add_argument("--rate", type=float, default=100.0, help="events/s of the pipeline run")
    ap.add_argument("--broker", default=None, help="kafka://host:port of a running broker (default: embedded)")
    ap.add_argument("--online-config", default="{}", help="JSON overrides of online.trainer.OnlineConfig")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md or the plot")
    return ap.parse_args(argv)


def offline_checkpoint(stream, ds, out: Path, budget_min: float, threads: int) -> Path:
    """The Transformer trained on the stream's offline part with the training defaults (reused if there)."""
    from models.checkpoint import verify_checkpoint
    from models.config import TrainConfig
    from models.datasets.core import Dataset
    from models.errors import CheckpointError
    from models.train import train

    try:
        verify_checkpoint(out)
        return out
    except CheckpointError:
        pass
    items = list(dict.fromkeys(i for s in stream.offline.values() for i in s.items))
    part = Dataset(f"{ds.name}-offline", stream.offline, items, ds.has_time, ds.has_actions)
    train(part, None, TrainConfig(budget_min=budget_min, num_threads=threads, progress=False), out)
    return out


def prepare(name: str, args, ds=None):
    """(stream, checkpoint, training seconds) of dataset ``name`` (or of ``ds``, already loaded)."""
    import torch

    from benchmarks.online.harness import time_split
    from models.datasets import load

    torch.set_num_threads(args.threads)
    ds = ds if ds is not None else load(name)
    stream = time_split(ds, args.split, args.max_stream)
    t0 = time.perf_counter()
    ckpt = offline_checkpoint(stream, ds, args.checkpoints / name.replace(":", "_").replace("/", "_"),
                              args.train_budget_min, args.threads)
    return stream, ckpt, time.perf_counter() - t0


def run_dataset(name: str, args, prepared=None, **replay_kw) -> dict:
    import json

    from benchmarks.online.harness import replay
    from online.trainer import OnlineConfig

    stream, ckpt, train_s = prepared or prepare(name, args)
    cfg = OnlineConfig(**json.loads(args.online_config))
    kw = dict(events_per_delta=args.events_per_delta, events_per_full=args.events_per_full) | replay_kw
    res = replay(stream, ckpt, online_config=cfg, **kw)
    res.update(dataset=name, stream_events=len(stream.events), offline_users=len(stream.offline),
               offline_events=sum(len(s) for s in stream.offline.values()), train_seconds=round(train_s, 1),
               checkpoint=str(ckpt))
    return res


def run_switch(args) -> tuple[dict, dict]:
    """The synthetic stream whose behaviour switches at a known event (harness): scores and recovery."""
    from benchmarks.online.harness import recovery, switched
    from models.datasets.synthetic import synthetic

    ds = synthetic(n_users=args.switch_users, seed=11, events_per_user=30)
    stream, ckpt, train_s = prepare(f"synthetic-{args.switch_users}", args, ds)
    stream, at = switched(stream)
    res = run_dataset("synthetic (switch)", args, (stream, ckpt, train_s))
    rec = {name: recovery(sc, at) for name, sc in res["scores"].items()}
    res["switch_at"] = at
    return res, rec


def run_pipeline(name: str, args) -> tuple[dict, dict]:
    """The first dataset through broker + worker + trainer, and the harness on the same events with the
    pipeline's delta interval and batching expressed in events (the agreement check)."""
    import asyncio
    import json

    from benchmarks.online.pipeline import run_pipeline as through_kafka
    from stream_app.settings import Settings

    stream, ckpt, train_s = prepare(name, args)
    s = Settings()
    env = {f"NEXTACTION_TRAINER_{k.upper()}": str(v) for k, v in json.loads(args.online_config).items()
           if f"trainer_{k}" in Settings.model_fields}
    run = asyncio.run(through_kafka(stream, ckpt, n_events=args.pipeline_events, rate=args.rate,
                                    delta_interval_s=s.trainer_delta_interval_s, broker_url=args.broker,
                                    online_env=env))
    # the same stream in the harness: a delta every interval's worth of events, steps of what arrives
    # within the trainer's max wait (at most trainer_batch)
    from benchmarks.online.harness import Stream

    cut = Stream(stream.name, stream.offline, stream.events[:args.pipeline_events], stream.split_ts)
    per_delta = max(1, round(args.rate * s.trainer_delta_interval_s))
    batch = max(1, min(s.trainer_batch, round(args.rate * s.trainer_max_wait_s)))
    res = run_dataset(name, args, (cut, ckpt, train_s), events_per_delta=per_delta, train_batch=batch,
                      events_per_full=10**9, baseline=False)
    return run.summary() | {"deltas": run.deltas, "labels": run.labels, "examples_per_s": run.examples_per_s,
                            "learned": run.learned, "seconds": run.seconds, "events": run.events,
                            "rate": args.rate}, res


def table(results: list[dict]) -> str:
    lines = ["| dataset | streamed | predictor | NDCG@10 | HR@10 | action log loss | HR@10 new items (n) | "
             "NDCG@10 vs frozen |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        frozen = r["scores"]["frozen"].summary()["ndcg10"]
        for name in ("online", "frozen", "baseline"):
            s = r["scores"][name].summary()
            gain = (s["ndcg10"] / frozen - 1) * 100 if frozen else float("nan")
            lines.append(f"| {r['dataset']} | {r['stream_events']:,} | {name} | {s['ndcg10']:.4f} | {s['hr10']:.4f} | "
                         f"{s['log_loss']:.4f} | {s['hr10_new']:.4f} ({s['n_new']:,}) | "
                         f"{'' if name == 'frozen' else f'{gain:+.1f} %'} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, window: int = 2000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        for name, style in (("online", "-"), ("frozen", "--"), ("baseline", ":")):
            s = r["scores"][name]
            x, y = np.asarray(s.position), np.asarray(s.ndcg)
            if len(y) < window:
                continue
            roll = np.convolve(y, np.ones(window) / window, mode="valid")
            ax.plot(x[window - 1:], roll, style, label=name)
        ax.set_title(r["dataset"])
        ax.set_xlabel("stream event")
        ax.set_ylabel(f"prequential NDCG@10 (rolling {window})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def switch_table(res: dict, rec: dict) -> str:
    lines = [f"Synthetic stream ({res['stream_events']:,} events, behaviour switched at event {res['switch_at']:,}: "
             "every item replaced by another of its category):", "",
             "| predictor | NDCG@10 before the switch | lowest after (rolling 1,000) | at the end | "
             "events until back within 10 % |", "|---|---:|---:|---:|---:|"]
    for name in ("online", "frozen", "baseline"):
        r = rec[name]
        back = "not within the stream" if r["back_after_events"] is None else f"{r['back_after_events']:,}"
        lines.append(f"| {name} | {r['pre']:.4f} | {r['low']:.4f} | {r.get('end', float('nan')):.4f} | {back} |")
    return "\n".join(lines)


def pipeline_table(name: str, pipe: dict, res: dict) -> str:
    h = res["scores"]["online"].summary()
    f = res["scores"]["frozen"].summary()
    gap = (pipe["ndcg10"] / h["ndcg10"] - 1) * 100
    return "\n".join([
        f"Through the pipeline (embedded broker, `faust worker`, `nextaction trainer`): {name}, first "
        f"{pipe['events']:,} streamed events at {pipe['rate']:.0f} events/s (+ each user's offline tail as a warm-up "
        f"backlog), against the harness on the same events with the same delta interval and step size in events:", "",
        "| run | outcomes scored | online NDCG@10 | HR@10 | action log loss | frozen NDCG@10 (harness) | "
        "online vs frozen |", "|---|---:|---:|---:|---:|---:|---:|",
        f"| pipeline | {pipe['n']:,} | {pipe['ndcg10']:.4f} | {pipe['hr10']:.4f} | {pipe['log_loss']:.4f} | "
        f"{f['ndcg10']:.4f} | {(pipe['ndcg10'] / f['ndcg10'] - 1) * 100:+.1f} % |",
        f"| harness | {h['n']:,} | {h['ndcg10']:.4f} | {h['hr10']:.4f} | {h['log_loss']:.4f} | {f['ndcg10']:.4f} | "
        f"{(h['ndcg10'] / f['ndcg10'] - 1) * 100:+.1f} % |", "",
        f"Pipeline vs harness online NDCG@10: {gap:+.1f} %. **Freshness** (outcome on `outcomes` → first prediction "
        f"by weights that learned it): median {pipe['freshness_median_s']:.2f} s, p95 {pipe['freshness_p95_s']:.2f} s "
        f"over {pipe['covered']:,} outcomes ({pipe['uncovered']} not covered by the end); {pipe['deltas']} deltas, "
        f"predictions under {pipe['labels']} weight labels; trainer {pipe['examples_per_s']:.0f} examples/s of "
        f"learning time ({pipe['learned']:,} learned, CPU, sharing 2 cores with the broker and the worker); "
        f"run {pipe['seconds']:.0f} s."])


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.dataset or ["ml-100k", "taobao", "yoochoose"]
    t0 = time.perf_counter()
    results = [run_dataset(n, args) for n in names]
    text = table(results)
    detail = "\n".join(f"- {r['dataset']}: offline part {r['offline_events']:,} events of {r['offline_users']:,} users "
                       f"(trained {r['train_seconds']} s, `{r['checkpoint']}`); trainer {r['examples_per_s']:.0f} "
                       f"examples/s on CPU ({r['learned']:,} learned in {r['learn_seconds']:.0f} s), "
                       f"{r['deltas']} deltas, {r['full_versions']} full versions, vocabulary {r['offline_items']:,} "
                       f"→ {r['vocabulary']:,} items; replay {r['seconds']:.0f} s" for r in results)
    print(text)
    print(detail)
    extra = []
    plotted = list(results)
    if args.switch:
        res, rec = run_switch(args)
        extra.append(switch_table(res, rec))
        plotted.append(res)
        print(extra[-1])
    if args.pipeline:
        pipe, res = run_pipeline(names[0], args)
        extra.append(pipeline_table(names[0], pipe, res))
        print(extra[-1])
    if not args.no_write:
        plot(plotted, PLOT)
        body = ("## Online learning vs frozen (`benchmarks/online_vs_frozen.py`)\n\n"
                f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time {time.perf_counter() - t0:.0f} s\n"
                f"- machine: {common.machine('cpu')}; no GPU lent to this task, so no GPU trainer figure\n"
                f"- command: `{common.command_line(argv)}`\n\n"
                "Replay harness (`benchmarks/online/harness.py`: the worker's and the trainer's code in one process, "
                "score-then-train on every outcome), offline model trained on the first half of each log in time "
                f"order:\n\n{text}\n\n{detail}\n\n" + "\n\n".join(extra) +
                "\n\n![prequential NDCG@10 over the stream](online_vs_frozen.png)\n")
        common.publish("online", body, write=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
