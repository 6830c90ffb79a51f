"""The predictor contract: a batch of user histories in, one :class:`Prediction` per history out.

Every predictor the stream can serve (the popularity + Markov baseline, the Transformer) implements
:class:`Predictor`. Predictors are called from one executor thread, never concurrently, so they
may keep mutable state without locks; ``observe`` is called from that same thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from models.schema import ACTIONS, EventSeq


@dataclass(slots=True)
class Prediction:
    """What a user will do next: action distribution, top-K items, expected gap."""

    action_probs: list[float]  # len(ACTIONS), sums to 1, order of models.schema.ACTIONS
    top_items: list[tuple[str, float]]  # (item_id, score), best first, len <= k
    next_gap_s: float  # expected seconds to the next action
    explanation: str = ""
    extra: dict = field(default_factory=dict)

    def action_dict(self) -> dict[str, float]:
        return dict(zip(ACTIONS, self.action_probs))


@runtime_checkable
class Predictor(Protocol):
    """Batch inference over histories (oldest event first, the triggering event last)."""

    #: The model version stamped on every prediction this predictor makes.
    version: str

    def predict(self, histories: Sequence[EventSeq], k: int) -> list[Prediction]:
        """One prediction per history, in input order."""
        ...

    def observe(self, history: EventSeq) -> None:
        """Learn from a user's updated history (its last event is new). May be a no-op; a predictor
        whose ``observe`` always is can say so with a class attribute ``learns = False``, and the
        batcher then skips the calls (and the inference process ships no histories for them)."""
        ...
