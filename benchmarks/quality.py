"""Quality bars: do our models beat the baselines on every dataset, under one protocol?

Question: on each dataset's test split, how does the Transformer ("ours") rank the next item next to
every baseline and the published figure for that protocol? When the checkpoint has an
item-transition or item-neighbour table (``models/transitions.py``, ``models/neighbours.py``), the
column "ours w/o tables" scores the same checkpoint without them; the row "NDCG@10 ours better/worse, sign test" compares ours case by case
with every column.

    .venv/bin/python -m benchmarks.quality                      # all datasets
    .venv/bin/python -m benchmarks.quality --datasets ml-100k taobao --max-cases 2000
    .venv/bin/python -m benchmarks.quality --datasets mylog=csv:path/to/events.csv --checkpoints runs/x --train

A dataset is a name ``models.datasets.load`` knows, or ``LABEL=SPEC`` for a user's log (``SPEC`` such
as ``csv:PATH``; ``LABEL`` names its rows and its checkpoints ``DIR/LABEL``, ``DIR/LABEL.gru4rec``).

Protocols: leave-one-out test split (yoochoose: session-rec next-click), ``full`` ranking with
history items allowed and masked, and ``sampled100`` (SASRec paper) as an extra. Baselines are
fitted on train + history (every event but the test targets; see ``models.datasets.fit_sequences``).

Writes the ``quality`` section ("## Quality") of ``benchmarks/RESULTS.md`` (other sections are left
alone; ``--no-write``/``--dry-run``: print only): one row per (dataset, protocol, metric).

Calibration (issue 16), on the first protocol of each dataset: ``item/top1_ece``, the expected
calibration error (15 equal-width bins) of the probability each scorer gives its top-1 item, next to
that probability's mean (``item/top1_confidence``) and how often the top-1 item is the next one
(``item/top1_accuracy``), for the scorers that are probability models (ours, popularity, markov;
``models.evaluate``); with actions also ``action/ece`` of the most probable action.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as `python benchmarks/quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchError, command_line, machine, publish  # noqa: E402
from models.baselines import make_baseline  # noqa: E402
from models.datasets import datasets_root, fit_sequences, load_split  # noqa: E402
from models.evaluate import evaluate  # noqa: E402
from models.metrics import paired_sign_test  # noqa: E402

SECTION = "quality"

DATASETS = ("beauty", "games", "ml-100k", "taobao", "yoochoose")
ITEM_BASELINES = ("popularity", "recent_popularity", "recent_items", "markov", "item_knn", "session_knn")
#: (dataset, protocol key) -> metric -> (figure, source)
PUBLISHED = {
    ("beauty", "full/allowed"): {"NDCG@10": (0.0327, "SASRec+"), "HR@10": (0.0533, "SASRec+")},
    ("beauty", "full/masked"): {"NDCG@10": (0.0611, "BSARec")},
    ("beauty", "sampled100/allowed"): {"HR@10": (0.4854, "SASRec"), "NDCG@10": (0.3219, "SASRec")},
    ("games", "sampled100/allowed"): {"HR@10": (0.7410, "SASRec"), "NDCG@10": (0.5360, "SASRec")},
    ("yoochoose", "session/allowed"): {"HR@20": (0.68, "GRU4Rec, full rsc15"),
                                       "MRR@20": (0.30, "GRU4Rec, full rsc15")},
    ("taobao", "full/allowed"): {"purchase_session_auc": (0.85, "RecSys'15 winner, other data")},
}
#: independent cross-check figures of the baselines themselves (full, allowed)
CROSSCHECK = {
    ("beauty", "popularity"): (0.0114, 0.0054), ("beauty", "markov"): (0.0753, 0.0492),
    ("beauty", "item_knn"): (0.0618, 0.0340), ("games", "popularity"): (0.0210, 0.0121),
    ("games", "markov"): (0.0814, 0.0491), ("ml-100k", "popularity"): (0.0498, 0.0224),
    ("ml-100k", "markov"): (0.1113, 0.0583), ("taobao", "popularity"): (0.0025, 0.0009),
    ("taobao", "item_knn"): (0.0883, 0.0504),
}


#: The GRU4Rec-style baseline: a GRU over item embeddings (models.model.GRUBackbone) with the same
#: softmax loss and training loop as ours; no repeat head, side features or transition table.
GRU4REC = {"backbone": "gru", "features": ["item"], "repeat_head": False, "transition_top": 0, "neighbour_top": 0,
           "category_recency": False}
#: Its per-dataset settings ``(model, train)`` — the values the earlier hand-tuned tables gave this
#: baseline (a baseline given its tuned settings, not ours); ``auto`` chooses the rest. A dataset
#: missing here gets ``auto`` alone.
GRU4REC_SETTINGS = {
    "ml-100k": ({"max_len": 200, "dropout": 0.2, "n_negatives": 0},
                {"batch_size": 256, "lr": 0.005, "window_stride": 200}),
    "beauty": ({"max_len": 50, "dropout": 0.3, "n_negatives": 4096}, {}),
    "games": ({"max_len": 50, "dropout": 0.5, "n_negatives": 4096}, {}),
    "taobao": ({"max_len": 50, "dropout": 0.5, "n_negatives": 2048}, {"batch_size": 64, "lr": 0.002}),
    "yoochoose": ({"max_len": 50, "dropout": 0.3, "n_negatives": 2048}, {}),
}
#: Column of the checkpoint scored without its fitted tables and terms (item transitions, neighbours,
#: category recency: models/transitions.py, models/neighbours.py, NextActionModel.category_recency).
NO_TRANSITIONS = "ours w/o tables"
#: Row comparing ours case by case with each column: cases where ours has the higher NDCG@10 / the
#: lower one, and the two-sided exact sign test p-value (models.metrics.paired_sign_test).
PAIRED = "NDCG@10 ours better/worse, sign test"


def label_and_spec(name: str) -> tuple[str, str]:
    """``(label, spec)`` of a ``--datasets`` entry: ``LABEL=SPEC`` for a user's log, else the name twice.

    >>> label_and_spec("mylog=csv:var/events.csv"), label_and_spec("ml-100k")
    (('mylog', 'csv:var/events.csv'), ('ml-100k', 'ml-100k'))
    """
    label, sep, spec = name.partition("=")
    if not sep:
        return name, name
    if not label or not spec or "/" in label:
        raise BenchError(f"dataset {name!r}: expected LABEL=SPEC with a non-empty LABEL without '/' and a SPEC")
    return label, spec


def _train_child(spec: str, root, model_overrides: dict, train_overrides: dict, out: str) -> None:
    """Train one dataset's checkpoint (``spec``: what :func:`load_split` loads) in a fresh process, so
    its time and peak memory are its own."""
    from models.auto import auto_configs
    from models.train import train

    ds, sp = load_split(spec, root)
    base = {k: train_overrides[k] for k in ("budget_min", "num_threads", "progress") if k in train_overrides}
    given = {k: v for k, v in train_overrides.items() if k not in base}
    mcfg, tcfg, profile, why = auto_configs(ds, sp, model_overrides, given, base_train=base)  # as `nextaction train`
    print(f"  {spec} auto ({profile.summary()}):\n    " + "\n    ".join(why), file=sys.stderr, flush=True)
    train(ds, mcfg, tcfg, out, split=sp, eval_test=False)


def _checkpoint_scorer(spec: str, ds, args, ck: Path, model_overrides: dict, budget_min: float, label: str,
                       train_overrides: dict | None = None):
    """The scorer of checkpoint ``ck`` if it exists, else trained there (``model_overrides``,
    ``train_overrides`` then ``--train-config``, ``budget_min``, ``--threads``) when ``--train`` is
    given, else None."""
    try:
        from models.scorer import TransformerScorer
    except ImportError as e:
        print(f"  ({label} skipped: {e})", file=sys.stderr)
        return None
    if not ck.exists() and args.train:
        import multiprocessing as mp

        tkw = {"budget_min": budget_min, "num_threads": args.threads, "progress": False,
               **(train_overrides or {}), **json.loads(args.train_config or "{}")}
        proc = mp.get_context("spawn").Process(target=_train_child, args=(spec, args.root, model_overrides, tkw,
                                                                          str(ck)))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"  (training {label} on {spec} failed with exit code {proc.exitcode}; skipped)", file=sys.stderr)
    if not ck.exists():
        print(f"  (no checkpoint at {ck}; {label} skipped)", file=sys.stderr)
        return None
    return TransformerScorer.from_checkpoint(ck, ds, device="cpu")


def _transformer(name, ds, sp, args, spec: str | None = None):
    """The Transformer scorer: ``--checkpoints DIR/<dataset>`` if it exists, else trained there on
    ``spec`` (default: ``name``; default configs plus ``--model-config``/``--train-config`` overrides,
    ``--budget-min``, ``--threads``) when ``--train`` is given, else None (baselines only)."""
    if not args.checkpoints:
        return None
    return _checkpoint_scorer(spec or name, ds, args, Path(args.checkpoints) / name, json.loads(args.model_config or "{}"),
                              args.budget_min, "Transformer")


def _gru4rec(name, ds, args, spec: str | None = None):
    """The GRU4Rec-style baseline (``--gru``): ``DIR/<dataset>.gru4rec``, trained like ours with the
    :data:`GRU4REC` model, the dataset's :data:`GRU4REC_SETTINGS` (``--model-config``'s
    ``n_negatives``/``max_len``/``dropout`` over them) and ``--gru-budget-min``."""
    if not (args.checkpoints and args.gru):
        return None
    model, train = GRU4REC_SETTINGS.get(name, ({}, {}))
    keep = {k: v for k, v in json.loads(args.model_config or "{}").items() if k in ("n_negatives", "max_len", "dropout")}
    return _checkpoint_scorer(spec or name, ds, args, Path(args.checkpoints) / f"{name}.gru4rec", {**model, **keep, **GRU4REC},
                              args.gru_budget_min, "GRU4Rec", train)


def _discovery(scorer):
    """The same checkpoint scored as ``exclude_seen`` serves it (:class:`models.scorer.TransformerScorer`)."""
    from models.scorer import TransformerScorer

    return TransformerScorer(scorer.model, scorer.vocab, scorer.items, version=scorer.version, device="cpu",
                             metadata=scorer.metadata, exclude_seen=True)


def _training_row(name: str, scorer, ck_dir: Path) -> dict | None:
    """What the checkpoint says about its training run (time, memory, epochs, config)."""
    if scorer is None:
        return None
    meta, cfg = scorer.metadata, scorer.cfg
    tc = json.loads((ck_dir / "config.json").read_text()).get("train") or {}
    softmax = f"sampled softmax {cfg.n_negatives} neg" if cfg.n_negatives else "full softmax"
    config = (f"d={cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, len {cfg.max_len}, dropout {cfg.dropout}, "
              f"{cfg.backbone}, {cfg.objective}, {softmax}, features {'+'.join(cfg.features)}")
    extras = [name for name, on in (("item categories", cfg.item_categories), ("action prior", cfg.action_prior))
              if on]
    if extras:
        config += ", " + " + ".join(extras)
    if tc:
        length = f"budget {tc.get('budget_min')} min" if tc.get("budget_min") else f"{tc.get('epochs')} epochs"
        config += (f"; batch {tc.get('batch_size')}, lr {tc.get('lr')}, stride {tc.get('window_stride') or cfg.max_len}, "
                   f"validation history {tc.get('eval_protocol')}, {length}, {tc.get('num_threads')} thread(s)")
    copy = meta.get("copy") or {}
    if "weight" in copy:
        config += f"; copy x{copy['weight']:g} (valid NDCG@10 {copy['valid_ndcg10_before']} -> {copy['valid_ndcg10_after']})"
    cal = meta.get("action_calibration") or {}
    if "temperature" in cal:
        config += f"; action calibration T={cal['temperature']}"
    tr = meta.get("transitions") or {}
    if "weight" in tr:
        config += (f"; transitions {tr['feature']} x{tr['weight']:g} (valid NDCG@10 {tr['valid_ndcg10_before']} -> "
                   f"{tr['valid_ndcg10_after']})" if tr["weight"] else "; transitions off (no validation gain)")
    nb = meta.get("neighbours") or {}
    if "weight" in nb:
        config += (f"; neighbours of the last {nb['window']} x{nb['weight']:g} (valid NDCG@10 "
                   f"{nb['valid_ndcg10_before']} -> {nb['valid_ndcg10_after']})" if nb["weight"]
                   else "; neighbours off (no validation gain)")
    for key, label in (("categories", "category recency"), ("categories_unseen", "category recency, history excluded")):
        ct = meta.get(key) or {}
        if "weight" in ct:
            config += (f"; {label}: the last {ct['window']} x{ct['weight']:g} (valid NDCG@10 "
                       f"{ct['valid_ndcg10_before']} -> {ct['valid_ndcg10_after']})" if ct["weight"]
                       else f"; {label} off (no validation gain)")
    return {"dataset": name, "train_s": meta.get("train_seconds"), "peak_rss_mib": meta.get("peak_rss_mib"),
            "epochs": meta.get("epochs_run"), "best_epoch": meta.get("best_epoch"),
            "valid": (meta.get("valid") or {}).get("NDCG@10"), "device": meta.get("device", "cpu"),
            "config": config}


def _sampled100_possible(ds, cases) -> bool:
    """Whether every test case leaves 100 items the user never interacted with to sample from."""
    return all(len(ds.items) - len(set(c.history.items) | {c.target_item}) >= 100 for c in cases)


def run_dataset(entry: str, args) -> list[dict]:
    t0 = time.perf_counter()
    name, spec = label_and_spec(entry)
    ds, sp = load_split(spec, args.root)  # yoochoose: the session-rec split, else leave-one-out
    if spec == "yoochoose":
        cases, fit = sp.test, sp.train
        protos = [("session/allowed", "full", False)]
        baselines = ("popularity", "recent_items", "markov", "item_knn", "session_knn")
        metrics = ("HR@20", "MRR@20", "NDCG@10")
    else:
        cases, fit = sp.test, fit_sequences(sp, "test")
        protos = [("full/allowed", "full", False), ("full/masked", "full", True),
                  ("sampled100/allowed", "sampled100", False)]
        baselines = ITEM_BASELINES + (("last_action_markov", "majority_action") if ds.has_actions else ())
        metrics = ("HR@10", "NDCG@10")
    if args.max_cases and len(cases) > args.max_cases:
        cases = cases[: args.max_cases]
    if any(p[1] == "sampled100" for p in protos) and not _sampled100_possible(ds, cases):
        print(f"  {name}: sampled100 skipped (a test user has interacted with all but < 100 of "
              f"{len(ds.items):,} items)", file=sys.stderr)
        protos = [p for p in protos if p[1] != "sampled100"]
    scorers = {b: make_baseline(b, ds, fit) for b in baselines if b in args.baselines or not args.baselines}
    ours = _transformer(name, ds, sp, args, spec)
    if ours is not None:
        plain = {}
        if ours.model.uses_tables or ours.model.cfg.category_weight or ours.model.cfg.category_weight_unseen:
            # the ablation: the same checkpoint without its transition and neighbour tables and category term
            import dataclasses

            from models.scorer import TransformerScorer

            bare = TransformerScorer.from_checkpoint(Path(args.checkpoints) / name, ds, device="cpu")
            bare.model.cfg = dataclasses.replace(bare.model.cfg, transition_weight=0.0, neighbour_weight=0.0,
                                                 category_weight=0.0, category_weight_unseen=0.0)
            plain = {NO_TRANSITIONS: bare}
        scorers = {"ours": ours, **plain, **scorers}
    gru = _gru4rec(name, ds, args, spec)
    if gru is not None:
        scorers = {**{k: v for k, v in scorers.items() if k in ("ours", NO_TRANSITIONS)}, "gru4rec": gru,
                   **{k: v for k, v in scorers.items() if k not in ("ours", NO_TRANSITIONS)}}
    calibration = ("item/top1_ece", "item/top1_confidence", "item/top1_accuracy")
    rows = []
    info = _training_row(name, ours, Path(args.checkpoints or ".") / name)
    if info is not None:
        rows.append({"training": info})
    info = _training_row(f"{name} (gru4rec)", gru, Path(args.checkpoints or ".") / f"{name}.gru4rec")
    if info is not None:
        rows.append({"training": info})
    for key, protocol, masked in protos:
        first = key == protos[0][0]  # calibration does not depend on the protocol: measured once
        # history masked: our checkpoints rank as a discovery feed serves (exclude_seen: the category
        # term at the weight fitted for that ranking); the others are the same scorers
        run = {n: _discovery(s) if masked and n in ("ours", NO_TRANSITIONS) else s for n, s in scorers.items()}
        res = {n: evaluate(s, ds, cases, protocol=protocol, mask_history=masked, seed=0, beyond_accuracy=False,
                           calibration=first, return_ranks=True) for n, s in run.items()}
        extra = ("action/log_loss", "purchase_session_auc") if key == "full/allowed" and ds.has_actions else ()
        extra += (calibration + (("action/ece",) if ds.has_actions else ())) if first else ()
        for m in metrics + extra:
            pub = PUBLISHED.get((name, key), {}).get(m)
            rows.append({"dataset": name, "protocol": key, "metric": m, "n": len(cases),
                         "values": {n: r.get(m) for n, r in res.items()},
                         "published": f"{pub[0]:.4f} ({pub[1]})" if pub else ""})
        if "ours" in res:  # case by case: is the difference to each other scorer more than chance?
            raw = {n: paired_sign_test(res["ours"]["ranks"], r["ranks"]) for n, r in res.items() if n != "ours"}
            paired = {n: "{}/{} p={:.2g}".format(*t) for n, t in raw.items()}
            rows.append({"dataset": name, "protocol": key, "metric": PAIRED, "n": len(cases), "values": paired,
                         "published": "", "raw": raw})
        print(f"  {name} {key}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return rows


#: The action bars: ours must have a lower action log loss than these.
ACTION_BASELINES = ("last_action_markov", "majority_action")
#: Significance of the sign test for a bar.
ALPHA = 0.05


def bars(rows: list[dict]) -> list[str]:
    """The bars (issue 17): per dataset and protocol, is ours better than every baseline case by case
    (NDCG@10 sign test, p < :data:`ALPHA`; the ablation column is not a baseline), and on action log
    loss lower than each of :data:`ACTION_BASELINES`? One line per dataset and protocol.

    >>> rows = [{"dataset": "d", "protocol": "full/allowed", "metric": PAIRED,
    ...          "raw": {"markov": (30, 5, 1e-5), "gru4rec": (20, 18, 0.87), NO_TRANSITIONS: (1, 2, 1.0)}},
    ...         {"dataset": "d", "protocol": "full/allowed", "metric": "action/log_loss",
    ...          "values": {"ours": 0.5, "last_action_markov": 0.6, "majority_action": 0.7}}]
    >>> bars(rows)[-1]
    '| d | full/allowed | not met: gru4rec 20/18 p=0.87 | met (0.5000 vs 0.6000 / 0.7000) |'
    """
    out = [f"Bars: ours better than every baseline case by case (NDCG@10, two-sided sign test p < {ALPHA}); action log "
           "loss below " + " and ".join(ACTION_BASELINES) + ":", "",
           "| dataset | protocol | ranking bar | action bar |", "|---|---|---|---|"]
    loss = {(r["dataset"], r["protocol"]): r["values"] for r in rows if r.get("metric") == "action/log_loss"}
    for r in rows:
        if r.get("metric") != PAIRED or "raw" not in r:
            continue
        short = [f"{n} {w}/{lo} p={p:.2g}" for n, (w, lo, p) in r["raw"].items()
                 if n != NO_TRANSITIONS and not (w > lo and p < ALPHA)]
        rank = "met" if not short else "not met: " + ", ".join(short)
        v = loss.get((r["dataset"], r["protocol"]))
        action = ""
        ref = [v[b] for b in ACTION_BASELINES if isinstance(v.get(b), float)] if v else []
        if ref and isinstance(v.get("ours"), float):  # (--baselines may have left both action baselines out)
            action = (("met" if all(v["ours"] < x for x in ref) else "not met")
                      + f" ({v['ours']:.4f} vs " + " / ".join(f"{x:.4f}" for x in ref) + ")")
        out.append(f"| {r['dataset']} | {r['protocol']} | {rank} | {action} |")
    return out


def render(rows: list[dict], seconds: float) -> str:
    training = [r["training"] for r in rows if "training" in r]
    rows = [r for r in rows if "training" not in r]
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r["values"] if c not in cols and c != "ours"]
    out = ["## Quality", "",
           "Leave-one-out test split (users with >= 3 events; YOOCHOOSE: session-rec next-click on the test "
           "file), full ranking over all items with history items allowed / masked, and 100 sampled "
           "negatives as an extra. Ties broken by popularity. Baselines fitted on train + history. "
           "Calibration rows (first protocol only): `item/top1_ece` is the expected calibration error (15 "
           "equal-width bins) of the probability a scorer gives its top-1 item, `item/top1_confidence` that "
           "probability's mean and `item/top1_accuracy` how often the top-1 item is the next one (blank: not a "
           f"probability model); `action/ece` the same for the top action. Produced by `benchmarks/quality.py` "
           f"in {seconds:.0f} s.", "",
           f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine('cpu')}",
           f"- command: `{command_line()}`", "",
           "| dataset | protocol | metric | cases | ours | " + " | ".join(cols) + " | published |",
           "|---|---|---|---:|---:|" + "---:|" * len(cols) + "---|"]
    for r in rows:
        v = r["values"]
        cell = [f"{v[c]:.4f}" if isinstance(v.get(c), float) else v[c] if isinstance(v.get(c), str) else ""
                for c in cols]
        ours = f"{v['ours']:.4f}" if isinstance(v.get("ours"), float) else "—"
        out.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} | {r['n']} | {ours} | "
                   + " | ".join(cell) + f" | {r['published']} |")
    out += ["", *bars(rows)]
    if training:
        out += ["", "Transformer training runs (CPU, fp32; time = wall clock of `train` including validation; "
                "peak memory = max RSS of the training process):", "",
                "| dataset | train s | peak RSS MiB | epochs | best epoch | valid NDCG@10 | config |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for t in training:
            out.append(f"| {t['dataset']} | {t['train_s']} | {t['peak_rss_mib']} | {t['epochs']} | {t['best_epoch']} | "
                       + (f"{t['valid']:.4f}" if isinstance(t["valid"], float) else "") + f" | {t['config']} |")
    out += ["", "Independent cross-check of the evaluator (full, history allowed; HR@10 / NDCG@10): "
            + "; ".join(f"{d} {b} {h:.4f}/{n:.4f}" for (d, b), (h, n) in CROSSCHECK.items())
            + " — reproduced by `tests/unit/models/test_baselines.py::test_crosscheck`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    ap.add_argument("--baselines", nargs="*", default=[], help="subset of baselines (default: all relevant)")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N test cases")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="folder with one Transformer checkpoint per dataset (DIR/<dataset>)")
    ap.add_argument("--train", action="store_true",
                    help="train missing checkpoints with the defaults (models.auto), as `nextaction train` does")
    ap.add_argument("--budget-min", type=float, default=10.0, help="training budget per dataset (minutes)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU intra-op threads for training (0 = torch's default, as `nextaction train`)")
    ap.add_argument("--model-config", default="{}",
                    help="JSON ModelConfig settings (default: none; every choice is models.auto's, as for "
                         "`nextaction train`)")
    ap.add_argument("--train-config", default=None, help="JSON TrainConfig overrides, e.g. '{\"lr\": 0.002}'")
    ap.add_argument("--gru", action="store_true",
                    help="add the GRU4Rec-style baseline (DIR/<dataset>.gru4rec; trained when missing with --train)")
    ap.add_argument("--gru-budget-min", type=float, default=5.0, help="its training budget per dataset (minutes)")
    ap.add_argument("--no-write", "--dry-run", dest="no_write", action="store_true",
                    help="print the table, do not write RESULTS.md")
    args = ap.parse_args(argv)
    if any(":" not in label_and_spec(n)[1] for n in args.datasets) and not datasets_root(args.root).is_dir():  # a named dataset
        print(f"datasets not found at {datasets_root(args.root)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = []
    for name in args.datasets:
        rows += run_dataset(name, args)
    publish(SECTION, render(rows, time.perf_counter() - t0), write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
