"""Pure metric functions (numpy in, float or array out). No I/O, no model code.

Ranking metrics work on **0-based ranks** of the target item (rank 0 = top of the list), one per
evaluation case, so a metric over a whole test set is a mean over that array. The evaluator
(:mod:`models.evaluate`) turns score matrices into ranks with :func:`target_ranks`.

>>> r = np.array([0, 3, 12])
>>> round(hit_rate(r, 10), 4), round(ndcg(r, 10), 4), round(mrr(r), 4)
(0.6667, 0.4769, 0.4423)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "target_ranks", "top_k", "hit_rate", "ndcg", "mrr", "auc", "per_class_auc", "log_loss", "accuracy",
    "macro_f1", "calibration_error", "expected_calibration_error", "catalog_coverage", "novelty", "log_mae",
]


# ----------------------------------------------------------------------------- ranking

def target_ranks(scores: np.ndarray, target: np.ndarray, *, tiebreak: np.ndarray | None = None,
                 ties: str = "pessimistic") -> np.ndarray:
    """0-based rank of ``scores[b, target[b]]`` within row ``b``.

    ``rank = #(items scoring strictly higher) + tie term``. Items with the *same* score as the
    target are ordered by ``tiebreak`` (higher first, e.g. item popularity) when given; ties that
    remain (same score and same tiebreak) are resolved by ``ties``: ``"pessimistic"`` (the target
    goes after all of them), ``"optimistic"`` (before all), or ``"mean"`` (half of them).
    ``tiebreak`` is 1-D (per column) or 2-D (per row and column, same shape as ``scores``).

    >>> s = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    >>> int(target_ranks(s, np.array([0]))[0]), int(target_ranks(s, np.array([0]), ties="optimistic")[0])
    (3, 1)
    >>> pop = np.array([5, 1, 7, 2, 9])      # item 2 is more popular than the target, item 3 less
    >>> int(target_ranks(s, np.array([0]), tiebreak=pop)[0])
    2
    >>> target_ranks(np.array([[1.0, 2.0], [3.0, 3.0]]), np.array([0, 1]), ties="mean").tolist()
    [1.0, 0.5]
    """
    scores = np.asarray(scores)
    target = np.asarray(target, np.int64)
    rows = np.arange(scores.shape[0])
    t = scores[rows, target][:, None]
    if np.isnan(t).any():
        raise ValueError("NaN score for a target item")
    greater = np.count_nonzero(scores > t, axis=1)
    er, ec = np.nonzero(scores == t)  # ties are usually few: work on their coordinates only
    if tiebreak is not None:
        tb = np.asarray(tiebreak)
        if tb.ndim == 1:  # one value per column (item), shared by all rows
            tb_e, tbt_e = tb[ec], tb[target[er]]
        else:  # per row, e.g. the popularity of each row's sampled candidates
            tb_e, tbt_e = tb[er, ec], tb[er, target[er]]
        greater = greater + np.bincount(er[tb_e > tbt_e], minlength=len(rows))
        er = er[tb_e == tbt_e]
    n_tied = np.bincount(er, minlength=len(rows)) - 1  # minus the target itself
    if ties == "pessimistic":
        return greater + n_tied
    if ties == "optimistic":
        return greater
    if ties == "mean":
        return greater + n_tied / 2.0
    raise ValueError(f"ties must be pessimistic/optimistic/mean, got {ties!r}")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest scores per row, best first (ties: lower index first).

    Faster than a full ``argpartition`` on wide rows: the k-th largest of per-chunk maxima is a
    lower bound of each row's k-th largest score, so only the few scores above it are sorted.

    >>> top_k(np.array([[0.1, 0.9, 0.5, 0.7], [3.0, 1.0, 2.0, 0.0]]), 2).tolist()
    [[1, 3], [0, 2]]
    """
    s = np.asarray(scores)
    B, N = s.shape
    k = min(k, N)
    C = max(4 * k, 64)
    w = N // C
    if w < 4:  # narrow rows: plain sort
        return np.argsort(-s, axis=1, kind="stable")[:, :k]
    m = s[:, : C * w].reshape(B, C, w).max(2)
    if N > C * w:
        m = np.concatenate([m, s[:, C * w:].max(1, keepdims=True)], 1)
    lb = np.partition(m, m.shape[1] - k, axis=1)[:, m.shape[1] - k]
    rows, cols = np.nonzero(s >= lb[:, None])
    vals = s[rows, cols]
    order = np.lexsort((cols, -vals, rows))
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(B))
    pos = np.arange(rows.size) - starts[rows]
    keep = pos < k
    out = np.empty((B, k), np.int64)
    out[rows[keep], pos[keep]] = cols[keep]
    return out


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of cases whose target is in the top ``k`` (HR@k, = Recall@k with one target).

    >>> hit_rate(np.array([0, 9, 10, 50]), 10)
    0.5
    """
    ranks = np.asarray(ranks)
    return float(np.mean(ranks < k)) if ranks.size else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: ``1 / log2(rank + 2)`` if rank < k else 0, averaged.

    >>> ndcg(np.array([0]), 10), round(ndcg(np.array([1]), 10), 4), ndcg(np.array([10]), 10)
    (1.0, 0.6309, 0.0)
    """
    ranks = np.asarray(ranks, np.float64)
    if not ranks.size:
        return float("nan")
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))


def paired_sign_test(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 10) -> tuple[int, int, float]:
    """Case by case NDCG@k of two scorers on the same cases: ``(a better, b better, p)`` with ``p``
    the two-sided exact sign test (binomial, ties dropped) of "neither is better".

    >>> w, l, p = paired_sign_test(np.array([0, 0, 0, 0, 0, 0, 5]), np.array([3, 3, 3, 3, 3, 3, 0]))
    >>> w, l, round(p, 6)
    (6, 1, 0.125)
    >>> paired_sign_test(np.array([0, 20]), np.array([0, 30]))  # equal gains: no evidence either way
    (0, 0, 1.0)
    """
    from scipy.stats import binomtest

    def gain(r):
        r = np.asarray(r, np.float64)
        return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)

    ga, gb = gain(ranks_a), gain(ranks_b)
    wins, losses = int((ga > gb).sum()), int((ga < gb).sum())
    p = float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return wins, losses, p


def mrr(ranks: np.ndarray, k: int | None = None) -> float:
    """Mean reciprocal rank ``1 / (rank + 1)``; with ``k``, ranks >= k count 0 (MRR@k).

    >>> mrr(np.array([0, 1, 3])), mrr(np.array([0, 1, 3]), k=2)
    (0.5833333333333334, 0.5)
    """
    ranks = np.asarray(ranks, np.float64)
    if not ranks.size:
        return float("nan")
    rr = 1.0 / (ranks + 1.0)
    if k is not None:
        rr = np.where(ranks < k, rr, 0.0)
    return float(rr.mean())


# ----------------------------------------------------------------------------- classification

def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    _, first, counts = np.unique(xs, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # average of 1-based positions first+1 .. first+count
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic; tied scores count one half. NaN if one class.

    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    >>> auc(np.array([0, 1]), np.array([0.5, 0.5]))
    0.5
    >>> auc(np.array([1, 1]), np.array([0.2, 0.3]))
    nan
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def per_class_auc(y_true: np.ndarray, probs: np.ndarray) -> list[float]:
    """One-vs-rest AUC per class column of ``probs`` (NaN for a class absent or always present).

    >>> per_class_auc(np.array([0, 1, 1]), np.array([[.8, .2], [.3, .7], [.6, .4]]))
    [1.0, 1.0]
    """
    y = np.asarray(y_true)
    p = np.asarray(probs)
    return [auc(y == c, p[:, c]) for c in range(p.shape[1])]


def log_loss(y_true: np.ndarray, probs: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood (natural log) of the true class; probs clipped to [eps, 1].

    >>> round(log_loss(np.array([0, 1]), np.array([[0.5, 0.5], [0.2, 0.8]])), 4)
    0.4581
    """
    y = np.asarray(y_true, np.int64)
    p = np.asarray(probs, np.float64)
    p = p / p.sum(1, keepdims=True)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of exact matches.

    >>> accuracy(np.array([0, 1, 2]), np.array([0, 1, 1]))
    0.6666666666666666
    """
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int] | None = None) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: classes in y_true or y_pred).

    A class with no true and no predicted members is left out; one with precision and recall
    both 0 scores F1 = 0.

    >>> # class 0: P=1/2 R=1/1 F1=2/3; class 1: P=1/2 R=1/2 F1=1/2; class 2: F1=0
    >>> round(macro_f1(np.array([0, 1, 1, 2]), np.array([0, 1, 0, 1])), 4)
    0.3889
    """
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if labels is None:
        labels = sorted(set(yt.tolist()) | set(yp.tolist()))
    f1s = []
    for c in labels:
        tp = int(np.sum((yt == c) & (yp == c)))
        fp = int(np.sum((yt != c) & (yp == c)))
        fn = int(np.sum((yt == c) & (yp != c)))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error (ECE) of predictions made with probability ``confidence`` that
    came true (``correct``, bool or 0/1): the confidences fall into ``n_bins`` equal-width bins over
    ``(0, 1]`` (a confidence of 0 joins the first), and ECE is the mean over bins of ``|share
    correct - mean confidence|``, weighted by the share of predictions in the bin. 0 = calibrated;
    it is at most 1. NaN without predictions.

    Used for the top-1 item probability (``item/top1_ece`` in :func:`models.evaluate.evaluate`) and,
    through :func:`expected_calibration_error`, for the top action.

    >>> # bin (0.8, 0.867]: .85, .85 with one right -> |0.5 - 0.85| = 0.35, half the predictions;
    >>> # bin (0.067, 0.133]: .1, .1 both wrong -> |0 - 0.1| = 0.1, the other half
    >>> round(calibration_error(np.array([.85, .85, .1, .1]), np.array([1, 0, 0, 0])), 4)
    0.225
    >>> calibration_error(np.array([0.25, 0.25, 0.25, 0.25]), np.array([1, 0, 0, 0]))  # calibrated
    0.0
    >>> calibration_error(np.array([1.0]), np.array([False])), calibration_error(np.array([]), np.array([]))
    (1.0, nan)
    """
    conf = np.asarray(confidence, np.float64).reshape(-1)
    hit = np.asarray(correct, np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(f"confidence has {conf.size} entries, correct {hit.size}")
    if not conf.size:
        return float("nan")
    if np.isnan(conf).any() or conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidence must be probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    # sum over bins of |hits - confidence| (per-bin sums), over all predictions
    gap = np.abs(np.bincount(idx, hit, minlength=n_bins) - np.bincount(idx, conf, minlength=n_bins))
    return float(gap.sum() / conf.size)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE of class probabilities ``probs [N, C]``: :func:`calibration_error` of each row's
    largest probability, correct when that class is ``y_true``.

    >>> # confidences .9 (right), .9 (wrong) share a bin: |0.5 - 0.9| = 0.4; .6 (right): |1 - .6| = .4
    >>> p = np.array([[.9, .1], [.9, .1], [.4, .6]])
    >>> round(expected_calibration_error(np.array([0, 1, 1]), p, n_bins=10), 4)
    0.4
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(y_true)
    return calibration_error(p.max(1), p.argmax(1) == y, n_bins)


# ----------------------------------------------------------------------------- beyond accuracy

def catalog_coverage(topk: np.ndarray, n_items: int) -> float:
    """Share of the catalogue that appears in at least one top-k list.

    >>> catalog_coverage(np.array([[0, 1], [1, 2]]), 10)
    0.3
    """
    return float(np.unique(np.asarray(topk)).size / n_items)


def novelty(topk: np.ndarray, item_prob: np.ndarray) -> float:
    """Mean self-information ``-log2 p(i)`` of the recommended items (Zhou et al., PNAS 2010).

    ``item_prob[i]`` is the share of training users who interacted with item ``i`` (the evaluator
    smooths it as ``(users(i) + 1) / (n_users + 1)`` so unseen items stay finite).

    >>> novelty(np.array([[0, 1]]), np.array([0.5, 0.25]))
    1.5
    """
    p = np.asarray(item_prob, np.float64)[np.asarray(topk)]
    return float(np.mean(-np.log2(p)))


def log_mae(true_s: np.ndarray, pred_s: np.ndarray, floor_s: float = 1.0) -> float:
    """Mean absolute error in natural-log seconds, both sides floored at ``floor_s``.

    >>> round(log_mae(np.array([10.0, 100.0]), np.array([100.0, 100.0])), 4)
    1.1513
    """
    t = np.log(np.maximum(np.asarray(true_s, np.float64), floor_s))
    p = np.log(np.maximum(np.asarray(pred_s, np.float64), floor_s))
    return float(np.mean(np.abs(t - p)))

