"""Dataset containers, grouping of raw columns into per-user sequences, and the splits.

>>> ds = dataset_from_columns("toy", users=["u", "u", "v", "u", "v", "v"],
...                           items=["a", "b", "a", "c", "c", "b"], ts=None)
>>> list(ds.sequences), ds.sequences["u"].items, ds.items, ds.has_time
(['u', 'v'], ['a', 'b', 'c'], ['a', 'b', 'c'], False)
>>> sp = leave_one_out(ds)
>>> sp.train["u"].items, sp.valid[0].target_item, sp.test[0].history.items, sp.test[0].target_item
(['a'], 'b', ['a', 'b'], 'c')
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.schema import EventSeq
from models.errors import DatasetError

#: Spacing of the synthetic timestamps given to datasets without time (index * 60 s, in ms).
SYNTHETIC_STEP_MS = 60_000


def datasets_root(root: Path | str | None = None) -> Path:
    """Where the shared datasets live: ``root``, else ``$NEXTACTION_DATASETS``, else
    ``<repo>/../shared/datasets``. The path may not exist (callers/tests check)."""
    if root is not None:
        return Path(root)
    env = os.environ.get("NEXTACTION_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@dataclass
class Dataset:
    """Per-user event sequences plus the item catalogue used for full ranking.

    ``items`` fixes the column order of every score matrix (``scorer.score_items``); it holds every
    item of every sequence, in order of first appearance in the source file(s).
    """

    name: str
    sequences: dict[str, EventSeq]
    items: list[str]
    has_time: bool
    has_actions: bool
    meta: dict = field(default_factory=dict)

    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def item_index(self) -> dict[str, int]:
        """item id -> column in the score matrix (built once)."""
        if self._index is None or len(self._index) != len(self.items):
            self._index = {it: i for i, it in enumerate(self.items)}
        return self._index

    @property
    def n_events(self) -> int:
        return sum(len(s) for s in self.sequences.values())

    def summary(self) -> dict:
        lens = np.array([len(s) for s in self.sequences.values()] or [0])
        return {"name": self.name, "users": len(self.sequences), "items": len(self.items),
                "events": int(lens.sum()), "len_median": float(np.median(lens)),
                "len_max": int(lens.max()), "has_time": self.has_time, "has_actions": self.has_actions}


@dataclass(frozen=True, slots=True)
class Case:
    """One evaluation case: predict ``target_*`` from ``history`` (oldest first)."""

    user: str
    history: EventSeq
    target_item: str
    target_action: int
    target_ts: int


@dataclass
class Split:
    """``train``: what models may fit on; ``valid``/``test``: cases whose targets are held out."""

    train: dict[str, EventSeq]
    valid: list[Case]
    test: list[Case]
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- grouping

def dataset_from_columns(name: str, users, items, ts=None, actions=None, devices=None, locations=None,
                         categories=None, *, ts_unit_ms: bool = True, meta: dict | None = None,
                         has_actions: bool | None = None, item_order=None) -> Dataset:
    """Group flat event columns into per-user sequences, ordered by time.

    Sorting is stable, so events with equal timestamps keep their **file order** (MovieLens has
    thousands of such ties). ``ts=None`` means the source has no time: events keep file order and
    get synthetic timestamps ``index * 60 s`` per user, with ``has_time=False``. ``ts`` must be
    epoch milliseconds. ``actions`` are indices into :data:`models.schema.ACTIONS` (``None``: all ``view``).
    Users appear in the dict in order of their first row; ``items`` in order of first appearance
    unless ``item_order`` gives the catalogue explicitly.
    """
    users = np.asarray(users).astype(str)
    n = len(users)
    items_arr = np.asarray(items).astype(str)
    if len(items_arr) != n:
        raise DatasetError(f"{name}: column lengths differ (users {n}, items {len(items_arr)})")
    uniq_u, first_u, inv_u = np.unique(users, return_index=True, return_inverse=True)
    # rank users by first appearance so the dict order follows the file
    u_rank = np.empty(len(uniq_u), np.int64)
    u_rank[np.argsort(first_u, kind="stable")] = np.arange(len(uniq_u))
    ucode = u_rank[inv_u]
    has_time = ts is not None
    if has_time:
        ts_arr = np.asarray(ts, np.int64)
        order = np.lexsort((ts_arr, ucode))  # stable: equal (user, ts) keep file order
    else:
        order = np.argsort(ucode, kind="stable")
    ucode_s = ucode[order]
    bounds = np.flatnonzero(np.diff(ucode_s)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    items_s = items_arr[order].tolist()
    acts = (np.zeros(n, np.uint8) if actions is None else np.asarray(actions, np.uint8))[order]
    ts_s = ts_arr[order] if has_time else None

    def col(c):
        return None if c is None else np.asarray(c).astype(str)[order].tolist()

    dev_s, loc_s, cat_s = col(devices), col(locations), col(categories)
    user_names = uniq_u[np.argsort(u_rank)]
    seqs: dict[str, EventSeq] = {}
    for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        m = b - a
        t = ts_s[a:b] if has_time else np.arange(m, dtype=np.int64) * SYNTHETIC_STEP_MS
        blank = [""] * m
        seqs[str(user_names[ucode_s[a]])] = EventSeq(
            items_s[a:b], acts[a:b].copy(), np.ascontiguousarray(t, np.int64),
            dev_s[a:b] if dev_s is not None else blank,
            loc_s[a:b] if loc_s is not None else list(blank),
            cat_s[a:b] if cat_s is not None else list(blank))
    if item_order is None:
        uniq_i, first_i = np.unique(items_arr, return_index=True)
        item_order = uniq_i[np.argsort(first_i, kind="stable")].tolist()
    else:
        item_order = list(map(str, item_order))
    if has_actions is None:
        has_actions = actions is not None and len(np.unique(acts)) > 1
    return Dataset(name, seqs, item_order, has_time, bool(has_actions), dict(meta or {}))


# ----------------------------------------------------------------------------- splits

def leave_one_out(ds: Dataset, min_len: int = 3, *, short_users: str = "train") -> Split:
    """Leave-last-out split (SASRec / S3-Rec protocol).

    For each user with at least ``min_len`` events: ``train`` holds all but the last two events,
    the validation case predicts the second-to-last from everything before it, the test case the
    last from everything before it. Users with fewer events are not evaluated; with
    ``short_users="train"`` (default) their events still go to ``train`` (no target leaks:
    they are never evaluated), with ``"drop"`` they are left out entirely.
    """
    if min_len < 3:
        raise DatasetError(f"leave_one_out needs min_len >= 3, got {min_len}")
    if short_users not in ("train", "drop"):
        raise DatasetError(f"short_users must be 'train' or 'drop', got {short_users!r}")
    train: dict[str, EventSeq] = {}
    valid: list[Case] = []
    test: list[Case] = []
    n_short = 0
    for u, s in ds.sequences.items():
        n = len(s)
        if n < min_len:
            n_short += 1
            if short_users == "train":
                train[u] = s
            continue
        train[u] = s[: n - 2]
        valid.append(Case(u, s[: n - 2], s.items[n - 2], int(s.actions[n - 2]), int(s.ts[n - 2])))
        test.append(Case(u, s[: n - 1], s.items[n - 1], int(s.actions[n - 1]), int(s.ts[n - 1])))
    return Split(train, valid, test, {"protocol": "leave_one_out", "min_len": min_len,
                                      "short_users": short_users, "n_short_users": n_short,
                                      "dataset": ds.name})


def fit_sequences(split: Split, part: str = "test") -> dict[str, EventSeq]:
    """What a baseline may be fitted on before scoring ``part``'s cases.

    ``"valid"``: the train part. ``"test"``: the train part with every evaluated user's sequence
    extended to its test history (all events but the last), i.e. everything except the test
    targets ("train + history") -- the variant that reproduces the independent cross-check
    figures, and the information a model trained on the train part sees at test time (the
    validation event is in its input).
    """
    if part == "valid":
        return split.train
    if part != "test":
        raise DatasetError(f"part must be 'valid' or 'test', got {part!r}")
    out = dict(split.train)
    for c in split.test:
        out[c.user] = c.history
    return out


def prefix_cases(seqs: dict[str, EventSeq], min_prefix: int = 1) -> list[Case]:
    """Every next event of every sequence given its prefix (session-rec's "next item" protocol).

    >>> s = EventSeq.from_columns(["a", "b", "c"], [0, 0, 0], [0, 1, 2])
    >>> [(c.history.items, c.target_item) for c in prefix_cases({"s": s})]
    [(['a'], 'b'), (['a', 'b'], 'c')]
    """
    out = []
    for u, s in seqs.items():
        for i in range(max(min_prefix, 1), len(s)):
            out.append(Case(u, s[:i], s.items[i], int(s.actions[i]), int(s.ts[i])))
    return out


def session_split(train_ds: Dataset, test_ds: Dataset, valid_ds: Dataset | None = None, *,
                  drop_unknown: bool = True) -> Split:
    """Session-based split from given train/test files (session-rec protocol).

    ``train`` = the training sessions; ``test`` = every next click of every test session given the
    session prefix (HR@20 / MRR@20 in the literature). Test targets (and their sessions' prefixes)
    whose item never occurs in training are dropped when ``drop_unknown`` (session-rec filters
    test items to the training catalogue). ``valid`` comes from ``valid_ds`` the same way.
    """
    known = set(train_ds.items)

    def cases(ds: Dataset | None) -> list[Case]:
        if ds is None:
            return []
        seqs = ds.sequences
        if drop_unknown:
            seqs = {}
            for u, s in ds.sequences.items():
                keep = [i for i, it in enumerate(s.items) if it in known]
                if len(keep) >= 2:
                    seqs[u] = _take(s, keep)
        return prefix_cases(seqs)

    return Split(dict(train_ds.sequences), cases(valid_ds), cases(test_ds),
                 {"protocol": "session", "dataset": train_ds.name})


def _take(s: EventSeq, idx: list[int]) -> EventSeq:
    if len(idx) == len(s):
        return s
    a = np.asarray(idx, np.int64)
    return EventSeq([s.items[i] for i in idx], s.actions[a], s.ts[a], [s.devices[i] for i in idx],
                    [s.locations[i] for i in idx], [s.categories[i] for i in idx])
