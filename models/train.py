"""Offline training: ``train(ds, model_cfg, train_cfg, out_dir) -> (checkpoint_path, history)``.

* Examples: every training sequence (:func:`training_sequences`: on leave-one-out splits all events
  but the test target, except for the validation users) is cut into windows of up to ``max_len + 1``
  events with :func:`models.encoding.encode` (``max_len`` inputs, each predicting its successor);
  long histories give several windows (``window_stride``). All windows are encoded and padded once
  (:func:`pack_examples`); a batch is a row slice of windows of similar length, padded only to its
  own longest window.
* AdamW (no weight decay on embeddings, biases, norms), linear warm-up then cosine/linear decay
  (fitted to the time budget after the first epoch), gradient clipping, seeded; bf16 autocast on
  CUDA, fp32 on CPU.
* Validation NDCG@10 (full ranking, :func:`models.evaluate.evaluate`) every ``eval_every`` epochs,
  early stopping with ``patience``; the best epoch is checkpointed (atomically) to ``out_dir``. A
  plateau while the lr is still >= :data:`ANNEAL_BELOW` of its peak first decays the lr to 0 over
  ``patience`` more epochs, then stops if that did not help (why: benchmarks/RESULTS.md,
  "Transformer training", session 4, Beauty recipe). It is no plateau while the training loss is
  still falling steeply (:func:`still_learning`): validation then waits.
* ``objective='masked_then_causal'``: BERT4Rec-style masked pretraining first, then causal.
* After training, on the best checkpoint: action calibration (:func:`calibrate_actions`), the
  item-transition table (:func:`fit_transitions`), the copy strength (:func:`fit_copy`), the item
  temperature (:func:`calibrate_items`) and, with ``eval_test``, the test metrics, all saved in the
  checkpoint's metadata. Which settings suit a log: :mod:`models.auto`.

>>> import tempfile
>>> from models.checkpoint import load_checkpoint
>>> from models.datasets import synthetic
>>> ds = synthetic(n_users=30, n_items=40, seed=1)
>>> with tempfile.TemporaryDirectory() as out:
...     path, history = train(ds, ModelConfig(d_model=16, max_len=8, n_hash_buckets=8),
...                           TrainConfig(epochs=2, progress=False, device="cpu"), out)
...     ck = load_checkpoint(path)
>>> [h["phase"] for h in history], sorted(history[0]["valid"])
(['causal', 'causal', 'test'], ['HR@10', 'NDCG@10'])
>>> ck.model.cfg.n_items == len(ds.items) + 2 + 8, sorted(k for k in ck.metadata if k in ("test", "transitions"))
(True, ['test', 'transitions'])
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig, TrainConfig
from models.devices import resolve_device
from models.encoding import ItemVocab, encode
from models.evaluate import evaluate
from models.schema import EventSeq


def model_config_for(ds, base: ModelConfig | None = None, **overrides) -> tuple[ModelConfig, ItemVocab]:
    """A model config fitted to ``ds``: vocabulary size from its items; time features and the time
    head off when the dataset has no real timestamps; the action feature/head off without actions."""
    base_kw = base.to_dict() if base is not None else {}
    base_kw.update(overrides)
    n_hash = int(base_kw.get("n_hash_buckets", ModelConfig.__dataclass_fields__["n_hash_buckets"].default))
    vocab = ItemVocab(ds.items, n_hash_buckets=n_hash)
    feats = list(base_kw.get("features", ModelConfig.__dataclass_fields__["features"].default))
    if not ds.has_time:
        feats = [f for f in feats if f not in ("gap", "hour", "dow")]
        base_kw["gap_head"] = False
    if not ds.has_actions:
        feats = [f for f in feats if f != "action"]
        base_kw["action_head"] = False
    base_kw["features"] = tuple(feats)
    base_kw["n_items"] = len(vocab)
    return ModelConfig.from_dict(base_kw), vocab


def training_windows(seq: EventSeq, max_len: int, stride: int) -> list[EventSeq]:
    """Windows of up to ``max_len + 1`` events ending at the sequence end, then every ``stride``
    events earlier (``stride == 0``: the last window only). Windows with < 2 events are dropped.

    >>> s = EventSeq.from_columns(list("abcdefg"), [0] * 7, range(7))
    >>> [w.items for w in training_windows(s, 3, 3)]  # encode keeps the last 4 of each
    [['a', 'b', 'c', 'd', 'e', 'f', 'g'], ['a', 'b', 'c', 'd']]
    """
    n = len(seq)
    ends = [n] if stride <= 0 else list(range(n, 1, -stride))
    return [seq[:e] for e in ends if e >= 2] or ([seq] if n else [])


def build_examples(train: dict[str, EventSeq], vocab: ItemVocab, cfg: ModelConfig, stride: int
                   ) -> list[dict[str, np.ndarray]]:
    """Encoded training windows (``encode(prefix, max_len=cfg.max_len + 1)``)."""
    out = []
    for seq in train.values():
        if len(seq) < 2:
            continue
        for w in training_windows(seq, cfg.max_len, stride):
            if len(w) >= 2:
                out.append(encode(w, vocab, cfg, max_len=cfg.max_len + 1))
    return out


def holdout_validation(split, n: int, seed: int):
    """A split with validation cases for early stopping when it has none (e.g. session splits):
    ``n`` seeded training sequences (>= 2 events) leave training, each becoming one case that
    predicts its last event from the rest.

    >>> from models.datasets.core import Split
    >>> s = EventSeq.from_columns(list("abc"), [0] * 3, range(3))
    >>> sp = holdout_validation(Split({"u": s, "v": s[:1]}, [], []), 5, 0)
    >>> sorted(sp.train), [(c.user, c.history.items, c.target_item) for c in sp.valid]
    (['v'], [('u', ['a', 'b'], 'c')])
    """
    import dataclasses

    from models.datasets.core import Case

    users = [u for u, q in split.train.items() if len(q) >= 2]
    pick = set(np.random.default_rng(seed).permutation(len(users))[:n].tolist())
    held = [users[i] for i in sorted(pick)]
    valid = [Case(u, split.train[u][:-1], split.train[u].items[-1], int(split.train[u].actions[-1]),
                  int(split.train[u].ts[-1])) for u in held]
    held_set = set(held)
    train = {u: q for u, q in split.train.items() if u not in held_set}
    return dataclasses.replace(split, train=train, valid=valid,
                               meta={**split.meta, "valid": f"{len(valid)} held-out training sequences"})


def training_sequences(split, validated_users: set[str]) -> dict[str, EventSeq]:
    """What the model trains on. Leave-one-out splits: every user's test history (all events but
    the test target, the same information the baselines are fitted on) except for the users whose
    validation case is scored for early stopping, who keep the train part only (their validation
    target stays unseen). Other splits (e.g. session splits, whose test histories hold other cases'
    targets): ``split.train`` unchanged.

    >>> from models.datasets.core import Case, Split
    >>> s = EventSeq.from_columns(list("abcd"), [0] * 4, range(4))
    >>> sp = Split({"u": s[:2], "v": s[:2]}, [Case("u", s[:2], "c", 0, 2), Case("v", s[:2], "c", 0, 2)],
    ...            [Case("u", s[:3], "d", 0, 3), Case("v", s[:3], "d", 0, 3)], {"protocol": "leave_one_out"})
    >>> {u: q.items for u, q in training_sequences(sp, {"v"}).items()}
    {'u': ['a', 'b', 'c'], 'v': ['a', 'b']}
    """
    if split.meta.get("protocol") != "leave_one_out":
        return split.train
    out = dict(split.train)
    for c in split.test:
        if c.user not in validated_users:
            out[c.user] = c.history
    return out


def pack_examples(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Right-pad all encoded windows once into ``{feature: [n, T_max]}`` arrays plus ``lengths``
    (what :func:`models.encoding.collate` would build, for every window at once), so a training
    batch is a row slice instead of per-sequence Python work."""
    n = len(examples)
    lengths = np.fromiter((len(e["item"]) for e in examples), np.int64, n)
    T = int(lengths.max(initial=0))
    keys = [k for k in examples[0] if k != "lengths"] if examples else []
    packed: dict[str, np.ndarray] = {}
    for k in keys:
        flat = np.concatenate([e[k] for e in examples])
        arr = np.zeros((n, T), flat.dtype)
        arr[np.arange(T)[None, :] < lengths[:, None]] = flat  # row-major fill = left-aligned rows
        packed[k] = arr
    packed["lengths"] = lengths
    return packed


def packed_batch(packed: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """The batch of windows ``rows``, padded only to its own longest window (== ``collate``)."""
    import torch

    lengths = packed["lengths"][rows]
    T = int(lengths.max())
    out = {k: torch.from_numpy(np.ascontiguousarray(v[rows, :T])) for k, v in packed.items() if k != "lengths"}
    out["lengths"] = torch.from_numpy(lengths)
    return out


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: int = 50):
    """Shuffled batches of similar length: shuffle, sort chunks of ``bucket`` batches by length
    (so a batch pays for its own longest window, not ``max_len``), shuffle the batches."""
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    chunk = batch_size * bucket
    groups = []
    for s in range(0, len(order), chunk):
        part = order[s: s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        groups += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(groups)
    return groups


def evaluate_cases(scorer, ds, cases, mask_history: bool) -> dict:
    """The validation / test metrics of ``scorer`` on ``cases``: :func:`models.evaluate.evaluate`, full ranking."""
    return evaluate(scorer, ds, cases, protocol="full", mask_history=mask_history)


#: Share of ``budget_min`` kept for the fits after the last epoch (measured: 20-38 s of a 10-minute budget
#: on the shipped datasets, 2-6 %, before the neighbour table; its fit adds 4-40 s: up to ~13 %;
#: benchmarks/RESULTS.md, "Quality").
AFTER_TRAINING_SHARE = 0.14

#: Early stopping on a plateau first anneals (see ``train``) unless the lr is already below this
#: fraction of its peak.
ANNEAL_BELOW = 0.25
#: A training loss that fell by more than this share over the patience window is still learning: a
#: validation plateau then is the noisy early phase, not convergence (benchmarks/RESULTS.md, "Category
#: recency": Taobao's validation dipped for 5 epochs while its loss fell 58 %; the plateaus of the
#: shipped logs' defaults runs came after a 0.3-1.4 % fall).
STILL_LEARNING = 0.10


def still_learning(losses, window: int, share: float | None = None) -> bool:
    """Whether the training loss fell by more than ``share`` (default :data:`STILL_LEARNING`) over
    the last ``window`` epochs (``losses``: one mean training loss per epoch, oldest first).

    >>> still_learning([20.7, 16.5, 13.5, 11.4, 9.9, 8.7], 5), still_learning([5.29, 5.28, 5.27, 5.27, 5.26, 5.26], 5)
    (True, False)
    >>> still_learning([3.0, 2.0], 5)  # fewer epochs than the window: from the first
    True
    """
    share = STILL_LEARNING if share is None else share
    losses = [float(x) for x in losses]
    if len(losses) < 2:
        return False
    before = losses[max(len(losses) - 1 - window, 0)]
    return before > 0 and (before - losses[-1]) / before > share


def _lr_lambda(state: dict):
    """The lr multiplier per step: linear warm-up, then cosine/linear decay to 0 at ``total``; after
    a ``restart = (step, fraction)`` the decay runs from ``fraction`` at that step to 0 at ``total``.

    >>> f = _lr_lambda({"warmup": 2, "total": 10, "schedule": "cosine"})
    >>> [round(f(s), 2) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    >>> st = {"warmup": 2, "total": 10, "schedule": "cosine"}; g = _lr_lambda(st)
    >>> st.update(total=8, restart=(4, 0.8)); [round(g(s), 2) for s in (4, 6, 8)]
    [0.8, 0.4, 0.0]
    """
    def f(step: int) -> float:
        warm, total, kind = state["warmup"], max(state["total"], 1), state["schedule"]
        start, base = state.get("restart", (warm, 1.0))
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        p = min((step - start) / max(total - start, 1), 1.0)
        return base * (0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p)
    return f


def item_category_buckets(ds, vocab: ItemVocab, n_buckets: int) -> np.ndarray:
    """Each vocabulary index's category bucket (``1 + stable_hash(category) % n_buckets``; 0 = none):
    the category an item is most often logged with in ``ds`` (catalogue metadata, like the item ids).

    >>> from models.datasets.core import dataset_from_columns
    >>> ds = dataset_from_columns("t", ["u"] * 3, ["a", "b", "a"], [0, 1, 2], categories=["x", "", "x"])
    >>> b = item_category_buckets(ds, ItemVocab(["a", "b"], n_hash_buckets=2), 8)
    >>> b[:4].tolist(), bool(b[4] > 0), int(b[5])
    ([0, 0, 0, 0], True, 0)
    """
    from collections import Counter

    from models.encoding import stable_hash

    seen: dict[str, Counter] = {}
    for seq in ds.sequences.values():
        for item, cat in zip(seq.items, seq.categories):
            if cat:
                seen.setdefault(item, Counter())[cat] += 1
    out = np.zeros(len(vocab), np.int64)
    for item, cnt in seen.items():
        k = vocab.index(item)
        if k >= vocab.first_item:  # a known item (unknown ids map to hash buckets below first_item)
            out[k] = 1 + stable_hash(cnt.most_common(1)[0][0]) % n_buckets
    return out


def validation_and_training(split, train_cfg: TrainConfig):
    """``(split, validation cases, training sequences)`` as :func:`train` uses them: a held-out
    validation part for splits without one, ``max_eval_users`` seeded validation cases, and what
    the model trains on (:func:`training_sequences`)."""
    if not split.valid:
        split = holdout_validation(split, train_cfg.max_eval_users or 1000, train_cfg.seed)
    valid = list(split.valid)
    if train_cfg.max_eval_users and len(valid) > train_cfg.max_eval_users:
        pick = np.sort(np.random.default_rng(train_cfg.seed).choice(len(valid), train_cfg.max_eval_users, False))
        valid = [valid[i] for i in pick]
    train_seqs = training_sequences(split, {c.user for c in valid}) if train_cfg.fit_unvalidated else split.train
    return split, valid, train_seqs


def refit_transitions(ds, checkpoint: str | Path, *, split=None, device: str = "cpu") -> dict[str, Any]:
    """Count and fit the transition and neighbour tables of an already trained checkpoint
    (:func:`fit_transitions`, :func:`fit_neighbours`) on ``ds`` with the validation cases its training
    used (its saved train config), refit the item temperature with them
    (:func:`fit_table_and_temperature`), and save it in place: what training fits after its epochs
    (the copy strength excepted). For checkpoints trained before the tables existed, or to refresh
    them on new data. Returns the ``transitions`` and ``neighbours`` fits."""
    from models.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, device=device)
    tcfg = ck.train_config or TrainConfig()
    if split is None:
        from models.datasets import leave_one_out

        split = leave_one_out(ds)
    split, valid, train_seqs = validation_and_training(split, tcfg)
    fitted = fit_table_and_temperature(ck, ds, valid, train_seqs, training_sequences(split, set()),
                                       tcfg.eval_protocol == "masked", device, tcfg.calibrate_items)
    _update_metadata(Path(checkpoint), ck, fitted, tcfg)
    return {k: fitted[k] for k in ("transitions", "neighbours", "categories", "categories_unseen") if k in fitted}


def fit_table_and_temperature(ck, ds, valid, fit_seqs: dict[str, EventSeq], final_seqs: dict[str, EventSeq],
                              mask_history: bool, device: str, calibrate: bool = True) -> dict[str, Any]:
    """The item-transition table (:func:`fit_transitions`), the item-neighbour table
    (:func:`fit_neighbours`), the category-recency term (:func:`fit_category_recency`, for the served
    ranking and for ``exclude_seen``) and then the item temperature (:func:`calibrate_items`) of the
    loaded checkpoint ``ck``, all fitted on the validation cases ``valid`` with the tables counted on
    ``fit_seqs`` (what the model trained on: the validation targets unseen; a table holding them makes
    the temperature too sharp). Then the tables are re-counted on ``final_seqs`` (every event but the
    test targets) and installed. Returns the metadata entries (``transitions``, ``neighbours``,
    ``categories``, ``categories_unseen``, ``item_calibration``); the caller saves. The fits start from
    the model without tables: a checkpoint refitted after training serves tables counted on the
    validation targets too."""
    import dataclasses

    out: dict[str, Any] = {}
    ck.model.cfg = dataclasses.replace(ck.model.cfg, transition_weight=0.0, neighbour_weight=0.0, category_weight=0.0,
                                       category_weight_unseen=0.0)
    ck.model.set_transitions(None)
    ck.model.set_neighbours(None)
    if ck.model.cfg.transition_top > 0:
        out["transitions"] = fit_transitions(ck, ds, valid, fit_seqs, fit_seqs, mask_history, device)
    if ck.model.cfg.neighbour_top > 0:  # on top of the table
        out["neighbours"] = fit_neighbours(ck, ds, valid, fit_seqs, mask_history, device)
    if ck.model.cfg.item_categories and ck.model.cfg.category_recency:  # on top of both tables
        out["categories"] = fit_category_recency(ck, ds, valid, mask_history, device)
        if not mask_history:  # the weight served when the history's items are excluded (exclude_seen)
            got = out["categories"]
            kw = {"windows": (ck.model.cfg.category_window,)} if got.get("weight") else {}
            out["categories_unseen"] = fit_category_recency(ck, ds, valid, True, device, unseen=True, **kw)
        else:  # validated with history masked: the fit was the discovery feed's already
            ck.model.cfg = dataclasses.replace(ck.model.cfg, category_weight_unseen=ck.model.cfg.category_weight)
            out["categories_unseen"] = {**out["categories"], "same_as": "categories (history-masked validation)"}
    if calibrate:  # on the final scores (copy strength and tables included)
        out["item_calibration"] = calibrate_items(ck, ds, valid, device)
    if ck.model.uses_transitions:
        final = transition_table(ck, final_seqs)
        ck.model.set_transitions(final.with_feature(ck.model.cfg.transition_feature))
        out["transitions"]["nnz"] = final.nnz
    if ck.model.uses_neighbours:
        final = neighbour_table(ck, final_seqs)
        ck.model.set_neighbours(final)
        out["neighbours"]["nnz"] = final.nnz
    return out


def train(ds, model_cfg: ModelConfig | None, train_cfg: TrainConfig, out_dir: str | Path, *, split=None,
          eval_test: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """Train on ``ds`` (leave-one-out split unless ``split`` is given) and checkpoint the best
    validation epoch to ``out_dir``. Returns ``(checkpoint_path, history)`` where ``history`` has
    one dict per epoch (phase, loss, seconds, sequences/s, validation metrics)."""
    import torch
    from tqdm.auto import tqdm

    from models.averaging import WeightAverage
    from models.checkpoint import save_checkpoint
    from models.model import NextActionModel
    from models.progress import progress
    from models.scorer import TransformerScorer

    t_start = time.perf_counter()
    # the epochs get the budget less what the fits after training take (copy strength, table, calibration)
    budget_s = train_cfg.budget_min * 60.0 * (1.0 - AFTER_TRAINING_SHARE) if train_cfg.budget_min > 0 else float("inf")
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)
    device = torch.device(resolve_device(train_cfg.device))
    cuda = device.type == "cuda"
    if split is None:
        from models.datasets import leave_one_out

        split = leave_one_out(ds)
    cfg, vocab = model_config_for(ds, model_cfg)
    stride = train_cfg.window_stride or cfg.max_len
    split, valid, train_seqs = validation_and_training(split, train_cfg)
    examples = build_examples(train_seqs, vocab, cfg, stride)
    packed = pack_examples(examples) if examples else {}
    if not examples:
        from models.errors import DatasetError

        raise DatasetError(f"{ds.name}: no training sequence has 2 or more events")
    mask_history = train_cfg.eval_protocol == "masked"

    model = NextActionModel(cfg)
    if cfg.item_categories:
        model.set_item_categories(item_category_buckets(ds, vocab, cfg.n_category_buckets))
    counts = np.zeros(cfg.n_items, np.float64)
    for seq in train_seqs.values():
        np.add.at(counts, vocab.indices(seq.items), 1.0)
    model.init_item_bias(counts)  # start from the popularity prior
    cold = np.flatnonzero(counts[vocab.first_item:] == 0)  # known items no training sequence holds
    model.set_untrained_items(cold + vocab.first_item, [vocab.bucket(vocab.items[k]) for k in cold])
    trained = np.flatnonzero(counts[vocab.first_item:] > 0) + vocab.first_item

    def fill_unknown_rows() -> None:  # before each save: bucket rows training never touched
        if cfg.unknown_item_rate == 0:
            model.set_unknown_item_rows(trained)
    model = model.to(device)
    scorer = TransformerScorer(model, vocab, ds.items, version="training", device=str(device))
    out_dir = Path(out_dir)
    history: list[dict[str, Any]] = []
    best = {"metric": -1.0, "epoch": -1, "metrics": {}}
    steps_per_epoch = math.ceil(len(examples) / train_cfg.batch_size)

    phases: list[tuple[str, int]] = []
    if cfg.objective == "masked_then_causal":
        pre = train_cfg.pretrain_epochs or max(1, train_cfg.epochs // 4)
        phases.append(("masked", pre))
    phases.append(("causal", train_cfg.epochs))

    epoch_global = 0
    stop_all = False
    for phase, n_epochs in phases:
        decay, no_decay = [], []
        for n, p in model.named_parameters():  # no decay on embeddings, biases and norms (SASRec+ recipe)
            (decay if p.dim() >= 2 and "emb" not in n.split(".")[0] else no_decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg.lr, betas=(0.9, 0.98),
                                fused=cuda or None, foreach=None if cuda else True)
        sched_state = {"warmup": min(train_cfg.warmup_steps, steps_per_epoch),  # warm-up: at most one epoch
                       "total": n_epochs * steps_per_epoch, "schedule": train_cfg.schedule}
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(sched_state))
        avg = WeightAverage(model, train_cfg.ema_epochs * steps_per_epoch) if train_cfg.ema_epochs > 0 else None
        averaged = avg.swapped_in if avg is not None else (lambda _m: contextlib.nullcontext())
        phase_budget = budget_s * (0.25 if phase == "masked" and len(phases) > 1 else 1.0)
        t_phase = time.perf_counter()
        bad_evals = 0
        annealing = False  # the schedule was shortened to decay now (plateau while the lr was still high)
        for ep in range(n_epochs):
            model.train()
            t0 = time.perf_counter()
            groups = _batches(packed["lengths"], train_cfg.batch_size, rng)
            bar = progress(groups, desc=f"{phase} epoch {ep + 1}", leave=False, enabled=train_cfg.progress)
            tot, n_seq, n_tok = 0.0, 0, 0
            out_of_time = False
            for g in bar:
                batch = {k: v.to(device, non_blocking=True) for k, v in packed_batch(packed, g).items()}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    out, loss = model(batch, objective=phase)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if train_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                opt.step()
                sched.step()
                if avg is not None:
                    avg.update(model)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise FloatingPointError(f"loss became {lv} at {phase} epoch {ep + 1}")
                tot += lv * len(g)
                n_seq += len(g)
                n_tok += int(out["n_targets"])
                bar.set_postfix(loss=f"{tot / n_seq:.4f}", best_ndcg10=f"{max(best['metric'], 0):.4f}")
                if time.perf_counter() - t_phase > phase_budget or time.perf_counter() - t_start > budget_s:
                    out_of_time = True
                    break
            bar.close()
            dt = time.perf_counter() - t0
            epoch_global += 1
            rec: dict[str, Any] = {"epoch": epoch_global, "phase": phase, "loss": tot / max(n_seq, 1),
                                   "train_s": round(dt, 2), "seq_per_s": round(n_seq / max(dt, 1e-9), 1),
                                   "targets_per_s": round(n_tok / max(dt, 1e-9), 1), "lr": sched.get_last_lr()[0]}
            if phase == "causal" and ((ep + 1) % train_cfg.eval_every == 0 or out_of_time or ep + 1 == n_epochs):
                model.eval()
                scorer._cache = None
                te = time.perf_counter()
                with averaged(model):  # validate and save the averaged weights (TrainConfig.ema_epochs)
                    m = evaluate_cases(scorer, ds, valid, mask_history)
                    rec["eval_s"] = round(time.perf_counter() - te, 2)
                    rec["valid"] = {k: m[k] for k in ("NDCG@10", "HR@10") if k in m}
                    score = float(m["NDCG@10"])
                    if score > best["metric"]:
                        best = {"metric": score, "epoch": epoch_global, "metrics": rec["valid"]}
                        bad_evals = 0
                        fill_unknown_rows()
                        save_checkpoint(out_dir, model, vocab, train_cfg, {
                            "dataset": ds.name, "epoch": epoch_global, "valid": rec["valid"],
                            "valid_protocol": f"full, history {train_cfg.eval_protocol}", "device": str(device),
                            "n_train_examples": len(examples)})
                    else:
                        bad_evals += 1
            history.append(rec)
            if train_cfg.progress:
                tqdm.write(_fmt(rec))
            if math.isfinite(phase_budget) and not annealing:  # re-fit the decay to what the budget allows
                elapsed = time.perf_counter() - t_phase
                per_epoch = elapsed / (ep + 1)
                left = int(max(phase_budget - elapsed, 0.0) // per_epoch)
                sched_state["total"] = min(n_epochs, ep + 1 + max(left, 1)) * steps_per_epoch
            if out_of_time or time.perf_counter() - t_start > budget_s:
                stop_all = phase == "causal" or time.perf_counter() - t_start > budget_s
                break
            if annealing and sched.get_last_lr()[0] <= 0.0:  # the shortened decay is over
                break
            if phase == "causal" and bad_evals >= train_cfg.patience and not annealing and still_learning(
                    [h["loss"] for h in history if h.get("phase") == phase and "loss" in h], train_cfg.patience):
                rec["plateau_wait"] = True  # the loss still falls steeply: not a plateau yet
            elif phase == "causal" and bad_evals >= train_cfg.patience:
                lr_frac = sched.get_last_lr()[0] / train_cfg.lr
                if annealing or train_cfg.schedule == "constant" or lr_frac < ANNEAL_BELOW:
                    break
                # a plateau while the lr is still high is where a decaying schedule has not paid off
                # yet: decay from here to 0 over the next `patience` epochs, then stop if that did not help
                step = (ep + 1) * steps_per_epoch
                sched_state["total"] = step + train_cfg.patience * steps_per_epoch
                sched_state["restart"] = (step, lr_frac)
                annealing, bad_evals = True, 0
                rec["anneal_from_lr"] = sched.get_last_lr()[0]
        if stop_all:
            break
    if best["epoch"] < 0:  # no causal evaluation happened (tiny budget): save what we have
        with averaged(model):
            fill_unknown_rows()
            save_checkpoint(out_dir, model, vocab, train_cfg, {"dataset": ds.name, "epoch": epoch_global})
    meta_extra = {"best_epoch": best["epoch"], "train_seconds": round(time.perf_counter() - t_start, 1),
                  "epochs_run": sum(1 for h in history if "loss" in h), "peak_rss_mib": _peak_rss_mib(),
                  "history": history}
    if best["epoch"] >= 0:  # the best epoch's checkpoint: calibrate, test, then save it once more
        from models.checkpoint import load_checkpoint

        ck = load_checkpoint(out_dir, device=str(device))
        t_fit = time.perf_counter()
        if train_cfg.calibrate_actions:
            meta_extra["action_calibration"] = calibrate_actions(ck, ds, valid, str(device))
            if train_cfg.progress:
                tqdm.write(f"action calibration: {meta_extra['action_calibration']}")
        if cfg.repeat_head:  # before the table: the table fitted last is counted on the validation targets too
            meta_extra["copy"] = fit_copy(ck, ds, valid, mask_history, str(device))
            if train_cfg.progress:
                tqdm.write(f"copy strength: { {k: v for k, v in meta_extra['copy'].items() if k != 'tried'} }")
        fitted = fit_table_and_temperature(ck, ds, valid, train_seqs, training_sequences(split, set()), mask_history,
                                           str(device), train_cfg.calibrate_items)
        meta_extra.update(fitted)
        if train_cfg.progress:
            for k, v in fitted.items():
                tqdm.write(f"{k}: {v}")
        meta_extra["fit_after_training_s"] = round(time.perf_counter() - t_fit, 1)
        if eval_test and split.test:
            s2 = TransformerScorer(ck.model, ck.vocab, ds.items, version=ck.version, device=str(device))
            res = evaluate_cases(s2, ds, list(split.test), mask_history)
            meta_extra["test"] = {k: v for k, v in res.items() if isinstance(v, (int, float))}
            meta_extra["test_protocol"] = f"full, history {train_cfg.eval_protocol}"
            history.append({"phase": "test", "test": {k: meta_extra["test"].get(k) for k in ("NDCG@10", "HR@10")}})
        _update_metadata(out_dir, ck, meta_extra, train_cfg)
    return out_dir, history


def calibrate_actions(ck, ds, cases, device: str = "cpu", min_cases: int = 50) -> dict[str, Any]:
    """Fit the action calibration of the loaded checkpoint ``ck`` on ``cases`` (validation) and set
    it on ``ck.model.cfg`` (the caller saves the checkpoint).

    Returns what was done: the fitted ``temperature`` and ``bias`` with the validation log loss
    before and after, or ``{"skipped": reason}`` (no action head, too few cases, a single class).
    """
    import dataclasses

    from models.calibration import apply_action_calibration, fit_action_calibration, log_loss
    from models.scorer import TransformerScorer

    if ck.model.action_head is None:
        return {"skipped": "model has no action head"}
    y = np.array([c.target_action for c in cases], dtype=np.int64)
    if len(y) < min_cases or len(np.unique(y)) < 2:
        return {"skipped": f"{len(y)} validation cases with {len(np.unique(y))} action class(es)"}
    ck.model.cfg = dataclasses.replace(ck.model.cfg, action_temperature=1.0, action_bias=())  # fit on raw output
    scorer = TransformerScorer(ck.model, ck.vocab, ds.items, version=ck.version, device=device)
    probs = scorer.score_actions([c.history for c in cases])
    temperature, bias = fit_action_calibration(probs, y)
    ck.model.cfg = dataclasses.replace(ck.model.cfg, action_temperature=temperature, action_bias=bias)
    return {"temperature": round(temperature, 4), "bias": list(bias), "n_cases": int(len(y)),
            "valid_log_loss_before": round(log_loss(y, probs), 4),
            "valid_log_loss_after": round(log_loss(y, apply_action_calibration(probs, temperature, bias)), 4)}


def calibrate_items(ck, ds, cases, device: str = "cpu", min_cases: int = 50, chunk: int = 128) -> dict[str, Any]:
    """Fit the temperature of the next-item probabilities of the loaded checkpoint ``ck`` on
    ``cases`` (validation; :class:`models.calibration.ItemTemperatureFit`) and set it on
    ``ck.model.cfg`` (the caller saves the checkpoint). The ranking does not change.

    Returns the fitted ``temperature`` with the validation log loss before and after, or
    ``{"skipped": reason}`` (too few cases whose target is in the catalogue)."""
    import dataclasses

    from models.calibration import ItemTemperatureFit
    from models.scorer import TransformerScorer

    ck.model.cfg = dataclasses.replace(ck.model.cfg, item_temperature=1.0)  # fit on raw scores
    scorer = TransformerScorer(ck.model, ck.vocab, ds.items, version=ck.version, device=device)
    vocab, first = ck.vocab, ck.vocab.first_item
    fit = ItemTemperatureFit()
    for start in range(0, len(cases), chunk):
        batch = cases[start: start + chunk]
        scores = scorer.run([c.history for c in batch])["item_scores"][:, first:]
        targets = np.array([vocab.index(c.target_item) if c.target_item in vocab else -1 for c in batch], np.int64)
        fit.add(scores, np.where(targets >= first, targets - first, -1))
        if fit.skipped:
            break
    if fit.n < min_cases:
        return {"skipped": f"{fit.n} validation cases with a target in the catalogue"}
    temperature, before, after = fit.result()
    ck.model.cfg = dataclasses.replace(ck.model.cfg, item_temperature=temperature)
    return {"temperature": round(temperature, 4), "n_cases": fit.n, "valid_log_loss_before": round(before, 4),
            "valid_log_loss_after": round(after, 4)}


def transition_table(ck, seqs: dict[str, EventSeq]):
    """The item-transition counts of ``seqs`` in the vocabulary of the loaded checkpoint ``ck``
    (:func:`models.transitions.count_transitions`, its ``transition_top`` successors per item)."""
    from models.transitions import count_transitions

    cfg, vocab = ck.model.cfg, ck.vocab
    return count_transitions((vocab.indices(s.items) for s in seqs.values()), cfg.n_items, cfg.transition_top,
                             vocab.first_item)


class _PlusScorer:
    """Scores of precomputed rows: ``base + w * extra`` (``row_of``: a history's ``id`` -> its row)."""

    def __init__(self, row_of: dict[int, int], base: np.ndarray, extra, w: float) -> None:
        self.row_of, self.base, self.extra, self.w = row_of, base, extra, w

    def score_items(self, hs):
        ix = [self.row_of[id(h)] for h in hs]
        return self.base[ix] if self.w == 0 else self.base[ix] + self.w * self.extra[ix].toarray()


def _search_weight(ds, cases, hists, base: np.ndarray, extras: dict, weights, mask_history: bool):
    """The weight ``w`` of one extra score matrix that maximises validation NDCG@10 of ``base + w * extra``:
    ``(NDCG@10 at w = 0, (best NDCG@10, its extra's key, its w, {tried: NDCG@10}))``. ``base`` are the
    model's scores of ``hists`` (the ``cases``' histories), ``extras`` sparse ``[cases, items]`` matrices
    by key; every key is tried with every weight, ``w = 0`` (key None) is the start, ties keep the
    earlier (smaller) candidate, and the grid doubles past its edge while that helps."""
    row_of = {id(h): i for i, h in enumerate(hists)}

    def ndcg(key, w: float) -> float:
        return float(evaluate_cases(_PlusScorer(row_of, base, extras.get(key), w), ds, cases, mask_history)["NDCG@10"])

    def name(key, w: float) -> str:
        return f"{key}:{w:g}" if key else f"{w:g}"

    before = ndcg(None, 0.0)
    best, tried = (before, None, 0.0), {}
    for key in extras:
        for w in weights:
            m = ndcg(key, w)
            tried[name(key, w)] = round(m, 4)
            if m > best[0] + 1e-9:
                best = (m, key, float(w))
    while weights and best[2] >= max(weights) and best[2] < 1e4:  # best at the grid's edge: go further
        m = ndcg(best[1], 2 * best[2])
        tried[name(best[1], 2 * best[2])] = round(m, 4)
        if m <= best[0] + 1e-9:
            break
        best = (m, best[1], 2 * best[2])
    return before, (*best, tried)


def _uncalibrated_scores(ck, ds, cases, device: str, **changes) -> tuple[list[EventSeq], np.ndarray, np.ndarray]:
    """``(histories, scores [cases, dataset items], the scores' vocabulary columns)`` of the loaded
    checkpoint ``ck`` on ``cases`` with its model config ``changes`` applied (a table's weight 0) and
    item temperature 1, which stay set on ``ck.model`` (the caller restores its config). A table's
    weight is searched on uncalibrated scores: the temperature divides the table's terms as well (and
    keeps the ranking), so adding ``w * table`` to calibrated scores is not what the model serves."""
    import dataclasses

    from models.scorer import TransformerScorer

    ck.model.cfg = dataclasses.replace(ck.model.cfg, item_temperature=1.0, **changes)
    scorer = TransformerScorer(ck.model, ck.vocab, ds.items, version=ck.version, device=device)
    hists = [c.history for c in cases]
    return hists, scorer.score_items(hists), scorer._cols


def _last_events(vocab: ItemVocab, hists: list[EventSeq], W: int) -> np.ndarray:
    """``[len(hists), W]``: each history's last ``W`` vocabulary indices, the last first (padding 0
    where it is shorter): the host-side ``last_items`` the model's table and category terms read."""
    last = np.zeros((len(hists), W), np.int64)
    for i, h in enumerate(hists):
        ix = vocab.indices(h.items[-W:])[::-1]
        last[i, : len(ix)] = ix
    return last


#: Transition weights tried on validation (0 = no table is always a candidate).
TRANSITION_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def fit_transitions(ck, ds, cases, fit_seqs: dict[str, EventSeq], final_seqs: dict[str, EventSeq],
                    mask_history: bool, device: str = "cpu", weights=TRANSITION_WEIGHTS) -> dict[str, Any]:
    """Give the loaded checkpoint ``ck`` its item-transition table (:mod:`models.transitions`).

    The table is counted on ``fit_seqs`` (what the model trained on, so the validation ``cases``'
    targets are unseen), and the feature (``log``/``prob``) and weight that maximise validation
    NDCG@10 are chosen, weight 0 (no table) included; ties keep the smaller weight. The table is then
    re-counted on ``final_seqs`` (every event but the test targets: the statistics the Markov baseline
    is fitted on) and set on ``ck.model`` with the chosen feature and weight in its config (the
    caller saves). The model's own scores are computed once; each candidate adds the table's rows.
    """
    import dataclasses

    import scipy.sparse as sp

    from models.transitions import TRANSITION_SCORES

    cfg = ck.model.cfg
    if cfg.transition_top == 0:
        return {"skipped": "transition_top = 0"}
    if not cases:
        return {"skipped": "no validation cases"}
    vocab = ck.vocab

    def table(seqs):
        return transition_table(ck, seqs)

    ck.model.set_transitions(None)
    hists, base, cols = _uncalibrated_scores(ck, ds, cases, device, transition_weight=0.0)  # without a table
    last = np.array([vocab.indices(h.items[-1:])[0] if len(h) else 0 for h in hists], np.int64)

    counts = table(fit_seqs)
    rows = {}
    for feat in TRANSITION_SCORES:
        t = counts.with_feature(feat)
        rows[feat] = sp.csr_matrix((t.val, t.idx, t.ptr), shape=(cfg.n_items, cfg.n_items))[last][:, cols].tocsr()
    before, (after, feat, w, tried) = _search_weight(ds, cases, hists, base, rows, weights, mask_history)
    feat = feat or cfg.transition_feature  # None: no table won (w = 0)
    final = counts if final_seqs is fit_seqs else table(final_seqs)
    ck.model.cfg = dataclasses.replace(cfg, transition_feature=feat, transition_weight=w)
    ck.model.set_transitions(final.with_feature(feat) if w > 0 else None)
    return {"feature": feat, "weight": w, "valid_ndcg10_before": round(before, 4),
            "valid_ndcg10_after": round(after, 4), "n_cases": len(cases), "nnz": final.nnz if w > 0 else 0,
            "tried": tried}


#: Neighbour windows tried on validation: how many of the last events' neighbours are scored (the
#: item-kNN baseline's window is 2; a window of 4 won validation by < 0.001 on MovieLens-100k and lost
#: 0.01 NDCG@10 on its test: benchmarks/RESULTS.md, "The defaults on every shipped dataset").
NEIGHBOUR_WINDOWS = (1, 2)


def neighbour_table(ck, seqs: dict[str, EventSeq]):
    """The item-neighbour table of ``seqs`` in the vocabulary of the loaded checkpoint ``ck``
    (:func:`models.neighbours.count_neighbours`, its ``neighbour_top`` neighbours per item)."""
    from models.neighbours import count_neighbours

    cfg, vocab = ck.model.cfg, ck.vocab
    return count_neighbours((vocab.indices(s.items) for s in seqs.values()), cfg.n_items, cfg.neighbour_top,
                            vocab.first_item)


def fit_neighbours(ck, ds, cases, fit_seqs: dict[str, EventSeq], mask_history: bool, device: str = "cpu",
                   windows=NEIGHBOUR_WINDOWS, weights=TRANSITION_WEIGHTS) -> dict[str, Any]:
    """Give the loaded checkpoint ``ck`` its item-neighbour table (:mod:`models.neighbours`).

    The table is built on ``fit_seqs`` (what the model trained on: the validation ``cases``' targets
    unseen), and the window (how many of the last events' neighbours are scored) and weight that
    maximise validation NDCG@10 on top of the model's scores (repeat, copy and transition terms
    included) are chosen, weight 0 (no table) included; ties keep the smaller window and weight. Sets
    the choice on ``ck.model`` with the ``fit_seqs`` table; the caller re-builds it on the final
    sequences (:func:`fit_table_and_temperature`) and saves."""
    import dataclasses

    import scipy.sparse as sp

    t0 = time.perf_counter()
    cfg = ck.model.cfg
    if cfg.neighbour_top == 0:
        return {"skipped": "neighbour_top = 0"}
    if not cases:
        return {"skipped": "no validation cases"}
    vocab = ck.vocab
    hists, base, cols = _uncalibrated_scores(ck, ds, cases, device, neighbour_weight=0.0)  # without neighbours
    windows = [w for w in windows if w <= cfg.max_len]
    W = max(windows)
    last = _last_events(vocab, hists, W)
    table = neighbour_table(ck, fit_seqs)
    N = sp.csr_matrix((table.val, table.idx, table.ptr), shape=(cfg.n_items, cfg.n_items))[:, cols].tocsr()
    extras, acc = {}, None
    for w in range(1, W + 1):
        acc = N[last[:, w - 1]] if acc is None else acc + N[last[:, w - 1]]
        if w in windows:
            extras[w] = acc.tocsr()
    before, (after, window, weight, tried) = _search_weight(ds, cases, hists, base, extras, weights, mask_history)
    window = window or cfg.neighbour_window  # None: no window won (weight 0)
    ck.model.cfg = dataclasses.replace(cfg, neighbour_window=int(window), neighbour_weight=weight)
    ck.model.set_neighbours(table if weight > 0 else None)
    return {"window": int(window), "weight": weight, "valid_ndcg10_before": round(before, 4),
            "valid_ndcg10_after": round(after, 4), "n_cases": len(cases), "fit_s": round(time.perf_counter() - t0, 1),
            "tried": tried}


#: Category-recency windows tried on validation (capped at the model's window length).
CATEGORY_WINDOWS = (1, 10, 50)
#: The best category-recency weight is kept only if it beats weight 0 on the validation cases by the
#: two-sided sign test at this level (the quality table's test): the term moves a whole category at
#: once, and a validation gain of a few cases did not carry to the test cases (benchmarks/RESULTS.md,
#: "Category recency").
CATEGORY_ALPHA = 0.05


def fit_category_recency(ck, ds, cases, mask_history: bool, device: str = "cpu", windows=CATEGORY_WINDOWS,
                         weights=TRANSITION_WEIGHTS, chunk: int = 256, unseen: bool = False) -> dict[str, Any]:
    """Fit the category-recency term of the loaded checkpoint ``ck``
    (:meth:`models.model.NextActionModel.category_recency`): the window (how many of the last events'
    categories are scored) and weight that maximise validation NDCG@10 on top of the model's scores
    (repeat, copy and table terms included), weight 0 (off) included; ties keep the smaller window and
    weight. The candidates are the served function's own scores, so what is fitted is what is served.
    The best weight is kept only if it also beats weight 0 case by case (sign test, p <
    :data:`CATEGORY_ALPHA`; ``valid_sign_test``, and ``not_significant`` with what was dropped).
    Sets the choice on ``ck.model`` (the caller saves). A log whose users browse within categories
    (e-commerce) gets a weight; one where the next item's category says little keeps 0.

    ``unseen=True`` fits ``category_weight_unseen``, the weight served when the user's window items are
    excluded from the ranking (``exclude_seen``; pass ``mask_history=True``), and leaves
    ``category_weight`` as it is: with repeats out of the ranking, the categories being browsed are
    much of what is left to go on."""
    import dataclasses

    import scipy.sparse as sp
    import torch

    t0 = time.perf_counter()
    model, cfg = ck.model, ck.model.cfg
    if not (cfg.item_categories and cfg.category_recency):
        return {"skipped": "no item categories" if not cfg.item_categories else "category_recency off"}
    if not cases:
        return {"skipped": "no validation cases"}
    field = "category_weight_unseen" if unseen else "category_weight"
    # the model's scores without the term (either mode's weight: the other one is not served in this mode)
    hists, base, cols = _uncalibrated_scores(ck, ds, cases, device, category_weight=0.0, category_weight_unseen=0.0)
    ck.model.cfg = cfg  # the other weight as it was
    windows = [w for w in windows if w <= cfg.max_len] or [cfg.max_len]
    W = max(windows)
    last = _last_events(ck.vocab, hists, W)
    col_cat = model.item_category[torch.as_tensor(cols, device=model.item_category.device)]  # (dataset items,)
    extras = {}
    with torch.no_grad():
        for w in windows:
            parts = []
            for a in range(0, len(hists), chunk):
                rec = model.category_recency(torch.as_tensor(last[a: a + chunk], device=col_cat.device), w, 1.0)
                parts.append(sp.csr_matrix(rec.index_select(1, col_cat).cpu().numpy()))
            extras[w] = sp.vstack(parts).tocsr()
    before, (after, window, weight, tried) = _search_weight(ds, cases, hists, base, extras, weights, mask_history)
    out: dict[str, Any] = {}
    if weight > 0:  # a whole category moves at once: keep the term only where it wins case by case
        from models.metrics import paired_sign_test

        row_of = {id(h): i for i, h in enumerate(hists)}
        ranks = [evaluate(_PlusScorer(row_of, base, extras[window], w), ds, cases, mask_history=mask_history,
                          beyond_accuracy=False, calibration=False, return_ranks=True)["ranks"] for w in (weight, 0.0)]
        better, worse, p = paired_sign_test(*ranks)
        out["valid_sign_test"] = f"{better}/{worse} p={p:.2g}"
        if p >= CATEGORY_ALPHA or better <= worse:
            out["not_significant"] = {"window": int(window), "weight": weight, "valid_ndcg10": round(after, 4)}
            window, weight, after = None, 0.0, before
    window = window or cfg.category_window  # None: no window won (weight 0)
    ck.model.cfg = dataclasses.replace(cfg, category_window=int(window), **{field: weight})
    return {"window": int(window), "weight": weight, "valid_ndcg10_before": round(before, 4),
            "valid_ndcg10_after": round(after, 4), "n_cases": len(cases), **out,
            "fit_s": round(time.perf_counter() - t0, 1), "tried": tried}


#: Copy strengths tried on validation (0 = the model's own repeat scores only).
COPY_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def copy_feature(distance: np.ndarray) -> np.ndarray:
    """The copy score of a history event ``distance`` events before the last one (0 = the last):
    ``1 / (1 + distance)``, summed over an item's occurrences in the window, so the most recent and
    most repeated items rank first (the recent-items baseline's order, with a frequency bonus).

    >>> copy_feature(np.arange(4)).tolist()
    [1.0, 0.5, 0.3333333333333333, 0.25]
    """
    return 1.0 / (1.0 + np.asarray(distance, np.float64))


def fit_copy(ck, ds, cases, mask_history: bool, device: str = "cpu", weights=COPY_WEIGHTS) -> dict[str, Any]:
    """Fit the copy strength of the loaded checkpoint ``ck`` on the validation ``cases``: how strongly
    items of the user's own recent history are boosted on top of the learned repeat head.

    Candidates ``w`` add ``w * copy_feature(distance)`` to every history event's repeat score (the
    model's ``rep_recency`` row for that distance), so the served model needs no new code path; the
    one with the best validation NDCG@10 wins, ``w = 0`` included (ties keep the smaller), and the grid
    doubles past its edge while that helps. On a log where users come back to the same items this
    recovers (at least) the recent-items ranking; on one without repeats it picks 0. The model's scores
    are computed once; each candidate adds a sparse matrix. Sets the winner on ``ck.model`` (the
    caller saves)."""
    import scipy.sparse as sp
    import torch

    from models.scorer import TransformerScorer

    model = ck.model
    if not model.cfg.repeat_head:
        return {"skipped": "model has no repeat head"}
    if not cases:
        return {"skipped": "no validation cases"}
    scorer = TransformerScorer(model, ck.vocab, ds.items, version=ck.version, device=device)
    hists = [c.history for c in cases]
    base = scorer.score_items(hists)
    column = np.full(model.cfg.n_items, -1, np.int64)
    column[scorer._cols] = np.arange(len(scorer._cols))
    T = model.cfg.max_len
    rows, cols, vals = [], [], []
    for i, h in enumerate(hists):
        idx = ck.vocab.indices(h.items[-T:])
        col = column[idx]
        dist = np.arange(len(idx))[::-1]
        keep = col >= 0
        rows.append(np.full(int(keep.sum()), i))
        cols.append(col[keep])
        vals.append(copy_feature(dist[keep]))
    boost = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=base.shape)  # duplicates (repeated items) are summed

    before, (after, _, weight, tried) = _search_weight(ds, cases, hists, base, {"": boost}, weights, mask_history)
    if weight > 0:
        with torch.no_grad():
            w_rec = model.rep_recency.weight
            add = torch.from_numpy(weight * copy_feature(np.arange(w_rec.shape[0]))).to(w_rec)
            w_rec.add_(add[:, None])
    return {"weight": weight, "valid_ndcg10_before": round(before, 4), "valid_ndcg10_after": round(after, 4),
            "n_cases": len(cases), "tried": tried}


def _peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far (MiB), or None where unavailable."""
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return None


def _update_metadata(out_dir: Path, ck, extra: dict, train_cfg: TrainConfig) -> None:
    from models.checkpoint import save_checkpoint

    meta = dict(ck.metadata)
    meta.update(extra)
    save_checkpoint(out_dir, ck.model, ck.vocab, train_cfg, meta)


def _fmt(rec: dict) -> str:
    parts = [f"{rec['phase']} ep {rec['epoch']}", f"loss {rec['loss']:.4f}", f"{rec['seq_per_s']:.0f} seq/s",
             f"{rec['train_s']:.1f}s"]
    if "valid" in rec:
        parts.append("valid " + " ".join(f"{k} {v:.4f}" for k, v in rec["valid"].items()))
    return " | ".join(parts)


def fit_text_rows(checkpoint: str | Path, ds, texts: dict[str, str], *, split=None, min_count: int = 5,
                  seed: int = 0, device: str = "auto", encoder=None) -> dict:
    """Cold-start items from text (:mod:`models.text`, docs/cold-start.md), after training: fit the
    text projection on the checkpoint's warm items, give its items with text and few training events
    their text rows (:func:`~models.text.fit_projection`, :func:`~models.text.apply_text_rows`) and
    save the checkpoint again in place with the projection (``text_projection.safetensors``; its
    version changes) and ``metadata["text_rows"]`` (the report returned).

    ``ds``/``split``: the dataset and split it was trained on (the training counts come from
    :func:`training_sequences`; ``split`` None: leave-one-out). ``texts``: item id → text
    (:func:`models.text.read_catalogue`): no dataset loader provides item texts, so they come from a
    catalogue file. ``encoder``: a :class:`models.text.TextEncoder` (default: a new one on ``device``).
    Raises :class:`~models.errors.MissingDependencyError` without the encoder's package and
    :class:`~models.errors.DatasetError` when fewer than 10 items have text and ``min_count``
    training events (the checkpoint is then left as it was).

    Report: ``items_with_text`` (vocabulary items with text), ``n_fit``, ``ridge``, ``fit_r2``,
    ``min_count``, ``cold``/``few`` (items given text rows with 0 / 1 to ``min_count - 1`` events),
    ``seconds`` (embedding and fitting), ``version`` (the checkpoint's new one)."""
    from models.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from models.errors import DatasetError
    from models.text import TextEncoder, apply_text_rows, fit_projection, model_dir, training_counts

    model_dir()  # MissingDependencyError before any work
    t0 = time.perf_counter()
    dev = resolve_device(device)
    ck = load_checkpoint(checkpoint, device=dev)
    if split is None:
        from models.datasets import leave_one_out

        split = leave_one_out(ds)
    counts = training_counts(ck.vocab, training_sequences(split, set()).values())
    encoder = encoder or TextEncoder(device=dev)
    cache: dict = {}
    with_text = sum(1 for i in ck.vocab.items if i in texts)
    try:
        proj = fit_projection(ck.model, ck.vocab, texts, counts, encoder, min_count=min_count, seed=seed,
                              emb_cache=cache)
    except ValueError as exc:
        raise DatasetError(f"no text projection fitted for {checkpoint}: {exc} ({with_text} of the {len(texts)} "
                           f"texts name an item of the model)") from None
    info = apply_text_rows(ck.model, ck.vocab, texts, counts, proj, encoder, emb_cache=cache)
    report = {"items_with_text": with_text, "n_fit": proj.meta["n_fit"], "ridge": proj.meta["ridge"],
              "fit_r2": round(proj.meta["fit_r2"], 4), "min_count": int(min_count), **info,
              "seconds": round(time.perf_counter() - t0, 1)}
    path = save_checkpoint(checkpoint, ck.model, ck.vocab, ck.train_config, {**ck.metadata, "text_rows": report},
                           text_projection=proj)
    report["version"] = read_manifest(path)["content_hash"][:12]
    return report
