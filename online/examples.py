"""Training examples from ``outcomes`` records: the served window plus what the user did next.

An ``outcomes`` record (``stream_app.records.outcome_record``) holds the window the serving model
encoded for a prediction (``context.window``: exactly that history, see the record's docstring) and
the event that followed (``happened``). An :class:`Example` is that pair; :func:`training_batch`
turns examples into model input with the one encoding (:func:`models.encoding.encode`): the window
plus the target, ``max_len + 1`` events, where positions ``0 .. L-1`` are exactly ``encode(window)``
and only the last position's prediction (made from the window alone) is trained (``last_only``).
Nothing from the target event reaches the input of the trained position.

>>> rec = {"user_id": "u1", "partition": 0, "offset": 7,
...        "context": {"model_version": "abc", "event_ts": 60_000, "window":
...                    {"i": ["a", "b"], "a": [0, 2], "t": [0, 60_000], "d": ["", ""], "l": ["", ""], "c": ["", ""]}},
...        "happened": {"action": "purchase", "item_id": "b", "category": "", "ts": 90_000, "gap_s": 30.0,
...                     "item_rank": 2, "action_prob": 0.25}}
>>> ex = example_from_outcome(rec)
>>> ex.window.items, ex.item, ex.action, ex.gap_s, ex.served_version, ex.item_rank
(['a', 'b'], 'b', 4, 30.0, 'abc', 2)
>>> ex.training_window().items
['a', 'b', 'b']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from models.encoding import ItemVocab, collate, encode
from models.schema import ACTION_INDEX, EventSeq


@dataclass(frozen=True, slots=True)
class Example:
    """One outcome as a training example (see the module docstring)."""

    user_id: str
    window: EventSeq  # what the serving model encoded for the previous event
    item: str  # the target: the next item ...
    action: int  # ... its action (index into models.schema.ACTIONS) ...
    ts: int  # ... and its time (epoch ms)
    category: str
    served_version: str  # the weights that served the prediction
    item_rank: int | None  # the target's 1-based rank in the served top-K (None: not in it)
    action_prob: float  # the served probability of the target's action
    partition: int  # the outcome's source event (the ``outcomes`` record's own offset is the trainer's)
    offset: int
    item_text: str = ""  # the event's item text, when it carried one (a new item starts at its text row)

    @property
    def gap_s(self) -> float:
        return (self.ts - int(self.window.ts[-1])) / 1000.0 if len(self.window) else 0.0

    def training_window(self) -> EventSeq:
        """The window with the target appended (its last event is only a label)."""
        w = self.window
        return EventSeq(w.items + [self.item], _append(w.actions, self.action), _append(w.ts, self.ts),
                        w.devices + [""], w.locations + [""], w.categories + [self.category])


def _append(arr, value):
    import numpy as np

    return np.concatenate((arr, np.array([value], arr.dtype)))


def example_from_outcome(rec: dict) -> Example:
    """Parse one decoded ``outcomes`` record; ``ValueError`` names what is missing or wrong."""
    try:
        ctx, hap = rec["context"], rec["happened"]
        window = EventSeq.from_json(ctx["window"])
        action = ACTION_INDEX[hap["action"]]
        prob = float(hap["action_prob"])
        rank = hap.get("item_rank")
        ex = Example(str(rec["user_id"]), window, str(hap["item_id"]), action, int(hap["ts"]),
                     str(hap.get("category") or ""), str(ctx["model_version"]),
                     int(rank) if rank is not None else None, prob, int(rec["partition"]), int(rec["offset"]),
                     str(hap.get("item_text") or ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an outcomes record with a served window: {type(exc).__name__}: {exc}") from None
    if not len(window):
        raise ValueError("outcomes record has an empty served window")
    if not math.isfinite(prob):
        raise ValueError(f"outcomes record action_prob is not finite ({prob!r})")
    return ex


def usable(ex: Example) -> str | None:
    """Why the example must not be learned from (``None``: it may): an out-of-order target (its time
    before the served window's last event) gives a label from the past."""
    if ex.ts < int(ex.window.ts[-1]):
        return "out_of_order"
    return None


def training_batch(examples: Sequence[Example], vocab: ItemVocab, cfg) -> dict:
    """``collate`` of ``encode(window + target, max_len=cfg.max_len + 1)`` for each example: the
    batch :meth:`models.model.NextActionModel.forward` trains with ``last_only=True``."""
    return collate([encode(ex.training_window(), vocab, cfg, max_len=cfg.max_len + 1) for ex in examples])
