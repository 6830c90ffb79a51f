"""Faithful explanations: which past events and which context drove a prediction, by attribution on the model.

An explanation answers "why this prediction?" for one **target**: the predicted next action (the
argmax of ``action_probs``, the default) or the top next item. Its weights come from the model
itself, never from a template:

* **occlusion** (``method="occlusion"``, the default): each event of the user's window is removed
  from the history in turn and the target's probability re-scored; an event's **weight** is how
  much the probability *drops* without it (``p(full) - p(without the event)``: positive = it
  supported the prediction). All variants of a history (and of every history of a batch) run as one
  batched forward pass. Removing an event is a real counterfactual: the following event's time gap
  is recomputed from its new predecessor (:func:`models.encoding.encode` of the shortened history,
  done on the encoded arrays). The window does not slide to take an older event in: the variant
  is the window without the event.
* **gradient** (``method="gradient"``): input × gradient of the target probability with respect
  to each token's embedding (one forward and one backward pass per history; a first-order
  estimate of the occlusion weight).
* **context**: the features of the event the prediction answers (its hour and day of week, device,
  location, as the model uses them) are each replaced by "unknown" (the padding value 0) in turn;
  the weight is again the drop of the target's probability.

Which method serves: the one with the better measured faithfulness per cost
(benchmarks/RESULTS.md, "Faithful explanations"; docs/explanations.md). :func:`format_why` turns an
:class:`Explanation` into the short ``why`` text ("likely to purchase: added X to cart 3 min ago;
evening"): the wording is a template, *which* events and contexts it names is the attribution's
(the top ``top`` events with a positive weight, the contexts with a positive weight).

The module knows the model and an :class:`~models.schema.EventSeq`, nothing of the stream.

>>> from models.config import ModelConfig
>>> from models.encoding import ItemVocab
>>> from models.model import NextActionModel
>>> vocab = ItemVocab(["a", "b", "c"], n_hash_buckets=4)
>>> _ = torch.manual_seed(0)
>>> model = NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=16, max_len=8)).eval()
>>> h = EventSeq.from_columns(["a", "b", "c"], ["view", "cart", "view"], [0, 60_000, 240_000])
>>> e = explain(model, vocab, h, top=2)
>>> e.target, e.label in ACTIONS, len(e.weights), 0 < e.prob < 1
('action', True, 3, True)
>>> len(e.events) <= 2 and all(ev.weight > 0 for ev in e.events)
True
>>> sorted(e.to_json())
['context', 'events', 'label', 'method', 'prob', 'target', 'text']
>>> explain(model, vocab, EventSeq.empty()).events  # nothing to attribute
[]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from models.encoding import ItemVocab, _gap_buckets, collate, encode
from models.model import NextActionModel, _last_items
from models.schema import ACTIONS, EventSeq

#: Attribution methods (module docstring).
METHODS = ("occlusion", "gradient")
#: Explained targets: the predicted next action, or the top next item.
TARGETS = ("action", "item")
#: Context features of the event a prediction answers, in the order they are attributed.
CONTEXT_FEATURES = ("hour", "dow", "device", "location")
#: Rows per forward pass of the occlusion variants (bounds memory for long windows × many users).
MAX_ROWS = 4096

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_VERB = {"view": "viewed {}", "click": "clicked {}", "cart": "added {} to cart", "fav": "saved {} as a favourite",
         "purchase": "bought {}"}
_LIKELY = {"view": "view", "click": "click", "cart": "add to cart", "fav": "save a favourite", "purchase": "purchase"}


@dataclass(frozen=True, slots=True)
class EventWeight:
    """One past event and its attribution weight (the drop of the target's probability without it).

    ``offset_in_history``: events back from the newest (0 = the event the prediction answers).
    """

    offset_in_history: int
    item_id: str
    action: str
    ts: int
    weight: float

    def to_json(self) -> dict:
        return {"offset_in_history": self.offset_in_history, "item_id": self.item_id, "action": self.action,
                "ts": self.ts, "weight": round(self.weight, 6)}


@dataclass(frozen=True, slots=True)
class ContextWeight:
    """A context feature of the newest event (``hour``: UTC hour, ``dow``: day name, ``device``,
    ``location``), its value, and the drop of the target's probability when it is unknown."""

    feature: str
    value: str
    weight: float


@dataclass(slots=True)
class Explanation:
    """What :func:`explain` returns.

    ``target`` / ``label`` / ``prob``: what is explained (``"action"`` and the predicted action's
    name, or ``"item"`` and the top item's id) and its probability on the full history.
    ``weights``: one weight per event of the window, oldest first (``offset_in_history`` =
    ``len(weights) - 1 - index``). ``events``: the named events, highest weight first (the ``top``
    largest positive weights). ``context``: every attributed context feature; ``now_ts``: the newest
    event's time (for "3 min ago").
    """

    target: str
    label: str
    prob: float
    method: str
    weights: list[float]
    events: list[EventWeight]
    context: list[ContextWeight] = field(default_factory=list)
    now_ts: int = 0

    @property
    def named_context(self) -> list[ContextWeight]:
        """The context features that supported the prediction (positive weight), strongest first."""
        return sorted((c for c in self.context if c.weight > 0), key=lambda c: -c.weight)

    @property
    def text(self) -> str:
        return format_why(self)

    def to_json(self) -> dict:
        """The ``why`` of a prediction record (docs/contract.md)."""
        return {"text": self.text, "target": self.target, "label": self.label, "prob": round(self.prob, 6),
                "method": self.method, "events": [e.to_json() for e in self.events],
                "context": {c.feature: {"value": c.value, "weight": round(c.weight, 6)} for c in self.context}}


# ----------------------------------------------------------------------------- wording
def _ago(seconds: float) -> str:
    """``"now"``, ``"40 s ago"``, ``"3 min ago"``, ``"2 h ago"``, ``"5 days ago"``.

    >>> [_ago(s) for s in (0, 40, 185, 7300, 5 * 86400 + 1)]
    ['now', '40 s ago', '3 min ago', '2 h ago', '5 days ago']
    """
    s = max(0.0, float(seconds))
    if s < 1:
        return "now"
    if s < 60:
        return f"{int(s)} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 86400:
        return f"{int(s // 3600)} h ago"
    d = int(s // 86400)
    return f"{d} day{'s' if d > 1 else ''} ago"


def part_of_day(hour: int) -> str:
    """The part of the day of a UTC hour (the model's ``hour`` feature is UTC).

    >>> [part_of_day(h) for h in (3, 8, 14, 19, 23)]
    ['night', 'morning', 'afternoon', 'evening', 'night']
    """
    return "night" if hour < 5 or hour >= 22 else "morning" if hour < 12 else "afternoon" if hour < 17 else "evening"


def _context_text(c: ContextWeight) -> str:
    if c.feature == "hour":
        return f"{part_of_day(int(c.value[:2]))} ({c.value})"
    return c.value


def format_why(e: Explanation) -> str:
    """The ``why`` text of an explanation: the target, then the named events, then the named context.

    >>> ev = [EventWeight(0, "X", "cart", 180_000, 0.3), EventWeight(4, "Y", "view", 0, 0.1)]
    >>> ctx = [ContextWeight("hour", "19h UTC", 0.05), ContextWeight("device", "mobile", 0.02),
    ...        ContextWeight("dow", "Sat", -0.01)]
    >>> format_why(Explanation("action", "purchase", 0.4, "occlusion", [], ev, ctx, now_ts=360_000))
    'likely to purchase: added X to cart 3 min ago, viewed Y 6 min ago; evening (19h UTC), mobile'
    >>> format_why(Explanation("item", "Z", 0.1, "occlusion", [], [], []))
    'likely next item Z: no single past event or context stands out'
    """
    head = f"likely to {_LIKELY.get(e.label, e.label)}" if e.target == "action" else f"likely next item {e.label}"
    evs = ", ".join(f"{_VERB.get(x.action, '{}').format(x.item_id)} {_ago((e.now_ts - x.ts) / 1000)}" for x in e.events)
    ctx = ", ".join(_context_text(c) for c in e.named_context)
    if not evs and not ctx:
        return f"{head}: no single past event or context stands out"
    return f"{head}: " + "; ".join(p for p in (evs, ctx) if p)


# ----------------------------------------------------------------------------- the model's target
def _last_hidden(model: NextActionModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h [B, T, d], h_last [B, d], last index [B])`` of a collated batch (no empty rows)."""
    h = model.hidden(batch)
    last = (batch["lengths"] - 1).clamp(min=0)
    return h, h[torch.arange(h.shape[0], device=h.device), last], last


def _action_probs(model: NextActionModel, h_last: torch.Tensor, last_action: torch.Tensor) -> torch.Tensor:
    """The action head as :meth:`~models.model.NextActionModel.score_last` computes it, without the
    item scores (``[B, 5]``; tests check it equals ``score_last``'s ``action_probs``)."""
    if model.action_head is None:
        return torch.full((h_last.shape[0], len(ACTIONS)), 1.0 / len(ACTIONS), device=h_last.device)
    logits = model.action_head(h_last).float()
    if model.action_prior is not None:
        logits = logits + model.action_prior(last_action).float()
    cfg = model.cfg
    if cfg.action_temperature != 1.0 or cfg.action_bias:
        logits = logits * cfg.action_temperature
        if cfg.action_bias:
            logits = logits + logits.new_tensor(cfg.action_bias)
    return torch.softmax(logits, dim=-1)


def target_probs(model: NextActionModel, batch: dict[str, torch.Tensor], target: str,
                 which: torch.Tensor | None = None) -> torch.Tensor:
    """The probability of the target class per row of ``batch``: ``which [B]`` (an action index,
    or a vocabulary index for ``target="item"``); ``which=None``: the whole distribution ``[B, C]``
    (actions; for items: over the vocabulary, 0 outside the known items)."""
    h, h_last, last = _last_hidden(model, batch)
    ar = torch.arange(h.shape[0], device=h.device)
    if target == "action":
        p = _action_probs(model, h_last, batch["action"][ar, last])
        return p if which is None else p[ar, which]
    rep = model._repeat_scores(h, batch["lengths"])[ar, last] if model.cfg.repeat_head else None
    items = batch["item"]
    logits = model.item_logits(h_last, rep, items if rep is not None else None,
                               _last_items(items, batch["lengths"], model.last_window)).float()
    logits[:, : model.first_item] = float("-inf")  # only known items are predicted
    logp = torch.log_softmax(logits, dim=1)
    return logp.exp() if which is None else logp[ar, which].exp()


# ----------------------------------------------------------------------------- occlusion variants
def _without(enc: dict[str, np.ndarray], ts: np.ndarray, prev: int | None, j: int, n_gap: int
             ) -> dict[str, np.ndarray]:
    """``enc`` (an :func:`~models.encoding.encode` of a window of events at times ``ts``) with token
    ``j`` removed: what ``encode`` gives for those events without that one (the next token's gap is
    recomputed from its new predecessor; ``prev``: the time of the event before the window, ``None``
    when the window starts at the user's first event)."""
    out = {k: np.delete(v, j) for k, v in enc.items()}
    if j < len(ts) - 1:  # the event after j now follows j - 1
        before = int(ts[j - 1]) if j > 0 else prev
        if before is None:
            gap_b, gap_l = 1, 0.0  # it became the user's first event
        else:
            gap_s = (int(ts[j + 1]) - before) / 1000.0
            gap_b, gap_l = int(_gap_buckets(np.array([gap_s]), n_gap)[0]), math.log1p(max(gap_s, 0.0))
        if enc["gap"][j + 1] != 0:  # 0: the gap feature is switched off
            out["gap"][j] = gap_b
        out["gap_log"][j] = np.float32(gap_l)
    return out


def _context_value(feature: str, history: EventSeq) -> str:
    ts = int(history.ts[-1])
    if feature == "hour":
        return f"{(ts // 3_600_000) % 24:02d}h UTC"
    if feature == "dow":
        return _DAYS[(ts // 86_400_000 + 3) % 7]
    return history.devices[-1] if feature == "device" else history.locations[-1]


def _contexts(model: NextActionModel, history: EventSeq, enc: dict[str, np.ndarray]) -> list[str]:
    """The context features the model reads for the newest event (used, and not unknown)."""
    return [f for f in CONTEXT_FEATURES if model.cfg.uses(f) and int(enc[f][-1]) != 0]


def _variants(model: NextActionModel, vocab: ItemVocab, history: EventSeq, context: bool
              ) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Full window first, then one variant per removed event (oldest first), then one per context."""
    cfg = model.cfg
    enc = encode(history, vocab, cfg)
    L = len(enc["item"])
    start = len(history) - L
    ts = history.ts[start:].astype(np.int64)
    prev = int(history.ts[start - 1]) if start else None
    rows = [enc] + [_without(enc, ts, prev, j, cfg.n_gap_buckets) for j in range(L)]
    feats = _contexts(model, history, enc) if context else []
    for f in feats:
        v = {k: a.copy() for k, a in enc.items()}
        v[f][-1] = 0
        rows.append(v)
    return rows, feats


def _empty(target: str, method: str) -> Explanation:
    return Explanation(target, "", 0.0, method, [], [], [], 0)


def _explanation(history: EventSeq, target: str, label: str, prob: float, method: str, weights: Sequence[float],
                 feats: Sequence[str], ctx_weights: Sequence[float], top: int) -> Explanation:
    L = len(weights)
    start = len(history) - L
    order = sorted(range(L), key=lambda j: (-weights[j], -j))  # ties: the more recent event first
    named = [EventWeight(L - 1 - j, history.items[start + j], ACTIONS[int(history.actions[start + j])],
                         int(history.ts[start + j]), float(weights[j])) for j in order[:top] if weights[j] > 0]
    ctx = [ContextWeight(f, _context_value(f, history), float(w)) for f, w in zip(feats, ctx_weights)]
    return Explanation(target, label, float(prob), method, [float(w) for w in weights], named, ctx,
                       int(history.ts[-1]))


def _check(method: str, target: str, top: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an integer >= 0, got {top!r}")


def _label(vocab: ItemVocab, target: str, which: int) -> str:
    return ACTIONS[which] if target == "action" else vocab.items[which - vocab.first_item]


# ----------------------------------------------------------------------------- the API
def explain_batch(model: NextActionModel, vocab: ItemVocab, histories: Sequence[EventSeq], *, target: str = "action",
                  top: int = 3, method: str = "occlusion", context: bool = True,
                  max_rows: int = MAX_ROWS) -> list[Explanation]:
    """One :class:`Explanation` per history (module docstring). ``top``: events named at most;
    ``context``: attribute the newest event's context features too. Occlusion runs every variant
    of every history in batched forward passes of at most ``max_rows`` rows. The model is used in
    eval mode as it is (no gradients kept)."""
    _check(method, target, top)
    if method == "gradient":
        return [explain_gradient(model, vocab, h, target=target, top=top, context=context) for h in histories]
    out: list[Explanation | None] = [None] * len(histories)
    rows: list[dict[str, np.ndarray]] = []
    spans: list[tuple[int, int, int, list[str]]] = []  # (history, first row, n events, context features)
    for i, h in enumerate(histories):
        if len(h) == 0:
            out[i] = _empty(target, method)
            continue
        v, feats = _variants(model, vocab, h, context)
        spans.append((i, len(rows), len(v) - 1 - len(feats), feats))
        rows.extend(v)
    if not rows:
        return out  # type: ignore[return-value]
    dev = next(model.parameters()).device
    probs = []
    with torch.inference_mode():
        # the full windows first: each history's target (its argmax), then every variant scored on it
        full = [rows[s] for _, s, _, _ in spans]
        dist = torch.cat([target_probs(model, _batch(full[a:a + max_rows], dev), target)
                          for a in range(0, len(full), max_rows)])
        if target == "item":
            dist[:, : model.first_item] = -1.0
        which_h = dist.argmax(1)
        which = torch.empty(len(rows), dtype=torch.long)
        for (_, s, n, feats), w in zip(spans, which_h.tolist()):
            which[s: s + 1 + n + len(feats)] = w
        order = np.argsort([len(r["item"]) for r in rows], kind="stable")  # similar lengths share a pass
        got = torch.empty(len(rows))
        for a in range(0, len(rows), max_rows):
            part = order[a:a + max_rows]
            sel = torch.as_tensor(part)
            got[sel] = target_probs(model, _batch([rows[k] for k in part], dev), target, which[sel].to(dev)).float().cpu()
        probs = got.tolist()
    for (i, s, n, feats), w in zip(spans, which_h.tolist()):
        p0 = probs[s]
        weights = [p0 - probs[s + 1 + j] for j in range(n)]
        ctx_w = [p0 - probs[s + 1 + n + c] for c in range(len(feats))]
        out[i] = _explanation(histories[i], target, _label(vocab, target, w), p0, method, weights, feats, ctx_w, top)
    return out  # type: ignore[return-value]


def _batch(rows: list[dict[str, np.ndarray]], dev: torch.device) -> dict[str, torch.Tensor]:
    b = collate(rows, pad_to=max(1, max(len(r["item"]) for r in rows)))
    b["lengths"] = b["lengths"].clamp(min=1)  # a history of one event without it: one padding token
    return {k: t.to(dev) for k, t in b.items()}


def explain(model: NextActionModel, vocab: ItemVocab, history: EventSeq, **options) -> Explanation:
    """:func:`explain_batch` of one history."""
    return explain_batch(model, vocab, [history], **options)[0]


def explain_one_by_one(model: NextActionModel, vocab: ItemVocab, history: EventSeq, *, target: str = "action",
                       top: int = 3, context: bool = True) -> Explanation:
    """Occlusion the slow, obvious way: every shortened history re-encoded from its events with
    :func:`~models.encoding.encode` and scored alone. The reference :func:`explain_batch` must agree
    with (tests)."""
    _check("occlusion", target, top)
    if len(history) == 0:
        return _empty(target, "occlusion")
    dev = next(model.parameters()).device
    cfg = model.cfg
    L = min(len(history), cfg.max_len)
    start = len(history) - L

    def p(h: EventSeq, which=None, enc=None):
        b = _batch([enc if enc is not None else encode(h, vocab, cfg)], dev)
        with torch.inference_mode():
            return target_probs(model, b, target, None if which is None else torch.tensor([which], device=dev))

    dist = p(history)[0].clone()
    if target == "item":
        dist[: model.first_item] = -1.0
    w = int(dist.argmax())
    p0 = float(p(history, w))
    weights = []
    for j in range(L):
        k = start + j
        rest = history[:k]
        rest = EventSeq(rest.items + history.items[k + 1:], np.concatenate([rest.actions, history.actions[k + 1:]]),
                        np.concatenate([rest.ts, history.ts[k + 1:]]), rest.devices + history.devices[k + 1:],
                        rest.locations + history.locations[k + 1:], rest.categories + history.categories[k + 1:])
        # the window minus the event (it does not slide to take an older event in): its last L - 1
        weights.append(p0 - float(p(rest, w, encode(rest, vocab, cfg, max_len=L - 1))))
    enc = encode(history, vocab, cfg)
    feats = _contexts(model, history, enc) if context else []
    ctx_w = []
    for f in feats:
        v = {key: a.copy() for key, a in enc.items()}
        v[f][-1] = 0
        ctx_w.append(p0 - float(p(history, w, v)))
    return _explanation(history, target, _label(vocab, target, w), p0, "occlusion", weights, feats, ctx_w, top)


def explain_gradient(model: NextActionModel, vocab: ItemVocab, history: EventSeq, *, target: str = "action",
                     top: int = 3, context: bool = True) -> Explanation:
    """Input × gradient: each token's weight is ``sum(y_t * d p / d y_t)`` over its embedding ``y_t``
    as the backbone reads it (after the embedding norm; a zero baseline), a first-order estimate of
    the occlusion weight. Context features: ``e_f * d p / d x_last`` with ``e_f`` the feature's own
    embedding row and ``x_last`` the newest token's summed input before the norm (the part of it
    that the feature contributes; the norm is scale-invariant, so the token-level weight is taken
    after it)."""
    _check("gradient", target, top)
    if len(history) == 0:
        return _empty(target, "gradient")
    dev = next(model.parameters()).device
    cfg = model.cfg
    enc = encode(history, vocab, cfg)
    batch = _batch([enc], dev)
    captured: dict[str, torch.Tensor] = {}
    feats = _contexts(model, history, enc) if context else []
    pre = {}
    with torch.enable_grad():
        # the summed token inputs (made a leaf) and the normed embeddings the backbone reads (kept)
        hooks = [model.emb_norm.register_forward_pre_hook(lambda _m, args: (_leaf(args[0], captured),)),
                 model.emb_norm.register_forward_hook(lambda _m, _a, out: _kept(out, captured))]
        try:
            dist = target_probs(model, batch, target)[0]
            d = dist.detach().clone()
            if target == "item":
                d[: model.first_item] = -1.0
            w = int(d.argmax())
            dist[w].backward()
        finally:
            for hk in hooks:
                hk.remove()
        x, g = captured["y"][0], captured["y"].grad[0]  # (L, d) each
        weights = (x * g).sum(-1).tolist()
        g_in = captured["x"].grad[0, -1]  # (d,): the newest token's summed input
        for f in feats:
            e_f = model.feat_emb[f].weight[int(enc[f][-1])].detach()
            pre[f] = float((e_f * g_in).sum())
    return _explanation(history, target, _label(vocab, target, w), float(dist[w].detach()), "gradient", weights,
                        feats, [pre[f] for f in feats], top)


def _kept(y: torch.Tensor, captured: dict) -> torch.Tensor:
    y.retain_grad()
    captured["y"] = y
    return y


def _leaf(x: torch.Tensor, captured: dict) -> torch.Tensor:
    leaf = x.detach().requires_grad_(True)
    captured["x"] = leaf
    return leaf
