"""The trained Transformer as a scorer (offline evaluator contract) and a stream ``Predictor``.

>>> from models.config import ModelConfig
>>> from models.encoding import ItemVocab
>>> from models.model import NextActionModel
>>> from models.schema import EventSeq
>>> vocab = ItemVocab(["a", "b", "c"], n_hash_buckets=4)
>>> s = TransformerScorer(NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=16)), vocab)
>>> h = EventSeq.from_columns(["a", "b"], ["view", "cart"], [0, 60_000])
>>> s.score_items([h]).shape, s.score_actions([h]).shape, s.predict_gap_s([h]).shape
((1, 3), (1, 5), (1,))
>>> p = s.predict([h, EventSeq.empty()], k=2)[0]
>>> len(p.top_items), abs(sum(p.action_probs) - 1) < 1e-6, {i for i, _ in p.top_items} <= {"a", "b", "c"}
(2, True, True)
>>> probs = s.item_probs([h])  # the next-item distribution over the catalogue (here: a, b, c)
>>> round(float(probs.sum()), 6), round(p.top_items[0][1], 6) == round(float(probs.max()), 6)
(1.0, True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from models.encoding import ItemVocab, collate, encode
from models.predictor import Prediction, Predictor
from models.schema import EventSeq


class TransformerScorer(Predictor):
    """Wraps a :class:`~models.model.NextActionModel` + vocabulary.

    * evaluator contract: ``score_items(histories) -> [B, len(items)]`` aligned to ``items``
      (default: the vocabulary's known items; pass a dataset's ``items`` to align to it — ids the
      vocabulary does not know are scored through their hash bucket), ``item_probs`` (the same
      columns as probabilities: the softmax over the vocabulary's known items), ``score_actions``
      ``[B, 5]``, ``predict_gap_s`` ``[B]``;
    * :class:`~models.predictor.Predictor`: ``version``, ``predict(histories, k)`` (top items with
      their probabilities, as served), ``observe``.

    Histories are encoded with :func:`models.encoding.encode` (the one encoding) and run in batches
    of ``batch_size`` under ``torch.inference_mode`` (bf16 autocast on CUDA). ``exclude_seen=True``
    scores as a discovery feed serves (``TransformerPredictor(exclude_seen=True)``): the window's
    items at ``-inf``, the category term at its weight fitted for that ranking.
    """

    name = "transformer"

    def __init__(self, model, vocab: ItemVocab, items: Sequence[str] | None = None, *, version: str = "untrained",
                 device: str | None = None, batch_size: int = 512, metadata: dict | None = None,
                 exclude_seen: bool = False) -> None:
        import torch

        self.model = model
        self.vocab = vocab
        self.cfg = model.cfg
        self.version = version
        self.batch_size = int(batch_size)
        self.metadata = dict(metadata or {})
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model.to(self.device).eval()
        self.exclude_seen = bool(exclude_seen)
        self._cache: tuple[list[EventSeq], dict] | None = None
        self.align(items if items is not None else vocab.items)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | Path, items=None, device: str = "auto", **kw) -> "TransformerScorer":
        """Load (and verify) a checkpoint. ``items``: a Dataset (its ``items``) or an item-id list."""
        from models.checkpoint import load_checkpoint
        from models.devices import resolve_device

        ck = load_checkpoint(path, device=resolve_device(device))
        if items is not None and hasattr(items, "items") and not isinstance(items, (list, tuple)):
            items = items.items
        return cls(ck.model, ck.vocab, items, version=ck.version, metadata=ck.metadata, **kw)

    def align(self, items: Sequence[str]) -> "TransformerScorer":
        """Set the item list (and order) that ``score_items`` columns follow."""
        self.items = list(items)
        self._cols = self.vocab.indices(self.items)
        return self

    # ------------------------------------------------------------------ core
    def encode_batch(self, histories: Sequence[EventSeq]) -> dict:
        """The model input for ``histories`` — exactly what training would build for the same prefix
        (``collate`` of ``encode``); empty histories become one padding token."""
        enc = [encode(h, self.vocab, self.cfg) for h in histories]
        batch = collate(enc)
        if batch["item"].shape[1] == 0 or bool((batch["lengths"] == 0).any()):
            import torch

            if batch["item"].shape[1] == 0:
                batch = {k: (v.new_zeros(len(enc), 1) if k != "lengths" else v) for k, v in batch.items()}
            batch["lengths"] = torch.clamp(batch["lengths"], min=1)
        return batch

    def run(self, histories: Sequence[EventSeq]) -> dict[str, np.ndarray]:
        """``{item_scores [B, V], item_log_norm [B], action_probs [B, 5], gap_log_s [B]}`` as numpy
        (memoised for the last list of histories, so the evaluator's calls cost one forward pass)."""
        import torch

        if self._cache is not None and len(self._cache[0]) == len(histories) and all(
                a is b for a, b in zip(self._cache[0], histories)):
            return self._cache[1]
        outs: dict[str, list[np.ndarray]] = {"item_scores": [], "item_log_norm": [], "action_probs": [],
                                             "gap_log_s": []}
        cuda = self.device.type == "cuda"
        # run similar lengths together (less padding), then restore the input order
        order = np.argsort([min(len(h), self.cfg.max_len) for h in histories], kind="stable")
        mode = self.model.exclude_seen
        self.model.exclude_seen = self.exclude_seen  # the model may be shared with another scorer
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                for s in range(0, len(histories), self.batch_size):
                    batch = self.encode_batch([histories[i] for i in order[s: s + self.batch_size]])
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    o = self.model.score_last(batch)
                    for k in outs:
                        outs[k].append(o[k].float().cpu().numpy())
        finally:
            self.model.exclude_seen = mode
        inv = np.empty(len(order), np.int64)
        inv[order] = np.arange(len(order))
        res = {k: (np.concatenate(v)[inv] if v else np.zeros((0,))) for k, v in outs.items()}
        self._cache = (list(histories), res)
        return res

    # ------------------------------------------------------------------ evaluator contract
    def score_items(self, histories: Sequence[EventSeq]) -> np.ndarray:
        return self.run(histories)["item_scores"][:, self._cols]

    def item_probs(self, histories: Sequence[EventSeq]) -> np.ndarray:
        """``[B, len(items)]``: the model's probability that each item is the next one (the softmax
        over the vocabulary's known items, as served), in the columns of :meth:`score_items`. An id
        the vocabulary does not know reads its hash bucket's score, which the normaliser leaves out
        (buckets are not items): ``exp(score - normaliser)`` is then only a relative weight."""
        r = self.run(histories)
        return np.exp(r["item_scores"][:, self._cols].astype(np.float64) - r["item_log_norm"][:, None])

    def score_actions(self, histories: Sequence[EventSeq]) -> np.ndarray:
        return self.run(histories)["action_probs"].astype(np.float64)

    def predict_gap_s(self, histories: Sequence[EventSeq]) -> np.ndarray:
        return np.expm1(np.clip(self.run(histories)["gap_log_s"].astype(np.float64), 0.0, 30.0))

    # ------------------------------------------------------------------ Predictor protocol
    def predict(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None = None,
                texts: Mapping[str, str] | None = None) -> list[Prediction]:
        r = self.run(histories)  # ``texts``: unused (no text rows here: models.text.apply_text_rows does it offline)
        first = self.vocab.first_item
        scores = r["item_scores"][:, first:]  # known items only (no padding / mask / hash buckets)
        k_eff = min(int(k), scores.shape[1])
        out: list[Prediction] = []
        if k_eff > 0:
            top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
            top_s = np.take_along_axis(scores, top, 1)
            order = np.argsort(-top_s, axis=1, kind="stable")
            top, top_s = np.take_along_axis(top, order, 1), np.take_along_axis(top_s, order, 1)
            # scores -> probabilities over the known items (the normaliser of the same forward pass)
            top_s = np.minimum(np.exp(top_s.astype(np.float64) - r["item_log_norm"][:, None]), 1.0)
        probs = r["action_probs"].astype(np.float64)
        probs = probs / probs.sum(axis=1, keepdims=True)
        gaps = self.predict_gap_s(histories)
        items = self.vocab.items
        for b in range(len(histories)):
            tops = [(items[int(i)], float(s)) for i, s in zip(top[b], top_s[b])] if k_eff > 0 else []
            out.append(Prediction(action_probs=probs[b].tolist(), top_items=tops, next_gap_s=float(gaps[b])))
        return out
