"""``auto``: the training choices that differ between logs, made from the log itself.

A user's log is not one of the shipped datasets, so nothing here looks at a dataset's name. One
:class:`LogProfile` is measured on the sequences the model will train on; :func:`choose` turns it into
model and training settings, each with the reason it was taken (``nextaction train`` prints them).
Values the user set explicitly are kept and reported as such.

Before training (from the profile):

* **validation protocol** -- history *allowed*: production ranks every item, repeats included; the
  best epoch is the one that predicts what the user will really do next (``masked`` on request);
* **window length** -- long enough for 90 % of histories, at least 50 and at most 200 events
  (attention cost grows with the square of the window);
* **softmax** -- full over catalogues of up to 4,096 items, else 4,096 shared sampled negatives;
* **dropout** -- by how often an item is seen: 0.2 at 100+ training events per item (a dense log, as
  MovieLens-1m's 270, where SASRec chose 0.2), else 0.5 (rarely seen items overfit sooner; 0.5 won on
  every shipped log, MovieLens-100k's 58 events per item included);
* **window stride** -- a quarter window when the log gives fewer than 10,000 windows (few, long
  histories: overlapping windows give more, differently cut training sequences), else a whole window;
* **batch and learning rate** -- at least 32 optimiser steps per epoch (batch 256 down to 32), the
  learning rate scaled with the square root of the batch (5e-3 at 256);
* **item categories** -- learned category rows when at least half the events name a category, hashed
  into the smallest power of two of buckets that is at least 8 per distinct category (1,024..65,536):
  two categories sharing a bucket share a row and each other's category-recency score;
* **action prior and action loss** -- a learned row per current action, and the action loss weighted
  1.0 instead of 0.5, when at least two actions each make up 1 % of the events.

After training (on the validation cases, in :mod:`models.train`): the item-transition table's feature
and weight, the item-neighbour table's window and weight (:func:`models.train.fit_neighbours`), the copy strength (:func:`models.train.fit_copy`: how strongly recently seen items are
boosted), the action calibration and the item temperature. The learning-rate schedule is fitted to
the time budget after the first epoch (:func:`models.train.train`).

>>> from models.schema import EventSeq
>>> seqs = {f"u{i}": EventSeq.from_columns([f"i{(i + k) % 300}" for k in range(80)], [0] * 80, range(80))
...         for i in range(200)}
>>> p = LogProfile.measure(seqs, n_items=300)
>>> p.n_sequences, p.p90_length, round(p.events_per_item, 1), p.repeat_share
(200, 80, 53.3, 0.0)
>>> model_kw, train_kw, why = choose(p)
>>> model_kw["max_len"], model_kw["n_negatives"], model_kw["dropout"], train_kw["batch_size"]
(80, 0, 0.5, 32)
>>> print(why[1])
window length 80: 90 % of training histories have at most 80 events (kept within 50..200)
>>> choose(p, given_model={"max_len": 20})[2][1]
'window length 20: set explicitly'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.schema import N_ACTIONS, EventSeq

#: Bounds of the window length auto picks (events).
MIN_WINDOW, MAX_WINDOW = 50, 200
#: Catalogues up to this size train with a full softmax; larger ones with this many sampled negatives.
FULL_SOFTMAX_ITEMS = 4096
SAMPLED_NEGATIVES = 4096
#: Logs with at least this many training events per item are dense: DENSE_DROPOUT, else SPARSE_DROPOUT.
#: 0.5 won on every shipped log (1.5-58 events per item; a 0.3 middle tier lost on three, 0.2 on
#: MovieLens-100k: benchmarks/RESULTS.md, "The defaults on every shipped dataset"); 0.2 is SASRec's
#: choice for MovieLens-1m (270 events per item), so the dense tier starts between the two.
DENSE_EVENTS_PER_ITEM = 100
DENSE_DROPOUT = 0.2
SPARSE_DROPOUT = 0.5
#: Category buckets per distinct category (auto's n_category_buckets), and their bounds. Taobao's head
#: (2,880 training categories) in 1,024 buckets: history-masked test NDCG@10 0.0109 with the
#: category-recency term; in 32,768: 0.0290 (benchmarks/RESULTS.md, "Category recency").
CATEGORY_BUCKETS_PER_CATEGORY = 8
MIN_CATEGORY_BUCKETS, MAX_CATEGORY_BUCKETS = 1024, 65536
#: Fewer training windows than this: overlapping windows (a quarter window apart).
FEW_WINDOWS = 10_000
#: Optimiser steps per epoch auto aims for at least (by lowering the batch to MIN_BATCH).
MIN_STEPS_PER_EPOCH = 32
MAX_BATCH, MIN_BATCH = 256, 32
#: The learning rate at MAX_BATCH (benchmarks/RESULTS.md, "Transformer training", Beauty runs B vs D).
BASE_LR = 5e-3


@dataclass(frozen=True)
class LogProfile:
    """What :func:`choose` looks at, measured on the training sequences."""

    n_sequences: int
    n_events: int
    n_items: int  # the catalogue (every item that can be ranked)
    p90_length: int  # events in the 90th-percentile training history
    events_per_item: float
    repeat_share: float  # share of next events whose item is among the 50 events before it
    category_share: float  # share of events that name an item category
    n_categories: int  # distinct item categories named
    action_shares: tuple[float, ...]  # share of events per action index

    @classmethod
    def measure(cls, sequences: dict[str, EventSeq], n_items: int, lookback: int = 50) -> "LogProfile":
        lengths = np.fromiter((len(s) for s in sequences.values()), np.int64, len(sequences))
        n_events = int(lengths.sum())
        repeats = nexts = cats = 0
        distinct: set[str] = set()
        actions = np.zeros(N_ACTIONS, np.int64)
        for s in sequences.values():
            items = s.items
            last_seen: dict[str, int] = {}
            for i, item in enumerate(items):
                if i:
                    nexts += 1
                    repeats += i - last_seen.get(item, -10**9) <= lookback
                last_seen[item] = i
            named = [c for c in s.categories if c]
            cats += len(named)
            distinct.update(named)
            actions += np.bincount(np.asarray(s.actions, np.int64), minlength=N_ACTIONS)[:N_ACTIONS]
        return cls(n_sequences=len(sequences), n_events=n_events, n_items=int(n_items),
                   p90_length=int(np.percentile(lengths, 90)) if len(lengths) else 0,
                   events_per_item=n_events / max(n_items, 1), repeat_share=round(repeats / max(nexts, 1), 3),
                   category_share=round(cats / max(n_events, 1), 3), n_categories=len(distinct),
                   action_shares=tuple(round(float(a) / max(n_events, 1), 4) for a in actions))

    def windows(self, sequences: dict[str, EventSeq] | None, max_len: int, stride: int) -> int:
        """Training windows of ``max_len`` events every ``stride`` (``models.train.training_windows``)."""
        if sequences is None:
            return 0
        return sum(math.ceil((len(s) - 1) / stride) for s in sequences.values() if len(s) >= 2)

    def summary(self) -> str:
        acts = sum(1 for a in self.action_shares if a >= 0.01)
        return (f"{self.n_sequences:,} histories, {self.n_events:,} events, {self.n_items:,} items "
                f"({self.events_per_item:.1f} events per item), 90th-percentile history {self.p90_length} events, "
                f"{self.repeat_share:.0%} of next items seen in the last 50 events, {acts} action type(s), "
                f"{self.category_share:.0%} of events with a category ({self.n_categories:,} categories)")


def _round_up(n: int, to: int) -> int:
    return int(math.ceil(n / to) * to)


def choose(profile: LogProfile, sequences: dict[str, EventSeq] | None = None, *, given_model: dict | None = None,
           given_train: dict | None = None) -> tuple[dict, dict, list[str]]:
    """``(model settings, training settings, reasons)`` for a log with this ``profile``.

    ``given_model`` / ``given_train``: settings the user set explicitly; they are kept (and the
    choices that depend on them use them). ``sequences`` (the training histories) count the training
    windows for the stride and batch choices; without them the profile's averages stand in."""
    gm, gt = dict(given_model or {}), dict(given_train or {})
    model: dict = {}
    train: dict = {}
    why: list[str] = []

    def pick(target: dict, given: dict, name: str, label: str, value, reason: str) -> object:
        if name in given:
            target[name] = given[name]
            why.append(f"{label} {_show(given[name])}: set explicitly")
        else:
            target[name] = value
            why.append(f"{label} {_show(value)}: {reason}")
        return target[name]

    pick(train, gt, "eval_protocol", "validation protocol", "allowed",
         "checkpoint chosen on next-item ranking with history items allowed, as served")
    max_len = pick(model, gm, "max_len", "window length",
                   min(max(_round_up(max(profile.p90_length, 1), 10), MIN_WINDOW), MAX_WINDOW),
                   f"90 % of training histories have at most {profile.p90_length} events "
                   f"(kept within {MIN_WINDOW}..{MAX_WINDOW})")
    if profile.n_items <= FULL_SOFTMAX_ITEMS:
        pick(model, gm, "n_negatives", "sampled negatives", 0,
             f"full softmax: the catalogue has {profile.n_items:,} items (<= {FULL_SOFTMAX_ITEMS:,})")
    else:
        pick(model, gm, "n_negatives", "sampled negatives", SAMPLED_NEGATIVES,
             f"the catalogue has {profile.n_items:,} items (> {FULL_SOFTMAX_ITEMS:,}): a full softmax per target "
             f"would cost {profile.n_items / SAMPLED_NEGATIVES:.0f}x more")
    epi = profile.events_per_item
    dropout = DENSE_DROPOUT if epi >= DENSE_EVENTS_PER_ITEM else SPARSE_DROPOUT
    pick(model, gm, "dropout", "dropout", dropout, f"{epi:.1f} training events per item ({DENSE_DROPOUT:g} at >= "
         f"{DENSE_EVENTS_PER_ITEM}, else {SPARSE_DROPOUT:g}: rarely seen items overfit sooner)")

    def windows(stride: int) -> int:
        if sequences is not None:
            return profile.windows(sequences, int(max_len), stride)
        per = max(profile.n_events / max(profile.n_sequences, 1) - 1, 1)
        return int(profile.n_sequences * max(1, math.ceil(per / stride)))

    whole = windows(int(max_len))
    stride = int(max_len) if whole >= FEW_WINDOWS else max(int(max_len) // 4, 1)
    stride = pick(train, gt, "window_stride", "window stride", stride,
                  f"{whole:,} windows of {max_len} events (>= {FEW_WINDOWS:,}: one window per {max_len} events)"
                  if whole >= FEW_WINDOWS else
                  f"only {whole:,} windows of {max_len} events (< {FEW_WINDOWS:,}): a window every {stride} events")
    n_windows = windows(int(stride) or int(max_len))
    batch = MAX_BATCH
    while batch > MIN_BATCH and n_windows / batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    batch = pick(train, gt, "batch_size", "batch", batch,
                 f"{n_windows:,} training windows: {math.ceil(n_windows / batch)} steps per epoch "
                 f"(at least {MIN_STEPS_PER_EPOCH} wanted, batch {MIN_BATCH}..{MAX_BATCH})")
    pick(train, gt, "lr", "learning rate", round(BASE_LR * math.sqrt(int(batch) / MAX_BATCH), 5),
         f"{BASE_LR:g} x sqrt(batch / {MAX_BATCH}), warm-up then cosine decay fitted to the time budget")
    cats = profile.category_share >= 0.5
    pick(model, gm, "item_categories", "item categories", cats,
         f"{profile.category_share:.0%} of events name a category ({'>=' if cats else '<'} 50 %)")
    if model["item_categories"]:
        want = CATEGORY_BUCKETS_PER_CATEGORY * max(profile.n_categories, 1)
        buckets = min(max(1 << (want - 1).bit_length(), MIN_CATEGORY_BUCKETS), MAX_CATEGORY_BUCKETS)
        pick(model, gm, "n_category_buckets", "category buckets", buckets,
             f"{profile.n_categories:,} categories: at least {CATEGORY_BUCKETS_PER_CATEGORY} buckets each, a power of "
             f"two within {MIN_CATEGORY_BUCKETS:,}..{MAX_CATEGORY_BUCKETS:,} (few categories share a bucket)")
    n_acts = sum(1 for a in profile.action_shares if a >= 0.01)
    multi = n_acts >= 2
    pick(model, gm, "action_prior", "action prior", multi,
         f"{n_acts} action type(s) with >= 1 % of events" + (": a learned next-action row per current action"
                                                            if multi else ""))
    pick(model, gm, "action_loss_weight", "action loss weight", 1.0 if multi else 0.5,
         "the next action is part of the prediction" if multi else "a single action type: the action head "
         "has little to learn")
    return model, train, why


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def auto_configs(ds, split, model_given: dict | None = None, train_given: dict | None = None, *,
                 base_train: dict | None = None):
    """``(ModelConfig, TrainConfig, profile, reasons)`` for training on ``ds``/``split``: the
    :func:`choose` of its training sequences (as :func:`models.train.validation_and_training` cuts
    them), with ``model_given``/``train_given`` kept as set. ``base_train``: further training settings
    that auto does not choose (budget, threads, ...)."""
    from models.config import ModelConfig, TrainConfig
    from models.train import validation_and_training

    tcfg0 = TrainConfig.from_dict({**(base_train or {}), **(train_given or {})})
    _, _, seqs = validation_and_training(split, tcfg0)
    profile = LogProfile.measure(seqs, len(ds.items))
    model_kw, train_kw, why = choose(profile, seqs, given_model=model_given, given_train=train_given)
    mcfg = ModelConfig.from_dict({**(model_given or {}), **model_kw})
    tcfg = TrainConfig.from_dict({**(base_train or {}), **(train_given or {}), **train_kw})
    return mcfg, tcfg, profile, why
