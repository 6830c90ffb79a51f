"""New items first seen in the stream, learned online: text rows vs the context start (issue 17, item 3).

The online trainer (:class:`online.trainer.OnlineTrainer`) gives an item its vocabulary does not know
a row the moment the item is first a target. With a text projection and the item's text (the
outcome's ``item_text``) that row is the item's **text row**; without, it is its category's mean row
or hash bucket moved towards the window's last item (MovieLens events carry no category: the bucket).
This measures what the text start buys while the item is still young.

Protocol (seeded, prequential, MovieLens-100k):

* The checkpoint of ``benchmarks/cold_start.py`` (``runs/cold_start/ml-100k-text``: trained without
  the held-out items, with a text projection fitted on the warm items). The same ``--cold-share`` /
  ``--seed`` give the same held-out items; in the stream they are **renamed** (``new:<id>``), so the
  model's vocabulary does not know them: they are new items, never trained.
* The stream: the log's events (each with at least one earlier event of its user) in time order, the
  first ``--max-examples``, as ``outcomes`` examples: the user's window as of the previous event
  (their last ``max_len`` events, held-out items renamed) and the event as the target; an event of a
  held-out item carries the item's text (``"<title>. Genres: <genres>"``). The warm events were
  trained on already; they are streamed so that the trainer sees new items at their real share of
  the traffic (a stream of new items only teaches the model that the next item is always new).
  Only the held-out items' events are scored.
* Two trainers from the same checkpoint with the same config, one with the text projection (a new
  item starts from its text row moved a quarter of the way to the previous item), one
  without; ``user_per_minute`` is lifted (MovieLens users rate in bursts of dozens per minute, which
  the bot guard would drop). Before each batch of ``--batch`` examples is learned, each example's
  target is ranked by the trainer's *current* model over the whole catalogue it knows (the user's
  window items masked: MovieLens has no repeats); a target the vocabulary does not know yet (its
  first occurrence, or a later one in the same batch) is a miss for both.
* Reported by the item's occurrence number in the stream (1st .. n-th time it is a target), HR@10
  and NDCG@10 for each trainer, and the paired sign test; plus the learning cost per example.

    .venv/bin/python benchmarks/cold_start_online.py --write

Results go to the ``cold-start-online`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/cold_start_online.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cold_start import held_out, metrics, movielens_texts  # noqa: E402
from benchmarks.common import ROOT, command_line, machine, publish  # noqa: E402

SECTION = "cold-start-online"
HEADING = "New items learned online: text rows vs the context start (issue 17)"
BUCKETS = ((2, 2), (3, 5), (6, 20), (21, 10 ** 9))  # occurrence numbers reported (the 1st is a miss for both)
MISS = 10 ** 9  # the rank of a target the trainer does not know


def stream_examples(ds, cold: set[str], texts: dict[str, str], max_len: int, max_examples: int, version: str):
    """The log's events as ``outcomes`` examples, time-ordered, held-out items renamed and carrying
    their text (module docstring)."""
    from online.examples import Example

    def renamed(it: str) -> str:
        return f"new:{it}" if it in cold else it

    events = []
    timelines = {}
    for u, s in ds.sequences.items():
        timelines[u] = dataclasses.replace(s, items=[renamed(i) for i in s.items])
        events += [(int(s.ts[i]), u, i) for i in range(1, len(s))]
    events.sort()
    out = []
    for n, (ts, u, i) in enumerate(events[:max_examples]):
        s = timelines[u]
        w = s[max(0, i - max_len):i]
        item = s.items[i]
        text = texts.get(item[len("new:"):], "") if item.startswith("new:") else ""
        out.append(Example(u, w, item, int(s.actions[i]), ts, "", version, None, 0.2, 0, n, text))
    return out


def ranks_now(trainer, examples) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of each example's target under the trainer's current model, window items masked:
    over the whole catalogue the trainer knows, and among the items it added online (the new items it
    knows so far); :data:`MISS` for an item it does not know."""
    import torch

    from models.encoding import collate, encode

    m, vocab, first = trainer.model, trainer.vocab, trainer.first
    online = trainer.trained_items - first  # columns from here on were added online
    m.eval()
    out, among_new = [], []
    with torch.no_grad():
        for s in range(0, len(examples), 256):
            part = examples[s:s + 256]
            batch = collate([encode(ex.window, vocab, m.cfg) for ex in part])
            sc = m.score_last(batch)["item_scores"][:, first:].double().numpy()
            for b, ex in enumerate(part):
                if ex.item not in vocab:
                    out.append(MISS)
                    among_new.append(MISS)
                    continue
                row = sc[b].copy()
                seen = [vocab.index(i) - first for i in set(ex.window.items) if i in vocab]
                row[[j for j in seen if j >= 0]] = -np.inf
                t = row[vocab.index(ex.item) - first]
                out.append(int((row > t).sum()))
                among_new.append(int((row[online:] > t).sum()))
    return np.asarray(out, np.int64), np.asarray(among_new, np.int64)


def run_arm(path: Path, examples, scored: np.ndarray, batch: int, text: bool, encoder, seed: int
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Ranks of the ``scored`` examples (a mask) before each batch is learned (:func:`ranks_now`: over
    the catalogue, among the new items) and the trainer's stats."""
    from models.checkpoint import load_checkpoint
    from online.trainer import OnlineConfig, OnlineTrainer

    import torch

    torch.manual_seed(seed)  # the step's dropout: each arm draws the same masks, and a rerun gives the same figures
    ck = load_checkpoint(path, device="cpu")
    cfg = OnlineConfig(user_per_minute=10 ** 6, seed=seed)
    t = OnlineTrainer(ck.model, ck.vocab, ck.version, cfg, text_projection=ck.text_projection if text else None,
                      text_encoder=encoder)
    ranks, among_new, learn_s = [], [], 0.0
    for s in range(0, len(examples), batch):
        part = examples[s:s + batch]
        r, a = ranks_now(t, [ex for ex, keep in zip(part, scored[s:s + batch]) if keep])
        ranks.append(r)
        among_new.append(a)
        t0 = time.perf_counter()
        t.learn(part)
        learn_s += time.perf_counter() - t0
    return np.concatenate(ranks), np.concatenate(among_new), {**t.stats, "learn_s": learn_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "cold_start" / "ml-100k-text"),
                    help="benchmarks/cold_start.py's checkpoint with a text projection")
    ap.add_argument("--cold-share", type=float, default=0.1, help="as given to benchmarks/cold_start.py")
    ap.add_argument("--seed", type=int, default=0, help="as given to benchmarks/cold_start.py")
    ap.add_argument("--max-examples", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=64, help="examples per learn() call (the trainer's batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import torch

    from models.checkpoint import load_checkpoint
    from models.datasets import load
    from models.datasets.core import datasets_root
    from scipy.stats import binomtest

    from models.metrics import paired_sign_test
    from models.text import TextEncoder

    torch.set_num_threads(args.threads)
    path = Path(args.checkpoint)
    ck = load_checkpoint(path, device="cpu")
    if ck.text_projection is None:
        raise SystemExit(f"{path}: no text projection (run benchmarks/cold_start.py first)")
    texts, _ = movielens_texts(datasets_root() / "movielens-100k")
    ds = load("ml-100k")
    cold = held_out(ds.items, args.cold_share, args.seed)
    assert all(c in ck.vocab for c in cold), "not the held-out items of this checkpoint (--cold-share/--seed)"
    examples = stream_examples(ds, cold, texts, ck.model_config.max_len, args.max_examples, ck.version)
    scored = np.asarray([ex.item.startswith("new:") for ex in examples])
    occurrence, seen = [], {}
    for ex in examples:
        if ex.item.startswith("new:"):
            seen[ex.item] = seen.get(ex.item, 0) + 1
            occurrence.append(seen[ex.item])
    occurrence = np.asarray(occurrence)

    encoder = TextEncoder(device="cpu")
    arms = {"text row": run_arm(path, examples, scored, args.batch, True, encoder, args.seed),
            "context start (no text)": run_arm(path, examples, scored, args.batch, False, None, args.seed)}
    (ra, na, sa), (rb, nb, sb) = arms.values()
    n_cat = len(ck.vocab) - ck.vocab.first_item

    def table(a: np.ndarray, b: np.ndarray, title: str, median: bool) -> str:
        lines = [f"**{title}**", "", "| occurrence of the new item | cases | text row: HR@10 | NDCG@10 "
                 + ("| median rank " if median else "") + "| context start: HR@10 | NDCG@10 "
                 + ("| median rank " if median else "") + "| sign test (text better/worse, p) |",
                 "|---|---:|---:|---:|" + ("---:|" if median else "") + "---:|---:|" + ("---:|" if median else "")
                 + "---|"]
        for lo, hi in ((1, 1), *BUCKETS, (2, 10 ** 9)):
            sel = (occurrence >= lo) & (occurrence <= hi)
            if not sel.any():
                continue
            ma, mb = metrics(a[sel] + 1), metrics(b[sel] + 1)
            if median:  # who ranks the item higher, case by case (a miss ties)
                w, losses = int((a[sel] < b[sel]).sum()), int((a[sel] > b[sel]).sum())
                p = float(binomtest(w, w + losses, 0.5).pvalue) if w + losses else 1.0
            else:
                w, losses, p = paired_sign_test(a[sel], b[sel], 10)
            name = f"{lo}" if lo == hi else (f"{lo}+" if hi >= 10 ** 9 else f"{lo}–{hi}")
            name = "all after the 1st" if (lo, hi) == (2, 10 ** 9) else name

            def med(r: np.ndarray) -> str:
                return "—" if np.median(r) >= MISS else f"{int(np.median(r)) + 1}"

            lines.append(f"| {name} | {int(sel.sum())} | {ma['HR@10']:.4f} | {ma['NDCG@10']:.4f} | "
                         + (f"{med(a[sel])} | " if median else "") + f"{mb['HR@10']:.4f} | {mb['NDCG@10']:.4f} | "
                         + (f"{med(b[sel])} | " if median else "") + f"{w}/{losses}, p={p:.2g} |")
        return "\n".join(lines)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_items = len({ex.item for ex in examples if ex.item.startswith("new:")})
    text = "\n\n".join([
        f"## {HEADING}",
        f"{now}; {machine('cpu')}.\n\n`{command_line(argv)}`",
        f"MovieLens-100k; checkpoint `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}` "
        f"({ck.version}: trained without the {len(cold)} held-out items, text projection fitted on the warm ones). "
        f"Streamed: the first {len(examples)} events of the log (time order), {int(scored.sum())} of them of "
        f"{n_items} held-out items, renamed so the vocabulary does not know them, each carrying its item's text; "
        f"batches of {args.batch}; those ranked before each batch is learned over the whole catalogue the "
        f"trainer knows (window items masked). Protocol: "
        f"`benchmarks/cold_start_online.py` docstring. The 1st occurrence is a miss for both (the trainer "
        f"learns of the item from it; a worker with the projection already serves it from its text row, see "
        f"the section above).",
        table(ra, rb, f"Over the whole catalogue (~{n_cat} items); the sign test: which start ranks the item "
              f"higher", True),
        table(na, nb, "Among the new items the trainer knows at that moment (the offline section's first view); "
              "sign test on NDCG@10", False),
        f"New items started at their text rows: {sa['text_rows']} of {sa['new_items']} (context start: "
        f"{sb['text_rows']} of {sb['new_items']}). Learning cost ({args.threads} thread): "
        f"{1000 * sa['learn_s'] / len(examples):.2f} ms per example with text rows (the sentence model included, "
        f"loaded on the first new item) vs {1000 * sb['learn_s'] / len(examples):.2f} ms without.",
    ])
    publish(SECTION, text, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
