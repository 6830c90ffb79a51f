"""The replay harness: a time-ordered stream served and learned from with the worker's and the trainer's own code, no broker.

What the pipeline does per event, in process: the user's window (:func:`stream_app.history.add_event`),
a prediction per predictor from the window as of the event, the ``outcomes`` record of the user's
previous prediction (:func:`stream_app.records.outcome_record`, parsed back by
:func:`online.examples.example_from_outcome`), the trainer learning in batches
(:class:`online.trainer.OnlineTrainer`) and its deltas applied to the online predictor every
``events_per_delta`` events (the delta interval at the stream's rate). Every predictor is scored
prequentially on the same outcomes: the target's rank in that predictor's previous top-10 and the
probability it gave the target's action.

Predictors: ``frozen`` (the offline checkpoint, never updated), ``online`` (the same checkpoint plus
the trainer's deltas and full versions) and ``baseline`` (the stream-learning popularity + Markov
predictor, warmed on the offline part).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import orjson

from models.delta import label_parts
from models.predictor import Prediction
from models.schema import ACTIONS, EventSeq
from stream_app.history import add_event, as_of
from stream_app.records import StoredPrediction, outcome_record

EPS = 1e-7


@dataclass
class Stream:
    """A dataset cut in time: the offline part (per-user sequences) and the streamed events after it."""

    name: str
    offline: dict[str, EventSeq]
    events: list[tuple[str, str, int, int, str, str, str]]  # (user, item, action, ts, device, location, category)
    split_ts: int

    @property
    def offline_items(self) -> set[str]:
        return {i for s in self.offline.values() for i in s.items}


def time_split(ds, fraction: float = 0.5, max_stream: int | None = None) -> Stream:
    """Every event of ``ds`` in time order; the first ``fraction`` is the offline part (whole users'
    prefixes), the rest the stream (capped at ``max_stream`` events)."""
    rows = []
    for u, s in ds.sequences.items():
        for j in range(len(s)):
            rows.append((int(s.ts[j]), u, j))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    cut = int(len(rows) * fraction)
    split_ts = rows[cut][0]
    while cut < len(rows) and rows[cut][0] == split_ts and cut > 0 and rows[cut - 1][0] == split_ts:
        cut += 1  # a tie at the cut stays on one side
    offline_len: dict[str, int] = {}
    for ts, u, j in rows[:cut]:
        offline_len[u] = max(offline_len.get(u, 0), j + 1)
    offline = {u: ds.sequences[u][:n] for u, n in offline_len.items()}
    events = []
    for ts, u, j in rows[cut:cut + max_stream if max_stream else None]:
        s = ds.sequences[u]
        events.append((u, s.items[j], int(s.actions[j]), ts, s.devices[j], s.locations[j], s.categories[j]))
    return Stream(ds.name, offline, events, split_ts)


@dataclass
class Scores:
    """Prequential scores of one predictor over the stream, per outcome."""

    position: list[int] = field(default_factory=list)  # stream index of the outcome's event
    ndcg: list[float] = field(default_factory=list)
    hit: list[float] = field(default_factory=list)
    log_loss: list[float] = field(default_factory=list)
    new_item: list[bool] = field(default_factory=list)  # the target was not in the offline catalogue

    def add(self, pos: int, rank: int | None, action_prob: float, new: bool) -> None:
        self.position.append(pos)
        self.ndcg.append(1.0 / math.log2(rank + 1) if rank is not None and rank <= 10 else 0.0)
        self.hit.append(1.0 if rank is not None and rank <= 10 else 0.0)
        self.log_loss.append(-math.log(max(action_prob, EPS)))
        self.new_item.append(new)

    def summary(self) -> dict:
        n = len(self.ndcg)
        new = np.asarray(self.new_item, bool)
        hit = np.asarray(self.hit)
        return {"n": n, "ndcg10": float(np.mean(self.ndcg)) if n else float("nan"),
                "hr10": float(hit.mean()) if n else float("nan"),
                "log_loss": float(np.mean(self.log_loss)) if n else float("nan"),
                "n_new": int(new.sum()), "hr10_new": float(hit[new].mean()) if new.any() else float("nan")}


@dataclass
class Served:
    """One predictor in the harness: its previous prediction per user, and its scores."""

    name: str
    predictor: object
    last: dict[str, StoredPrediction] = field(default_factory=dict)
    scores: Scores = field(default_factory=Scores)


def replay(stream: Stream, checkpoint, *, online_config=None, window_events: int = 50,
           ttl_ms: int = 7 * 24 * 3600 * 1000, batch_events: int = 64, train_batch: int = 256,
           events_per_delta: int = 1000, events_per_full: int = 50_000, baseline: bool = True,
           frozen: bool = True, progress: bool = True, device: str = "cpu") -> dict:
    """Serve and learn ``stream`` (module docstring); return per-predictor scores and the trainer's figures."""
    from models.checkpoint import load_checkpoint
    from models.progress import progress as progress_bar
    from models.serving import TransformerPredictor
    from online.baseline import PopularityMarkovPredictor
    from online.examples import example_from_outcome
    from online.trainer import OnlineTrainer

    ck = load_checkpoint(checkpoint, device=device)
    trainer = OnlineTrainer(ck.model, ck.vocab, ck.version, online_config, device=device)
    served = [Served("online", TransformerPredictor.from_checkpoint(checkpoint, device=device, num_threads=1))]
    if frozen:
        served.append(Served("frozen", TransformerPredictor.from_checkpoint(checkpoint, device=device,
                                                                           num_threads=1)))
    if baseline:
        b = PopularityMarkovPredictor()
        for seq in stream.offline.values():  # warmed on the offline part, as it would have learned it
            for j in range(1, len(seq) + 1):
                b.observe(seq[:j])
        served.append(Served("baseline", b))
    windows = {u: s.tail(window_events) for u, s in stream.offline.items()}
    known = stream.offline_items
    pending = []
    learn_s = 0.0
    learned = 0
    since_delta = since_full = 0
    n_deltas = n_full = 0
    t0 = time.perf_counter()
    bar = progress_bar(total=len(stream.events), unit="ev", enabled=progress, desc=f"replay {stream.name}")
    def serve(requests: list) -> None:
        """Predict a micro-batch (no user twice in it: each event is served before the user's next)."""
        for s in served:
            hs = [h for _, _, h, _ in requests]
            preds = s.predictor.predict(hs, 10, [u for _, u, _, _ in requests])
            for (pos, u, h, ts), pr in zip(requests, preds):
                s.last[u] = StoredPrediction(str(s.predictor.version), ts, 0, pos, _normalised(pr))
            if s.predictor.learns:
                for h in hs:
                    s.predictor.observe(h)

    requests = []  # (position, user, history as of the event, event time) of the micro-batch being filled
    in_batch: set[str] = set()
    for pos, (u, item, action, ts, dev, loc, cat) in enumerate(stream.events):
        if u in in_batch or len(requests) >= batch_events:
            serve(requests)
            requests, in_batch = [], set()
        before = windows.get(u, EventSeq.empty())
        w = add_event(before, item, action, ts, max_events=window_events, ttl_ms=ttl_ms, device=dev,
                      location=loc, category=cat)
        windows[u] = w
        act = ACTIONS[action]
        for s in served:
            last = s.last.get(u)
            if last is None:
                continue
            p = last.prediction
            rank = next((n for n, (i, _) in enumerate(p.top_items, 1) if i == item), None)
            s.scores.add(pos, rank, p.action_probs[action], item not in known)
            if s.name == "online":
                rec = outcome_record(u, last, served=as_of(before, last.event_ts), action=act, item_id=item,
                                     category=cat, event_ts=ts, partition=0, offset=pos)
                try:
                    pending.append(example_from_outcome(orjson.loads(rec)))
                except ValueError:
                    pass
        requests.append((pos, u, as_of(w, ts), ts))
        in_batch.add(u)
        while len(pending) >= train_batch:
            tl = time.perf_counter()
            trainer.learn(pending[:train_batch])
            learn_s += time.perf_counter() - tl
            learned += train_batch
            pending = pending[train_batch:]
        since_delta += 1
        since_full += 1
        if since_delta >= events_per_delta:
            since_delta = 0
            serve(requests)  # what arrived before the delta is served by the weights before it
            requests, in_batch = [], set()
            for d in trainer.deltas({"position": pos + 1}):
                served[0].predictor.apply_delta(d)
                n_deltas += 1
        if since_full >= events_per_full:  # a full version: the online predictor takes all the weights
            since_full = 0
            serve(requests)
            requests, in_batch = [], set()
            served[0].predictor = _full_swap(trainer, served[0].predictor, device)
            n_full += 1
        bar.update(1)
    if requests:
        serve(requests)
    bar.close()
    out = {s.name: s.scores for s in served}
    return {"scores": out, "learned": learned, "learn_seconds": learn_s,
            "examples_per_s": learned / learn_s if learn_s else float("nan"), "deltas": n_deltas,
            "full_versions": n_full, "seconds": time.perf_counter() - t0, "trainer": dict(trainer.stats),
            "vocabulary": len(trainer.vocab.items), "offline_items": len(known)}


def _normalised(p: Prediction) -> Prediction:
    """What the batcher publishes: action probabilities summing to exactly 1."""
    total = math.fsum(p.action_probs)
    return Prediction([x / total for x in p.action_probs], p.top_items, p.next_gap_s)


def _full_swap(trainer, current, device: str):
    """The trainer's whole model as the next served version (what a full version does), in memory."""
    import copy

    from models.serving import TransformerPredictor

    trainer.deltas()  # the chain stays whole up to the full version
    model = copy.deepcopy(trainer.model).eval()
    vocab = type(trainer.vocab)(trainer.vocab.items, trainer.vocab.n_hash_buckets)
    _, seq = label_parts(trainer.version)
    version = f"full{seq}"  # a new lineage label, as a new checkpoint's hash would be
    trainer.rebase(version)
    return TransformerPredictor(model, vocab, version=version, device=device, num_threads=1)


def switched(stream: Stream, at: float = 0.25) -> tuple[Stream, int]:
    """``stream`` with its behaviour switched at ``at`` of the streamed events: from there on, every item
    is replaced by the item half a category away (same category, another item's popularity and
    successors), so what was learned offline about items is wrong from a known event on. Returns the
    new stream and the switch's event index."""
    by_cat: dict[str, list[str]] = {}
    for s in stream.offline.values():
        for item, cat in zip(s.items, s.categories):
            by_cat.setdefault(cat, [])
            if item not in by_cat[cat]:
                by_cat[cat].append(item)
    swap = {}
    for items in by_cat.values():
        items.sort()
        for k, item in enumerate(items):
            swap[item] = items[(k + len(items) // 2) % len(items)]
    cut = int(len(stream.events) * at)
    events = stream.events[:cut] + [(u, swap.get(i, i), *rest) for u, i, *rest in stream.events[cut:]]
    return Stream(f"{stream.name} (switched)", stream.offline, events, stream.split_ts), cut


def recovery(scores: Scores, switch: int, window: int = 1000) -> dict:
    """Pre-switch level (mean NDCG@10 over the ``window`` outcomes before ``switch``), the lowest rolling
    mean after it, and the events after the switch until the rolling mean is back within 10 % of the
    pre-switch level (None: never within the stream)."""
    pos, y = np.asarray(scores.position), np.asarray(scores.ndcg)
    before = y[pos < switch][-window:]
    after_pos, after = pos[pos >= switch], y[pos >= switch]
    pre = float(before.mean()) if before.size else float("nan")
    if after.size < window:
        return {"pre": pre, "low": float("nan"), "back_after_events": None}
    roll = np.convolve(after, np.ones(window) / window, mode="valid")
    back = np.nonzero(roll >= 0.9 * pre)[0]
    return {"pre": pre, "low": float(roll.min()), "end": float(roll[-1]),
            "back_after_events": int(after_pos[back[0] + window - 1] - switch) if back.size else None}
