"""Offline evaluation: any scorer, any dataset, leave-one-out or session cases.

A **scorer** is any object with ``score_items(histories: list[EventSeq]) -> [B, len(ds.items)]``
(float, higher is better) and optionally ``score_actions(histories) -> [B, 5]`` probabilities
(order of :data:`models.schema.ACTIONS`), ``predict_gap_s(histories) -> [B]`` seconds and
``item_probs(histories) -> [B, len(ds.items)]``, each item's probability of being the next one.

Protocols
---------
- ``full`` (the headline): the target is ranked against **all** items of ``ds.items``.
- ``sampled100``: against 100 negatives drawn (seeded, without replacement) from the items the
  user has not interacted with (history and target excluded), uniformly or by popularity
  (``negatives="popularity"``) -- the SASRec paper's protocol, reported only as an extra.

History masking
---------------
``mask_history=False``: items already in the history stay candidates (repeat consumption counts).
``mask_history=True``: the history's items get score ``-inf`` (the S3-Rec / ICLRec / DuoRec /
BSARec family: their full-ranking code zeroes every item of the user's history). As in that code,
a target that repeats a history item is masked too and counts as a miss (``mask_target=True``,
the default). ``mask_target=False`` exempts the target, but that **leaks the label**: the one
history item left unmasked is the target (on Taobao, "recent items" NDCG@10 jumps from 0.10 to
0.31), so use it only for diagnostics. ``target_in_history`` counts the affected cases (few on
Beauty, many on Taobao).

Ties
----
``ties="popularity"`` (default, as in the cross-check figures): an item scoring exactly the same
as the target ranks above it iff it is more popular; items tied on score *and* popularity rank
above the target (pessimistic). Popularity is the event count per item over the *histories of the
evaluated cases* (each user once): for test cases that is train + the validation target, never a
test target. Pass ``popularity=`` (array or train dict) to use another. ``ties="pessimistic"`` /
``"optimistic"`` / ``"mean"`` ignore popularity.

Calibration
-----------
For a scorer with ``item_probs`` (``calibration=True``): the top-1 item is the most probable item
of the *unmasked* distribution (what a prediction's first ``top_items`` entry says), correct when
it is the target. ``item/top1_ece`` is the expected calibration error of its probability (15
equal-width bins, :func:`models.metrics.calibration_error`), next to the mean probability
``item/top1_confidence`` and the share correct ``item/top1_accuracy`` (confidence above accuracy:
over-confident). ``action/ece`` is the same for the most probable action.

Returns a flat dict: ``HR@k``, ``NDCG@k``, ``MRR``, ``MRR@k``, ``coverage@10``, ``novelty@10``,
``n_cases``, ``target_in_history``; with item probabilities ``item/top1_ece``,
``item/top1_confidence``, ``item/top1_accuracy``; with actions ``action/accuracy``,
``action/macro_f1``, ``action/auc/<action>``, ``action/log_loss``, ``action/ece``,
``purchase_session_auc`` (datasets with purchases); with time ``gap/log_mae`` (MAE of
natural-log seconds).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models import metrics as M
from models.datasets.core import Case, Dataset
from models.schema import ACTION_INDEX, ACTIONS, EventSeq
from models.errors import ConfigError

__all__ = ["evaluate", "run_evaluate", "format_table", "purchase_session_cases", "history_popularity"]

PURCHASE = ACTION_INDEX["purchase"]


def history_popularity(ds: Dataset, cases: Sequence[Case] | dict[str, EventSeq]) -> np.ndarray:
    """Event count per item over the cases' histories (each user's longest history once) or a
    train dict."""
    from models.baselines import item_counts

    if isinstance(cases, dict):
        return item_counts(ds, cases)
    longest: dict[str, EventSeq] = {}
    for c in cases:
        h = longest.get(c.user)
        if h is None or len(c.history) > len(h):
            longest[c.user] = c.history
    return item_counts(ds, longest)


def _item_prob(ds: Dataset, cases: Sequence[Case]) -> np.ndarray:
    from models.baselines import item_counts

    users: dict[str, EventSeq] = {}
    for c in cases:
        if c.user not in users or len(c.history) > len(users[c.user]):
            users[c.user] = c.history
    cnt = item_counts(ds, users, distinct_users=True)
    return (cnt + 1.0) / (len(users) + 1.0)


def evaluate(scorer, ds: Dataset, cases: Sequence[Case], *, protocol: str = "full", mask_history: bool = False,
             ks: Sequence[int] = (5, 10, 20), seed: int = 0, batch_size: int = 256, ties: str = "popularity",
             popularity: np.ndarray | dict | None = None, n_negatives: int = 100, negatives: str = "uniform",
             mask_target: bool = True, session_gap_s: float = 1800.0, beyond_accuracy: bool = True,
             calibration: bool = True, progress: bool = False, return_ranks: bool = False) -> dict:
    """Score ``cases`` with ``scorer`` and compute the metrics (see the module doc).

    ``beyond_accuracy=False`` skips coverage / novelty (the top-10 extraction), for speed.
    ``calibration=False`` skips the item calibration (the ``item_probs`` call).
    ``return_ranks=True`` adds ``ranks``: each case's 0-based target rank (for paired tests).

    Raises :class:`~models.errors.ConfigError` for a bad ``protocol`` (the CLI's ``--protocol``) and
    ``ValueError`` naming the argument for other bad arguments, no cases, or a scorer that breaks
    its contract (wrong shape, NaN scores).
    """
    if protocol not in ("full", "sampled100"):
        raise ConfigError("protocol", protocol, "must be 'full' or 'sampled100'")
    if ties not in ("popularity", "pessimistic", "optimistic", "mean"):
        raise ValueError(f"ties must be popularity/pessimistic/optimistic/mean, got {ties!r}")
    if negatives not in ("uniform", "popularity"):
        raise ValueError(f"negatives must be 'uniform' or 'popularity', got {negatives!r}")
    t0 = time.perf_counter()
    N = len(ds.items)
    ix = ds.item_index
    cases = list(cases)
    if not cases:
        raise ValueError("cases is empty: nothing to evaluate")
    pop = (history_popularity(ds, cases) if popularity is None else
           history_popularity(ds, popularity) if isinstance(popularity, dict) else np.asarray(popularity, np.float64))
    item_prob = _item_prob(ds, cases) if beyond_accuracy else None
    kmax = max(ks)
    k_cov = 10
    rng = np.random.default_rng(seed)
    neg_p = None
    if negatives == "popularity":
        neg_p = (pop + 1.0) / (pop + 1.0).sum()
    ranks_all: list[np.ndarray] = []
    tops: list[np.ndarray] = []
    in_hist = 0
    unknown = 0
    do_actions = hasattr(scorer, "score_actions") and ds.has_actions
    do_gap = hasattr(scorer, "predict_gap_s") and ds.has_time
    do_items = calibration and hasattr(scorer, "item_probs")
    act_probs, act_true, gap_pred, gap_true = [], [], [], []
    top1_conf: list[np.ndarray] = []
    top1_hit: list[np.ndarray] = []
    batches = range(0, len(cases), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"eval {getattr(scorer, 'name', type(scorer).__name__)}", leave=False)
    for start in batches:
        batch = cases[start: start + batch_size]
        hists = [c.history for c in batch]
        B = len(batch)
        S = np.asarray(scorer.score_items(hists))
        if S.shape != (B, N):
            raise ValueError(f"scorer.score_items returned shape {S.shape}, expected shape {(B, N)}")
        if S.dtype not in (np.float32, np.float64):
            S = S.astype(np.float64)
        if not np.isfinite(S.sum()) and np.isnan(S).any():
            raise ValueError("scorer.score_items returned NaN scores")
        if not S.flags.writeable and mask_history:
            S = S.copy()
        tgt = np.array([ix.get(c.target_item, -1) for c in batch], np.int64)
        known = tgt >= 0
        unknown += int((~known).sum())
        hidx = [np.fromiter((ix.get(i, -1) for i in h.items), np.int64, len(h)) for h in hists]
        for b in range(B):
            h = hidx[b]
            h = h[h >= 0]
            if known[b] and h.size and (h == tgt[b]).any():
                in_hist += 1
            if mask_history and h.size:
                if not mask_target and known[b]:
                    h = h[h != tgt[b]]
                S[b, h] = -np.inf
        tg = np.where(known, tgt, 0)
        if protocol == "full":
            r = M.target_ranks(S, tg, tiebreak=pop if ties == "popularity" else None,
                               ties="pessimistic" if ties == "popularity" else ties)
        else:
            cand = np.empty((B, n_negatives + 1), np.int64)
            cand[:, 0] = tg
            for b in range(B):
                excl = np.unique(np.concatenate([hidx[b][hidx[b] >= 0], tg[b: b + 1]]))
                avail = N - excl.size
                if avail < n_negatives:
                    raise ValueError(f"n_negatives={n_negatives}: only {avail} items not interacted with")
                picked: np.ndarray = np.zeros(0, np.int64)
                while picked.size < n_negatives:
                    draw = rng.choice(N, size=2 * n_negatives, p=neg_p) if neg_p is not None else \
                        rng.integers(0, N, size=2 * n_negatives)
                    draw = draw[~np.isin(draw, excl)]
                    picked = np.concatenate([picked, draw])
                    _, first = np.unique(picked, return_index=True)
                    picked = picked[np.sort(first)]
                cand[b, 1:] = picked[:n_negatives]
            Sc = np.take_along_axis(S, cand, 1)
            r = M.target_ranks(Sc, np.zeros(B, np.int64), tiebreak=pop[cand] if ties == "popularity" else None,
                               ties="pessimistic" if ties == "popularity" else ties)
        r = np.where(known, r, N).astype(np.float64)
        ranks_all.append(r)
        # top-10 for coverage / novelty (popularity as a tiny tiebreak)
        if beyond_accuracy:
            tops.append(M.top_k(S, k_cov))
        if do_items:
            P = np.asarray(scorer.item_probs(hists), np.float64)
            if P.shape != (B, N):
                raise ValueError(f"scorer.item_probs returned shape {P.shape}, expected shape {(B, N)}")
            top1 = P.argmax(1)
            top1_conf.append(P[np.arange(B), top1])
            top1_hit.append(known & (top1 == tgt))
        if do_actions:
            P = np.asarray(scorer.score_actions(hists), np.float64)
            act_probs.append(P)
            act_true.append(np.array([c.target_action for c in batch]))
        if do_gap:
            gap_pred.append(np.asarray(scorer.predict_gap_s(hists), np.float64))
            gap_true.append(np.array([(c.target_ts - int(c.history.ts[-1])) / 1000.0 if len(c.history) else np.nan
                                      for c in batch]))
    ranks = np.concatenate(ranks_all)
    out: dict = {"n_cases": int(ranks.size), "protocol": protocol, "mask_history": mask_history}
    for k in ks:
        out[f"HR@{k}"] = M.hit_rate(ranks, k)
        out[f"NDCG@{k}"] = M.ndcg(ranks, k)
    out["MRR"] = M.mrr(ranks)
    out[f"MRR@{kmax}"] = M.mrr(ranks, kmax)
    if beyond_accuracy:
        topall = np.concatenate(tops)
        out["coverage@10"] = M.catalog_coverage(topall, N)
        out["novelty@10"] = M.novelty(topall, item_prob)
    out["target_in_history"] = in_hist
    out["unknown_targets"] = unknown
    if do_items:
        conf, hit = np.concatenate(top1_conf), np.concatenate(top1_hit)
        out["item/top1_ece"] = M.calibration_error(np.clip(conf, 0.0, 1.0), hit)
        out["item/top1_confidence"] = float(conf.mean())
        out["item/top1_accuracy"] = float(hit.mean())
    if do_actions:
        P = np.concatenate(act_probs)
        y = np.concatenate(act_true)
        out["action/accuracy"] = M.accuracy(y, P.argmax(1))
        out["action/macro_f1"] = M.macro_f1(y, P.argmax(1))
        for a, v in zip(ACTIONS, M.per_class_auc(y, P)):
            out[f"action/auc/{a}"] = v
        out["action/log_loss"] = M.log_loss(y, P)
        out["action/ece"] = M.expected_calibration_error(y, P)
        pcs = purchase_session_cases(cases, gap_s=session_gap_s)
        if pcs[0]:
            hs, lab = pcs
            probs = np.concatenate([np.asarray(scorer.score_actions(hs[i: i + batch_size]))[:, PURCHASE]
                                    for i in range(0, len(hs), batch_size)])
            out["purchase_session_auc"] = M.auc(np.asarray(lab), probs)
            out["purchase_session_n"] = len(lab)
            out["purchase_session_pos"] = int(np.sum(lab))
    if do_gap:
        gt, gp = np.concatenate(gap_true), np.concatenate(gap_pred)
        ok = np.isfinite(gt)
        out["gap/log_mae"] = M.log_mae(gt[ok], gp[ok])
    if return_ranks:
        out["ranks"] = ranks
    out["seconds"] = time.perf_counter() - t0
    return out


def purchase_session_cases(cases: Sequence[Case], gap_s: float = 1800.0) -> tuple[list[EventSeq], list[int]]:
    """Purchase-within-session cases built from evaluation cases.

    For each case, the *full* sequence is history + target; its last session is the trailing run of
    events whose gaps are at most ``gap_s`` (30 min). A session of at least two events gives one
    case: the model sees everything up to and including the session's **first** event and must
    say whether a purchase follows later in that session (label 1) -- the score is its
    ``purchase`` probability. Returns ``(histories, labels)``.

    >>> e = EventSeq.from_columns(["a", "b", "c"], ["view", "view", "purchase"], [0, 60_000, 120_000])
    >>> hs, y = purchase_session_cases([Case("u", e[:2], "c", 4, 120_000)])
    >>> [h.items for h in hs], y
    ([['a']], [1])
    """
    hs, ys = [], []
    gap_ms = gap_s * 1000.0
    for c in cases:
        ts = np.append(c.history.ts, c.target_ts)
        acts = np.append(c.history.actions, c.target_action)
        brk = np.flatnonzero(np.diff(ts) > gap_ms)
        start = int(brk[-1] + 1) if brk.size else 0
        if len(ts) - start < 2:
            continue
        hs.append(c.history[: start + 1])
        ys.append(int((acts[start + 1:] == PURCHASE).any()))
    return hs, ys


# ----------------------------------------------------------------------------- CLI entry

def run_evaluate(dataset: str, checkpoint: Path | None = None, baselines: Sequence[str] = ("popularity", "markov"),
                 protocol: str = "full", mask_history: bool = False, *, split: str = "test",
                 root: Path | None = None, ks: Sequence[int] = (5, 10, 20), seed: int = 0,
                 max_cases: int | None = None, dataset_opts: dict | None = None, fit_on: str = "train+history",
                 progress: bool = False) -> dict:
    """Load ``dataset``, split it (leave-one-out, or session-rec for ``yoochoose``), fit the named
    baselines on the train part, load ``checkpoint`` (through ``models.scorer.TransformerScorer``)
    if given, and evaluate all of them on ``split`` (``test`` or ``valid``).

    ``fit_on="train+history"`` (default) fits baselines on every event except the evaluated
    targets (:func:`models.datasets.fit_sequences`; reproduces the cross-check figures);
    ``"train"`` on the train part only. For YOOCHOOSE the session-rec files decide. The
    Transformer scorer is whatever the checkpoint holds (trained on the train part).

    Returns ``{"dataset", "protocol", "mask_history", "split", "n_cases", "results": {name: metrics}}``;
    :func:`format_table` renders it.
    """
    from models.baselines import make_baseline
    from models.datasets import fit_sequences, leave_one_out, load, yoochoose_split
    from models.scorer import TransformerScorer

    if split not in ("test", "valid"):
        raise ConfigError("split", split, "must be 'test' or 'valid'")
    if dataset in ("yoochoose", "rsc15"):
        ds, sp = yoochoose_split(root, tune=(split == "valid"))
        cases, fit = sp.test, sp.train
        ks = tuple(sorted(set(ks) | {20}))
    else:
        ds = load(dataset, root, **(dataset_opts or {}))
        sp = leave_one_out(ds)
        cases = sp.test if split == "test" else sp.valid
        fit = fit_sequences(sp, split) if fit_on == "train+history" else sp.train
    if max_cases is not None and len(cases) > max_cases:
        pick = np.random.default_rng(seed).choice(len(cases), max_cases, replace=False)
        cases = [cases[i] for i in np.sort(pick)]
    scorers: dict[str, object] = {}
    for b in baselines:
        scorers[b] = make_baseline(b, ds, fit)
    if checkpoint is not None:
        # history masked: ranked as a discovery feed serves it (exclude_seen), with its fitted category weight
        scorers["transformer"] = TransformerScorer.from_checkpoint(Path(checkpoint), ds, exclude_seen=mask_history)
    results = {name: evaluate(s, ds, cases, protocol=protocol, mask_history=mask_history, ks=ks, seed=seed,
                              progress=progress)
               for name, s in scorers.items()}
    return {"dataset": ds.name, "protocol": protocol, "mask_history": mask_history, "split": split,
            "n_cases": len(cases), "results": results}


def format_table(res: dict, metrics: Sequence[str] = ("HR@10", "NDCG@10", "MRR", "coverage@10",
                                                       "item/top1_ece", "action/log_loss", "action/ece",
                                                       "purchase_session_auc", "gap/log_mae")) -> str:
    """A markdown table (rows = scorers) of :func:`run_evaluate`'s result."""
    names = list(res["results"])
    cols = [m for m in metrics if any(m in res["results"][n] for n in names)]
    lines = [f"{res['dataset']} · {res['protocol']} · history {'masked' if res['mask_history'] else 'allowed'}"
             f" · {res['split']} ({res['n_cases']} cases)", "",
             "| scorer | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for n in names:
        r = res["results"][n]
        lines.append(f"| {n} | " + " | ".join(f"{r[m]:.4f}" if m in r else "" for m in cols) + " |")
    return "\n".join(lines)
