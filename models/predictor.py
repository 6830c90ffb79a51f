"""The predictor contract: a batch of user histories in, one :class:`Prediction` per history out.

Everything the stream serves (the popularity + Markov baseline, the Transformer in the worker, the
Transformer in an inference process) is a :class:`Predictor`, and the micro-batcher calls nothing
else. Subclasses implement :meth:`~Predictor.predict` and inherit defaults for the rest:

* ``version`` names the model that made a prediction (stamped on every one);
* :meth:`~Predictor.predict` is synchronous CPU/GPU work, run on the batcher's single inference
  thread (never concurrently, so a predictor may keep mutable state without locks);
  :meth:`~Predictor.predict_async` is what the batcher awaits: by default the same work, but a
  predictor that only *waits* (``runs_elsewhere``: the model is in another process) overrides it
  and is awaited on the event loop, with no thread in between;
* learning is optional: ``learns = True`` means :meth:`~Predictor.observe` learns from each new
  history after its prediction (prequential order); otherwise it is never called;
* hot swap: :meth:`~Predictor.successor` loads the next checkpoint the way this predictor was
  built (same options, same process), or returns ``None`` when it serves no checkpoint (the
  caller then builds one); :meth:`~Predictor.warm_up` runs before the swap, :meth:`~Predictor.close`
  after the last batch;
* online deltas: :meth:`~Predictor.apply_delta` updates the served weights in place between two
  batches (a :class:`~models.delta.ModelDelta` that follows ``version``; ``version`` then becomes
  the delta's label), or returns ``False`` when it does not apply (another version, or no model).
* cold-start items from text: ``predict(..., texts={item id: text})`` hands over the ``item_text``
  of the batch's events (docs/cold-start.md); a predictor without a text projection ignores it.
  :meth:`~Predictor.take_text_rows` says how many new items it gave a text row since it was last
  asked (the batcher exports the counts to Prometheus after each batch).
* privacy: :meth:`~Predictor.forget_users` drops whatever per-user state the predictor keeps (a KV
  cache); :meth:`~Predictor.forget_users_async` is what the worker awaits (by default the same).

>>> class Constant(Predictor):
...     version = "const-1"
...     def predict(self, histories, k, users=None):
...         return [Prediction([1.0, 0, 0, 0, 0], [("i1", 1.0)][:k], 60.0) for _ in histories]
>>> p = Constant()
>>> [x.top_items for x in p.predict([EventSeq.empty()], k=3)], p.learns, p.successor("ckpt") is None
([[('i1', 1.0)]], False, True)
>>> Prediction.from_json(p.predict([EventSeq.empty()], 1)[0].to_json()).action_dict()["view"]
1.0
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping, Sequence

from models.schema import ACTIONS, EventSeq

if TYPE_CHECKING:  # pragma: no cover
    from models.delta import ModelDelta


@dataclass(slots=True)
class Prediction:
    """What a user will do next: action distribution, top-K items, expected gap."""

    action_probs: list[float]  # len(ACTIONS), sums to 1, order of models.schema.ACTIONS
    top_items: list[tuple[str, float]]  # (item_id, score), best first, len <= k
    next_gap_s: float  # expected seconds to the next action
    explanation: str = ""
    #: Optional attribution of the prediction (models.explain ``Explanation.to_json()``), when explanations are on.
    why: dict | None = None

    def action_dict(self) -> dict[str, float]:
        return dict(zip(ACTIONS, self.action_probs))

    def to_json(self) -> dict:
        """The compact JSON form (between processes, and in the user's stored state).

        >>> Prediction([0.5, 0.5, 0, 0, 0], [("a", 2.0)], 3.0).to_json()
        {'p': [0.5, 0.5, 0, 0, 0], 'top': [['a', 2.0]], 'gap': 3.0}
        """
        d = {"p": self.action_probs, "top": [[i, s] for i, s in self.top_items], "gap": self.next_gap_s}
        if self.explanation:
            d["x"] = self.explanation
        if self.why is not None:
            d["w"] = self.why
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Prediction":
        """Inverse of :meth:`to_json`."""
        return cls([float(x) for x in d["p"]], [(str(i), float(s)) for i, s in d["top"]], float(d["gap"]),
                   d.get("x", ""), d.get("w"))


class Predictor(ABC):
    """Batch inference over histories (oldest event first, the triggering event last).

    See the module docstring for the contract; subclasses implement :meth:`predict`.
    """

    #: The model version stamped on every prediction this predictor makes.
    version: str
    #: True when :meth:`observe` learns (the batcher then calls it; else never).
    learns: ClassVar[bool] = False
    #: True when :meth:`predict_async` only waits for work done elsewhere (another process): the
    #: batcher awaits it on the event loop. False: predictions run on the inference thread.
    runs_elsewhere: ClassVar[bool] = False

    @abstractmethod
    def predict(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None = None,
                texts: Mapping[str, str] | None = None) -> list[Prediction]:
        """One prediction per history, in input order, each with at most ``k`` items. ``users``
        (optional, one id per history) lets a predictor keep per-user state (a KV cache).
        ``texts`` (optional): item id -> text for the items of this batch whose event carried an
        ``item_text``; a predictor that can rank an item it does not know from its text (a
        checkpoint with a text projection: docs/cold-start.md) does so from this call on, the
        others ignore it. Callers pass it only when there is text (never an empty mapping)."""

    async def predict_async(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None = None,
                            texts: Mapping[str, str] | None = None) -> list[Prediction]:
        """:meth:`predict` for the batcher to await; it never suspends unless ``runs_elsewhere``."""
        if texts is None:  # a subclass written before ``texts`` existed keeps working
            return self.predict(histories, k, users)
        return self.predict(histories, k, users, texts)

    def observe(self, history: EventSeq) -> None:
        """Learn from a user's updated history (its last event is new); only called if ``learns``."""

    def successor(self, path: str | Path, sha256: str | None = None) -> "Predictor | None":
        """The predictor serving the checkpoint at ``path`` next, built like this one (options,
        device, process); ``None`` if this predictor serves no checkpoint. Raises
        :class:`~models.errors.CheckpointError` for a bad checkpoint (this one keeps serving)."""
        return None

    def apply_delta(self, delta: "ModelDelta") -> bool:
        """Apply ``delta`` in place if it follows this predictor's ``version`` (then ``version`` is
        ``delta.label``) and return True; False if it does not apply here (nothing changes)."""
        return False

    def forget_users(self, users: Sequence[str]) -> int:
        """Drop the per-user state kept for ``users`` (privacy deletion); returns how many entries
        went. A predictor that keeps none (the default) drops nothing."""
        return 0

    async def forget_users_async(self, users: Sequence[str]) -> int:
        """:meth:`forget_users` for the worker to await (``runs_elsewhere``: the other process does it)."""
        return self.forget_users(users)

    def take_text_rows(self) -> dict[str, int]:
        """New items this predictor gave a row from their text (docs/cold-start.md) since the last
        call, by result: ``{"added": n, "failed": m}`` (items; ``failed``: the item keeps its hash-bucket
        row), only the non-zero ones. A predictor without text rows (the default) has none."""
        return {}

    def warm_up(self) -> None:
        """Run every code path once before serving (raise if the model does not work)."""

    def close(self) -> None:
        """Release what this predictor holds (a process, a device); it is not called again."""
