"""Dataset loaders: real logs to per-user :class:`~models.schema.EventSeq`, plus the splits.

``load(name, root=None, **opts)`` understands:

=================  ============================================================================
``ml-100k``        MovieLens 100K ``u.data``; ratings as ``view`` events, equal timestamps keep file
                   order. Opt ``min_rating`` (default 0 = keep all).
``taobao``         Taobao UserBehavior head (truncated last line dropped); pv/cart/fav/buy.
                   Opt ``official_window=True`` drops the 35 outlier timestamps.
``taobao-slice``   the time-ordered 2-hour Taobao slice.
``beauty``         Amazon Beauty (S3-Rec ``user item1 item2 ...``), no time.
``games``          Amazon Video Games (SASRec ``user item`` rows), no time.
``yoochoose``      YOOCHOOSE 100k clicks, sessions as users. Opt ``split``: ``all`` (default:
                   train_full + test), ``train_full``, ``test``, ``train_tr``, ``train_valid``.
``synthetic``      :func:`~models.datasets.synthetic.synthetic` (opts passed through); options
                   also in the name: ``synthetic:n_items=500,seed=3`` (integers).
``csv:PATH``       :func:`~models.datasets.generic.load_csv` (opts: ``columns``, ``delimiter``,
                   ``header``, ``time_unit``, ``action_map``, ``lenient`` ...).
``parquet:PATH``   needs pyarrow (not installed: a clear :class:`DatasetError`).
=================  ============================================================================

Datasets without time get ``ts = index * 60 s`` per user and ``has_time=False``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from models.datasets.core import (Case, Dataset, Split, _take, dataset_from_columns, datasets_root, fit_sequences,
                                  leave_one_out,
                                  prefix_cases, session_split)
from models.datasets.generic import load_csv, load_parquet, load_sequence_lines
from models.datasets.synthetic import synthetic
from models.errors import DatasetError

__all__ = ["Case", "Dataset", "Split", "load", "leave_one_out", "fit_sequences", "session_split", "prefix_cases",
           "yoochoose_split", "datasets_root", "dataset_from_columns", "load_csv", "load_sequence_lines",
           "load_parquet", "synthetic", "load_split", "NAMES"]

NAMES = ("ml-100k", "taobao", "taobao-slice", "beauty", "games", "yoochoose", "synthetic")

_YC_FILES = {"train_full": "yoochoose-clicks-100k_train_full.txt", "test": "yoochoose-clicks-100k_test.txt",
             "train_tr": "yoochoose-clicks-100k_train_tr.txt",
             "train_valid": "yoochoose-clicks-100k_train_valid.txt"}
# Taobao official window 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 China time (UTC+8), in ms
_TB_WINDOW_MS = (1511539200_000, 1512316799_000)


def _file(root: Path, folder: str, fname: str) -> Path:
    p = root / folder / fname
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p} (set NEXTACTION_DATASETS or pass root=)")
    return p


def load(name: str, root: Path | str | None = None, **opts) -> Dataset:
    """Load a dataset by name (see the module doc). ``root`` defaults to :func:`datasets_root`."""
    if name.startswith("csv:"):
        return load_csv(name[4:], **opts)
    if name.startswith("parquet:"):
        return load_parquet(name[8:], **opts)
    if name.startswith("seq:"):
        return load_sequence_lines(name[4:], **opts)
    if name == "synthetic" or name.startswith("synthetic:"):
        opts = _name_options(name) | opts
        unknown = sorted(set(opts) - set(inspect.signature(synthetic).parameters))
        if unknown:
            raise DatasetError(f"synthetic: unknown options {unknown}; known: "
                               f"{', '.join(inspect.signature(synthetic).parameters)}")
        return synthetic(**opts)
    r = datasets_root(root)
    if name in ("ml-100k", "movielens-100k", "ml100k"):
        min_rating = opts.pop("min_rating", 0)
        ds = load_csv(_file(r, "movielens-100k", "u.data"), columns={"user": 0, "item": 1, "time": 3},
                      delimiter="\t", header=False, time_unit="s", name="ml-100k", **opts)
        if min_rating:
            raise DatasetError("ml-100k: min_rating filtering is not implemented (ratings are not kept)")
        return ds
    if name in ("taobao", "taobao-head", "taobao-slice"):
        folder = "taobao-userbehavior-timeslice" if name == "taobao-slice" else "taobao-userbehavior-head"
        window = opts.pop("official_window", False)
        ds = load_csv(_file(r, folder, "UserBehavior.csv"),
                      columns={"user": 0, "item": 1, "category": 2, "action": 3, "time": 4},
                      delimiter=",", header=False, time_unit="s", name=name if name != "taobao-head" else "taobao",
                      **opts)
        if window:
            lo, hi = _TB_WINDOW_MS
            seqs = {}
            for u, s in ds.sequences.items():
                m = np.flatnonzero((s.ts >= lo) & (s.ts <= hi))
                if m.size:
                    seqs[u] = s if m.size == len(s) else _take(s, m.tolist())
            ds.sequences = seqs
            ds.meta["official_window"] = True
        return ds
    if name == "beauty":
        return load_sequence_lines(_file(r, "amazon-beauty-s3rec", "Beauty.txt"), name="beauty")
    if name == "games":
        return load_csv(_file(r, "amazon-games-sasrec", "Video.txt"), columns={"user": 0, "item": 1},
                        delimiter="ws", header=False, name="games", **opts)
    if name in ("yoochoose", "rsc15"):
        split = opts.pop("split", "all")
        parts = ["train_full", "test"] if split == "all" else [split]
        if any(p not in _YC_FILES for p in parts):
            raise DatasetError(f"yoochoose split must be one of all/{'/'.join(_YC_FILES)}, got {split!r}")
        dss = [load_csv(_file(r, "yoochoose-clicks-100k", _YC_FILES[p]),
                        columns={"user": "SessionId", "item": "ItemId", "time": "Time"}, delimiter="\t",
                        header=True, time_unit="s", name=f"yoochoose-{p}", **opts) for p in parts]
        if len(dss) == 1:
            dss[0].name = "yoochoose" if split == "all" else f"yoochoose-{split}"
            return dss[0]
        seqs = {}
        items = list(dss[0].items)
        seen = set(items)
        for d in dss:
            seqs.update(d.sequences)  # session ids are disjoint between train_full and test
            items += [i for i in d.items if i not in seen and not seen.add(i)]
        return Dataset("yoochoose", seqs, items, True, False, {"split": split, "files": [d.meta for d in dss]})
    raise DatasetError(f"unknown dataset {name!r}; expected one of {NAMES} or csv:PATH / parquet:PATH")


def _name_options(name: str) -> dict[str, int]:
    """Integer options given in a dataset name, ``synthetic:n_items=500,seed=3``.

    >>> _name_options("synthetic:n_items=500, seed=3"), _name_options("synthetic")
    ({'n_items': 500, 'seed': 3}, {})
    """
    _, _, spec = name.partition(":")
    opts: dict[str, int] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = (x.strip() for x in pair.partition("="))
        try:
            opts[key] = int(value)
        except ValueError:
            raise DatasetError(f"{name!r}: {pair!r} is not KEY=INTEGER") from None
        if not sep or not key.isidentifier():
            raise DatasetError(f"{name!r}: {pair!r} is not KEY=INTEGER")
    return opts


def load_split(name: str, root: Path | str | None = None) -> tuple[Dataset, Split]:
    """``(dataset, split)`` as training and the benchmarks use them: the session-rec split for
    ``yoochoose``, leave-one-out for everything else (:func:`load` names)."""
    if name == "yoochoose":
        return yoochoose_split(root)
    ds = load(name, root)
    return ds, leave_one_out(ds)


def yoochoose_split(root: Path | str | None = None, *, tune: bool = False) -> tuple[Dataset, Split]:
    """The session-rec split of YOOCHOOSE: train on ``train_full``, test every next click of the
    ``test`` sessions (``tune=True``: train on ``train_tr``, test on ``train_valid``).

    Returns ``(catalogue dataset, split)``; the dataset's ``items`` are the training items (every
    test item occurs in training) and ``sequences`` the training sessions.
    """
    tr, te = ("train_tr", "train_valid") if tune else ("train_full", "test")
    train = load("yoochoose", root, split=tr)
    test = load("yoochoose", root, split=te)
    sp = session_split(train, test)
    sp.meta.update({"train_file": tr, "test_file": te, "test_sessions": len(test.sequences)})
    train.name = "yoochoose"
    return train, sp
