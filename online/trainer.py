"""The online trainer: learns from outcomes, scored first, and says what to publish (no Kafka here).

:class:`OnlineTrainer` takes batches of :class:`~online.examples.Example` (``outcomes`` records) and,
per batch, in this order:

1. **scores before learning** (prequential): every example is scored by the version that served it
   (its record: the target's rank in the served top-10 and the served action probability) into
   :class:`~online.prequential.Prequential`, whose per-example loss feeds the drift monitor
   (:class:`~online.drift.DriftMonitor`, river ADWIN); the same example is scored by a **frozen
   shadow** (the model the trainer started from) into the :class:`~online.guardrails.ShadowComparator`;
2. **filters**: an out-of-order target, or a user over the per-minute cap
   (:class:`~online.guardrails.UserRateLimit`), is not learned;
3. **new items**: a target item the vocabulary does not know gets a row (:func:`models.delta.add_items`),
   not zeros: its **text row** when the checkpoint has a text projection and the item has text (the
   outcome's ``item_text``, else the catalogue's: :class:`models.text.TextRows`, the row the workers
   served it with), else the mean row of items seen with its category (or its hash bucket), either
   moved a quarter of the way to the window's last item; beyond ``max_new_items`` online rows, the one
   seen least recently is reused;
4. **transition counts** of (window's last item → target) are added to the model's table rows;
5. **one step** on the new examples plus a replay sample (:class:`~online.replay.ReplayBuffer`),
   loss on the outcome position only (``last_only``), guarded (:class:`~online.guardrails.StepGuard`:
   a NaN/inf loss or an exploding gradient skips the step and restores the last good weights).
   Item rows (embedding, bias) learn with Adagrad and only on the rows of the batch's targets and
   inputs — so the rows that changed are known exactly and ship as a small delta; the rest of the
   model learns with Adam and ships with full versions. A drift detection raises the learning rate and
   the share of recent examples for a while.

:meth:`OnlineTrainer.deltas` returns the :class:`~models.delta.ModelDelta`\\ s that carry the rows
changed since the last call (applied to the trainer's own model as well, so the trainer holds exactly
what the workers serve plus its dense weights); :meth:`OnlineTrainer.rebase` starts a new chain after
a full version; :meth:`OnlineTrainer.should_rollback` / :meth:`OnlineTrainer.restore` implement the
shadow rollback. The service that reads ``outcomes`` and publishes is :mod:`stream_app.training`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from models.delta import ModelDelta, add_items, apply_delta, label, label_parts, make_delta
from models.encoding import ItemVocab, collate, encode
from models.features import first_item
from online.drift import Adaptation, DriftMonitor
from online.examples import Example, training_batch, usable
from online.guardrails import ShadowComparator, StepGuard, UserRateLimit, total_grad_norm
from online.prequential import Prequential, ndcg_at
from online.replay import ReplayBuffer

log = logging.getLogger(__name__)

#: Transition-table entries per delta record (8 bytes each: 320 KB, with the item rows under 1 MB).
MAX_DELTA_SUCCESSORS = 40_000


@dataclass(frozen=True)
class OnlineConfig:
    """How the trainer learns (defaults: benchmarks/RESULTS.md, "Online learning")."""

    dense_lr: float = 1e-4  # Adam, encoder and heads (shipped with full versions)
    sparse_lr: float = 0.2  # Adagrad, item rows (shipped with deltas) ...
    sparse_accumulator: float = 1.0  # ... its initial accumulator (the first steps are ~lr * g / sqrt(this))
    replay_ratio: float = 1.0  # replayed examples per new example in a step
    replay_recent: int = 5_000  # the replay buffer: the latest examples ...
    replay_reservoir: int = 20_000  # ... and a uniform sample of older ones
    recent_fraction: float = 0.5  # share of a replay sample drawn from the recent part
    max_new_items: int = 20_000  # rows the vocabulary may add online (then the coldest is reused)
    user_per_minute: int = 60  # examples learned per user per minute of event time (bots)
    shadow_window: int = 2_000  # rollback: online vs frozen shadow NDCG@10 over this many examples ...
    shadow_margin: float = 0.02  # ... online worse than shadow by more than this (absolute) ...
    shadow_min: int = 500  # ... with at least this many examples in the window
    drift_detector: str = "adwin"  # on the prequential action log loss
    grad_clip: float = 1.0
    remember_every: int = 10  # good steps between snapshots of the last good weights
    transition_prior: float = 20.0  # pseudo-count total of a checkpoint row stored as probabilities
    max_delta_rows: int = 2_000  # item rows per delta record (Kafka's 1 MB default: models/delta.py)
    text_items: bool = True  # a new item with text starts from its text row (needs a text projection)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dense_lr", "sparse_lr", "sparse_accumulator", "transition_prior"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OnlineConfig.{name} must be > 0 (got {getattr(self, name)!r})")
        for name in ("replay_recent", "replay_reservoir", "max_new_items", "user_per_minute", "shadow_window",
                     "shadow_min", "remember_every", "max_delta_rows"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"OnlineConfig.{name} must be an integer >= 1 (got {getattr(self, name)!r})")
        if not (self.replay_ratio >= 0 and 0 <= self.recent_fraction <= 1):
            raise ValueError(f"OnlineConfig: replay_ratio >= 0 and recent_fraction in [0, 1] "
                             f"(got {self.replay_ratio!r}, {self.recent_fraction!r})")


@dataclass
class StepReport:
    """What one :meth:`OnlineTrainer.learn` call did."""

    examples: int = 0
    learned: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count (out_of_order, rate_limited)
    replayed: int = 0
    new_items: int = 0
    text_rows: int = 0  # of the new items, those started from their text row
    reused_rows: int = 0
    loss: float | None = None
    step_refused: str | None = None  # the guard's reason, when the step was skipped
    drift: bool = False
    seconds: float = 0.0


def category_bucket(category: str, n_buckets: int) -> int:
    """The category bucket an ``item_categories`` model reads (as training computes it; 0 = none)."""
    return 1 + zlib.crc32(category.encode("utf-8")) % n_buckets if category else 0


class OnlineTrainer:
    """See the module docstring. ``version`` is the label of the weights the workers serve from this
    trainer (``base`` or ``base+seq``)."""

    def __init__(self, model, vocab: ItemVocab, version: str, config: OnlineConfig | None = None,
                 device: str = "cpu", text_projection=None, text_catalogue: dict[str, str] | None = None,
                 text_encoder=None) -> None:
        self.cfg = config or OnlineConfig()
        #: the checkpoint's :class:`models.text.TextProjection` (cold-start items from text), or None: kept
        #: so that the full versions this trainer saves keep it (the workers' text rows need it), and
        #: used to start new items with text at their text rows (``text_catalogue``: item id -> text for
        #: outcomes without ``item_text``; ``text_encoder``: a :class:`models.text.TextEncoder` to share)
        self.text_projection = text_projection
        self.text_catalogue = text_catalogue or {}  # TextRows keeps its own copy
        self._text_encoder = text_encoder
        self._text: Any = None  # the TextRows over text_projection, built on first use
        self._text_failed = False
        self.device = torch.device(device)
        self._rng = np.random.default_rng(self.cfg.seed)
        self.shadow = copy.deepcopy(model).to(self.device).eval()
        self.shadow_vocab = ItemVocab(vocab.items, vocab.n_hash_buckets)
        self.prequential = Prequential(window=self.cfg.shadow_window)
        self.drift = DriftMonitor(self.cfg.drift_detector, adaptation=Adaptation(
            base_recent_fraction=self.cfg.recent_fraction))
        self.comparator = ShadowComparator(self.cfg.shadow_window, self.cfg.shadow_margin, self.cfg.shadow_min)
        self.rate = UserRateLimit(self.cfg.user_per_minute)
        self.replay: ReplayBuffer[Example] = ReplayBuffer(self.cfg.replay_recent, self.cfg.replay_reservoir,
                                                           seed=self.cfg.seed)
        self.guard = StepGuard()
        self.compared_bases: set[str] = set()  # served bases in the comparator since the last rollback
        self.superseded: set[str] = set()  # bases rolled back from: their outcomes are not compared
        self.stats = {"examples": 0, "learned": 0, "steps": 0, "refused_steps": 0, "restores": 0, "new_items": 0,
                      "text_rows": 0, "text_errors": 0, "reused_rows": 0, "drifts": 0, "deltas": 0, "rollbacks": 0}
        self.next_seq = 1
        self._load(model, vocab, version)

    # ------------------------------------------------------------------ state
    def _load(self, model, vocab: ItemVocab, version: str) -> None:
        """Start learning from ``model`` (its label ``version``): optimizers, counters and caches afresh."""
        self.model = model.to(self.device)
        self.vocab = vocab
        self.base, self.chain = label_parts(version)
        self.trained_items = len(vocab)  # rows from here on were added online (and may be reused)
        self.first = first_item(vocab.n_hash_buckets)
        sparse = [self.model.item_emb.weight, self.model.item_bias]
        ids = {id(p) for p in sparse}
        dense = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        # Adagrad: a row with a zero gradient stays exactly as it is (the rows that change are known);
        # the initial accumulator makes the first steps SGD-sized instead of lr per coordinate
        self.sparse_opt = torch.optim.Adagrad(sparse, lr=self.cfg.sparse_lr,
                                              initial_accumulator_value=self.cfg.sparse_accumulator)
        self.dense_opt = torch.optim.Adam(dense, lr=self.cfg.dense_lr)
        self.touched: set[int] = set()
        self.trans_touched: set[int] = set()
        self.counts: dict[int, dict[int, float]] = {}
        self.last_seen: OrderedDict[int, None] = OrderedDict()  # online rows, least recently seen first
        self.cat_rows: dict[str, list[int]] = {}
        self.guard.remember(self.model, None)
        self._steps_since_remember = 0

    @property
    def version(self) -> str:
        return label(self.base, self.chain)

    def rebase(self, version: str) -> None:
        """A full version of these weights was published as ``version``: the next delta follows it."""
        self.base, self.chain = label_parts(version)
        self.touched.clear()
        self.trans_touched.clear()

    def restore(self, model, vocab: ItemVocab, version: str, text_projection=None) -> None:
        """Continue from ``model`` (a rollback to the last good version): weights, optimizers and
        online rows as they were then (and its ``text_projection``); the shadow, the counters and the
        replay buffer stay."""
        self._load(model, vocab, version)
        if text_projection is not self.text_projection:
            self.text_projection, self._text = text_projection, None
        self.comparator.reset()
        # outcomes still in flight from the versions rolled back from do not count against this one
        self.superseded.update(self.compared_bases)
        self.compared_bases.clear()
        while len(self.superseded) > 1000:
            self.superseded.pop()
        self.stats["rollbacks"] += 1

    def should_rollback(self) -> bool:
        """Has the served model been worse than the frozen shadow by the margin over the window?"""
        return self.comparator.should_rollback()

    def forget_user(self, user_id: str) -> int:
        """Drop what the trainer keeps of ``user_id`` (a privacy deletion): its examples in the replay
        buffer and its rate-limit timestamps; returns the number of examples dropped. What earlier
        steps learned from them stays in the weights (docs/privacy.md)."""
        self.rate.forget(user_id)
        return self.replay.discard(lambda ex: ex.user_id == user_id)

    # ------------------------------------------------------------------ learning
    def learn(self, examples: Sequence[Example]) -> StepReport:
        t0 = time.perf_counter()
        rep = StepReport(examples=len(examples))
        if not examples:
            return rep
        self.stats["examples"] += len(examples)
        self._score(examples, rep)
        keep = []
        for ex in examples:
            why = usable(ex) or (None if self.rate.allow(ex.user_id, ex.ts) else "rate_limited")
            if why:
                rep.skipped[why] = rep.skipped.get(why, 0) + 1
            else:
                keep.append(ex)
        if keep:
            self._new_items(keep, rep)
            self._count_transitions(keep)
            lr_mult, recent = self.drift.adaptation.current()
            replayed = self.replay.sample(int(round(len(keep) * self.cfg.replay_ratio)), recent)
            rep.replayed = len(replayed)
            self._step(keep + replayed, lr_mult, rep)
            for ex in keep:
                self.replay.add(ex)
            rep.learned = len(keep)
            self.stats["learned"] += len(keep)
        rep.seconds = time.perf_counter() - t0
        return rep

    @torch.no_grad()
    def _score(self, examples: Sequence[Example], rep: StepReport) -> None:
        """Prequential scores of the served versions, drift on their loss, and the shadow's ranks."""
        for ex in examples:
            s = self.prequential.update(ex.served_version, ex.item_rank, ex.action_prob)
            if self.drift.update(s.log_loss):
                rep.drift = True
                self.stats["drifts"] += 1
                log.warning("drift detected on the prequential action log loss (%d so far): learning rate x%.1f "
                            "and %.0f%% recent examples for %d steps", self.drift.detections,
                            self.drift.adaptation.lr_multiplier, 100 * self.drift.adaptation.recent_fraction,
                            self.drift.adaptation.steps)
        compared = [ex for ex in examples if label_parts(ex.served_version)[0] not in self.superseded]
        for ex, rank in zip(compared, self.shadow_ranks(compared)):
            self.comparator.update(ndcg_at(ex.item_rank), ndcg_at(rank))
            self.compared_bases.add(label_parts(ex.served_version)[0])

    @torch.no_grad()
    def shadow_ranks(self, examples: Sequence[Example]) -> list[int | None]:
        """The 1-based rank of each target among the shadow's known items for the served window
        (``None``: the shadow does not know the item)."""
        out: list[int | None] = []
        first = self.shadow.first_item
        for s in range(0, len(examples), 256):
            part = examples[s:s + 256]
            batch = collate([encode(ex.window, self.shadow_vocab, self.shadow.cfg) for ex in part])
            scores = self.shadow.score_last({k: v.to(self.device) for k, v in batch.items()})["item_scores"]
            for b, ex in enumerate(part):
                t = self.shadow_vocab.index(ex.item) if ex.item in self.shadow_vocab else None
                out.append(None if t is None else 1 + int((scores[b, first:] > scores[b, t]).sum()))
        return out

    def _new_items(self, examples: Sequence[Example], rep: StepReport) -> None:
        for ex in examples:  # categories seen with known rows, for initialising new ones
            for item, cat in zip(ex.window.items, ex.window.categories):
                if cat and item in self.vocab:
                    self._note_category(cat, self.vocab.index(item))
        fresh = [ex for ex in dict((ex.item, ex) for ex in examples if ex.item not in self.vocab).values()]
        if not fresh:
            return
        n_cat = self.model.cfg.n_category_buckets
        cats = [category_bucket(ex.category, n_cat) for ex in fresh] if self.model.cat_emb is not None else None
        free = self.cfg.max_new_items - (len(self.vocab) - self.trained_items)
        append, reuse = fresh[:max(free, 0)], fresh[max(free, 0):]
        rows = add_items(self.model, self.vocab, [ex.item for ex in append], cats[:len(append)] if cats else None)
        self.model.resize_optimizer_state(self.sparse_opt)
        for ex in reuse:  # the vocabulary is full: the online row seen least recently takes the new item
            row = next(iter(self.last_seen))
            self._reuse(row, ex.item)
            rows.append(row)
            rep.reused_rows += 1
            self.stats["reused_rows"] += 1
        rep.text_rows += self._init_rows(rows, [ex for ex in append + reuse])
        rep.new_items += len(rows)
        self.stats["new_items"] += len(rows)
        self.guard.remember(self.model, None)  # the snapshot must have the grown shapes

    def _reuse(self, row: int, item: str) -> None:
        """Give the online ``row`` to ``item``: its old item becomes unknown, its transitions and
        neighbours go."""
        self.vocab.set_items([row], [item])
        self.model.clear_neighbours([row])
        self.last_seen.pop(row, None)
        self.counts.pop(row, None)
        self.trans_touched.add(row)
        for src, succ in self.counts.items():
            if succ.pop(row, None) is not None:
                self.trans_touched.add(src)

    @torch.no_grad()
    def _init_rows(self, rows: list[int], examples: Sequence[Example]) -> int:
        """A new item's row: its text row if it has text and the model a text projection (the row
        and bias the workers served it with, :meth:`_text_rows`), else the mean row of items seen
        with its category (else what an unknown id reads: its hash bucket); either moved a quarter
        of the way to the row of the item before it (what the item is, and what it follows:
        benchmarks/RESULTS.md, "New items learned online"). Returns how many started from text."""
        m = self.model
        w = m.item_emb.weight
        from_text = self._text_rows(examples)
        for row, ex in zip(rows, examples):
            known = self.cat_rows.get(ex.category) if ex.category else None
            if ex.item in from_text:
                r, b = from_text[ex.item]
                emb, bias = torch.as_tensor(r, device=w.device).to(w.dtype), float(b)
            elif known:
                idx = torch.as_tensor(known, device=w.device)
                emb, bias = w[idx].mean(0), m.item_bias[idx].mean()
            else:
                b = self.vocab.bucket(ex.item)
                emb, bias = w[b].clone(), m.item_bias[b].clone()
            prev = self.vocab.index(ex.window.items[-1])
            if prev >= self.first:
                emb = 0.75 * emb + 0.25 * w[prev]
            w[row] = emb
            m.item_bias[row] = bias
            m.item_input[row] = row
            self.touched.add(row)
            self.last_seen[row] = None
            if ex.category:
                self._note_category(ex.category, row)
        self.stats["text_rows"] += len(from_text)
        return len(from_text)

    def _text_rows(self, examples: Sequence[Example]) -> dict[str, tuple[np.ndarray, float]]:
        """item -> (row, bias) from the text projection, for those of ``examples`` with text (their
        ``item_text``, else :attr:`text_catalogue`'s). Empty without a projection, with
        ``text_items`` off, or once the encoder failed (logged once, counted in ``text_errors``):
        those items start as without text."""
        if self.text_projection is None or not self.cfg.text_items or self._text_failed:
            return {}
        try:
            if self._text is None:  # the sentence model loads when an item first has text (TextRows.rows)
                from models.text import TextRows  # noqa: PLC0415

                self._text = TextRows(self.text_projection, self.text_catalogue, encoder=self._text_encoder)
            ids, rows, bias = self._text.rows([ex.item for ex in examples], [ex.item_text or None for ex in examples])
        except Exception as exc:  # noqa: BLE001 - a missing package or a broken model must not stop learning
            self.stats["text_errors"] += 1
            self._text_failed = True
            log.warning("new items start without their text from now on: the text rows failed (%s: %s)",
                        type(exc).__name__, exc)
            return {}
        return {i: (rows[k], float(bias[k])) for k, i in enumerate(ids)}

    def _note_category(self, cat: str, row: int, keep: int = 64) -> None:
        rows = self.cat_rows.setdefault(cat, [])
        if row not in rows:
            rows.append(row)
            if len(rows) > keep:
                del rows[0]

    # ------------------------------------------------------------------ transitions
    def _count_transitions(self, examples: Sequence[Example]) -> None:
        cfg = self.model.cfg
        if cfg.transition_top == 0 or cfg.transition_weight == 0:
            return
        for ex in examples:
            src, dst = self.vocab.index(ex.window.items[-1]), self.vocab.index(ex.item)
            if src < self.first or dst < self.first:
                continue
            row = self.counts.get(src)
            if row is None:
                row = self.counts[src] = self._row_counts(src)
            row[dst] = row.get(dst, 0.0) + 1.0
            if len(row) > cfg.transition_top:
                del row[min(row, key=row.get)]
            self.trans_touched.add(src)
        self._write_transition_rows(sorted(self.trans_touched))

    def _row_counts(self, row: int) -> dict[int, float]:
        """The counts behind a table row of the model (its stored values are a feature of them)."""
        m = self.model
        if not m.trans_ptr.numel():
            return {}
        a, b = int(m.trans_ptr[row]), int(m.trans_ptr[row + 1])
        idx, val = m.trans_idx[a:b].tolist(), m.trans_val[a:b].tolist()
        if m.cfg.transition_feature == "log":
            return {j: math.expm1(v) for j, v in zip(idx, val)}
        return {j: v * self.cfg.transition_prior for j, v in zip(idx, val)}

    def _write_transition_rows(self, rows: list[int]) -> None:
        feature = self.model.cfg.transition_feature
        ptr, idx, val = [0], [], []
        for r in rows:
            succ = sorted(self.counts.get(r, {}).items(), key=lambda kv: (-kv[1], kv[0]))
            total = sum(c for _, c in succ) or 1.0
            idx += [j for j, _ in succ]
            val += [math.log1p(c) if feature == "log" else c / total for _, c in succ]
            ptr.append(len(idx))
        self.model.set_transition_rows(rows, ptr, idx, val)

    # ------------------------------------------------------------------ the step
    def _step(self, examples: Sequence[Example], lr_mult: float, rep: StepReport) -> None:
        m = self.model
        batch = {k: v.to(self.device) for k, v in training_batch(examples, self.vocab, m.cfg).items()}
        allowed = torch.unique(batch["item"])
        allowed = allowed[allowed >= self.first]  # targets and inputs; never padding, mask or buckets
        for opt, base_lr in ((self.sparse_opt, self.cfg.sparse_lr), (self.dense_opt, self.cfg.dense_lr)):
            for g in opt.param_groups:
                g["lr"] = base_lr * lr_mult
        m.train()
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        _, loss = m(batch, last_only=True)
        rep.loss = float(loss.detach())
        if math.isfinite(rep.loss):
            loss.backward()
        params = [p for g in (*self.sparse_opt.param_groups, *self.dense_opt.param_groups) for p in g["params"]]
        norm = total_grad_norm(p for p in params if p.grad is not None) if math.isfinite(rep.loss) else float("nan")
        if not self.guard.is_safe(rep.loss, norm):
            rep.step_refused = self.guard.reason
            self.stats["refused_steps"] += 1
            self.sparse_opt.zero_grad(set_to_none=True)
            self.dense_opt.zero_grad(set_to_none=True)
            self.guard.restore(m, None)
            self.stats["restores"] += 1
            log.warning("online step refused (%s, loss %s, grad norm %s): restored the last good weights",
                        self.guard.reason, rep.loss, norm)
            m.eval()
            return
        mask = torch.zeros(m.cfg.n_items, dtype=torch.bool, device=self.device)
        mask[allowed] = True
        for p in (m.item_emb.weight, m.item_bias):
            if p.grad is not None:
                p.grad[~mask] = 0.0  # Adagrad leaves rows with a zero gradient exactly as they are
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.sparse_opt.step()
        self.dense_opt.step()
        m.eval()
        rows = allowed.tolist()
        self.touched.update(rows)
        for r in rows:
            if r >= self.trained_items:
                self.last_seen.pop(r, None)
                self.last_seen[r] = None
        self.drift.adaptation.step()
        self.stats["steps"] += 1
        self._steps_since_remember += 1
        if self._steps_since_remember >= self.cfg.remember_every:
            self.guard.remember(m, None)
            self._steps_since_remember = 0

    # ------------------------------------------------------------------ publishing
    def deltas(self, meta: dict | None = None) -> list[ModelDelta]:
        """The deltas carrying every row changed since the last call, chained, each within Kafka's
        default message size (at most ``max_delta_rows`` item rows and ``MAX_DELTA_SUCCESSORS``
        transition entries), already applied to the trainer's own model; ``[]`` if nothing changed."""
        rows = sorted(self.touched)
        item_parts = [rows[s:s + self.cfg.max_delta_rows] for s in range(0, len(rows), self.cfg.max_delta_rows)]
        trans_parts = self._transition_parts(sorted(self.trans_touched))
        out = []
        for k in range(max(len(item_parts), len(trans_parts))):
            d = make_delta(self.model, self.vocab, self.base, self.next_seq, self.chain,
                           item_parts[k] if k < len(item_parts) else [], trans_parts[k] if k < len(trans_parts) else [],
                           {**(meta or {}), "created_ms": int(time.time() * 1000)})
            apply_delta(self.model, self.vocab, d)  # item_input of learned rows, as on the workers
            self.chain = self.next_seq
            self.next_seq += 1
            out.append(d)
        self.touched.clear()
        self.trans_touched.clear()
        self.stats["deltas"] += len(out)
        return out

    def _transition_parts(self, rows: list[int]) -> list[list[int]]:
        ptr = self.model.trans_ptr
        parts, part, nnz = [], [], 0
        for r in rows:
            n = int(ptr[r + 1] - ptr[r]) if ptr.numel() else 0
            if part and nnz + n > MAX_DELTA_SUCCESSORS:
                parts.append(part)
                part, nnz = [], 0
            part.append(r)
            nnz += n
        return parts + [part] if part else parts
