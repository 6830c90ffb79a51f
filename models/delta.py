"""A model delta: the fast, sparse part of online learning, applied in place to a served model.

The online trainer (:mod:`online.trainer`) publishes the rows it changed every few seconds as a
:class:`ModelDelta`; every worker applies the same deltas in the same order
(:meth:`models.serving.TransformerPredictor.apply_delta`), so the weights behind a label are the
same everywhere. A delta carries **whole rows**, not differences, so applying one is idempotent and
its result does not depend on floating-point accumulation:

* item rows: the embedding row, the bias and the category bucket of every vocabulary row the
  trainer changed. A row past the end of the vocabulary is a **new item** (appended in index order);
  a row whose item id differs from the one the model has is a **reused row** (an online item gone
  cold, evicted for a new one). Rows below :func:`models.features.first_item` are never sent;
* transition rows: the whole successor list of every source row whose counts changed (CSR over the
  changed rows, values already the scored feature);
* the action head's bias and, optionally, the action calibration (temperature and bias).

Applying, building (the functions below, the one place both sides use):

* :func:`apply_delta` ``(model, vocab, delta)`` changes a :class:`~models.model.NextActionModel`
  and its :class:`~models.encoding.ItemVocab` in place (:meth:`NextActionModel.apply_delta
  <models.model.NextActionModel.apply_delta>`, :meth:`ItemVocab.set_items
  <models.encoding.ItemVocab.set_items>`); the serving side calls it through
  :meth:`models.serving.TransformerPredictor.apply_delta`, which also checks the chain;
* :func:`make_delta` extracts given rows from the trainer's model; :func:`add_items` appends new
  items to the trainer's model (each starts as the row its id read while unknown: its hash bucket);
* :func:`merge` folds two consecutive deltas into one (whole rows: the later one wins), so a
  lineage can be replayed as one delta (the inference process does after a respawn).

The trainer's loop: ``add_items`` for ids it sees first → learn → ``make_delta(rows changed or added
since the last delta)`` → ``apply_delta`` on its own model too (every delta row then reads its own
row as input, as on the workers: idempotent) → publish ``delta.encode()``. Rows it *added* since the
last delta must all be in the next one (appended rows continue the vocabulary without a gap).

Size: ``encode()`` takes about ``R * (4 d + 4 + 16 + len(id) + 3) + nnz * 8 + S * 16`` bytes plus a
small header: 2,000 item rows at ``d = 64`` (ids of ~10 characters) are ~0.58 MB, 200 transition
rows of 100 successors another 0.16 MB. Kafka refuses messages over ``message.max.bytes`` (1 MB by
default; :data:`MAX_MESSAGE_BYTES` leaves room for the record's key and headers): the trainer must
split a larger delta into several consecutive ones (each a valid step of the chain).

Chaining: ``base`` is the full version (the checkpoint's content-hash prefix) the delta applies to,
``seq`` its number (unique and increasing per trainer lineage) and ``prev`` the number of the delta it
follows (``0``: it applies right on the full version). A model labelled ``base+prev`` becomes
``base+seq``; any other model must not apply it (:meth:`ModelDelta.follows`). The bytes are
safetensors (arrays) with a JSON header (never pickle).

>>> d = ModelDelta("0123456789ab", seq=5, prev=0, item_index=np.array([8]), item_ids=["new-1"],
...                item_emb=np.ones((1, 4), np.float32), item_bias=np.zeros(1, np.float32),
...                item_category=np.zeros(1, np.int64), meta={"examples": 12})
>>> back = ModelDelta.decode(d.encode())
>>> back.label, back.item_ids, back.item_emb.shape, back.meta["examples"], back.follows("0123456789ab")
('0123456789ab+5', ['new-1'], (1, 4), 12, True)
>>> label_parts("0123456789ab+5"), label_parts("0123456789ab")
(('0123456789ab', 5), ('0123456789ab', 0))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from models.encoding import ItemVocab

FORMAT = "nextaction-delta/1"
#: Most bytes one encoded delta should take: Kafka's default ``message.max.bytes`` (1,048,588)
#: less room for the record's key and headers. Split a larger delta (module docstring).
MAX_MESSAGE_BYTES = 1_000_000


def label(base: str, seq: int) -> str:
    """The label of the weights ``base`` + deltas up to ``seq`` (``base`` alone for ``seq == 0``)."""
    return base if seq == 0 else f"{base}+{seq}"


def label_parts(text: str) -> tuple[str, int]:
    """``(base, seq)`` of a label (:func:`label`)."""
    base, _, seq = text.partition("+")
    return base, int(seq) if seq else 0


@dataclass
class ModelDelta:
    """See the module docstring. Arrays are numpy; ``R`` changed item rows, ``S`` changed transition rows."""

    base: str
    seq: int
    prev: int
    item_index: np.ndarray  # int64 [R] vocabulary rows
    item_ids: list[str]  # [R] the item id each row holds after the delta
    item_emb: np.ndarray  # float32 [R, d]
    item_bias: np.ndarray  # float32 [R]
    item_category: np.ndarray  # int64 [R] category bucket (0 = none; used by item_categories models)
    trans_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [S]
    trans_ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # int64 [S + 1]
    trans_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [nnz]
    trans_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # float32 [nnz]
    action_bias: np.ndarray | None = None  # float32 [5]: the action head's bias
    calibration: tuple[float, tuple[float, ...]] | None = None  # (temperature, per-action bias)
    meta: dict = field(default_factory=dict)  # created_ms, examples, outcomes offsets ...

    def __post_init__(self) -> None:
        self.item_index = np.asarray(self.item_index, np.int64).reshape(-1)
        r = len(self.item_index)
        self.item_emb = np.asarray(self.item_emb, np.float32).reshape(r, -1) if r else \
            np.asarray(self.item_emb, np.float32).reshape(0, -1 if np.size(self.item_emb) else 0)
        self.item_bias = np.asarray(self.item_bias, np.float32).reshape(-1)
        self.item_category = np.asarray(self.item_category, np.int64).reshape(-1)
        self.trans_rows = np.asarray(self.trans_rows, np.int64).reshape(-1)
        self.trans_ptr = np.asarray(self.trans_ptr, np.int64).reshape(-1)
        self.trans_idx = np.asarray(self.trans_idx, np.int32).reshape(-1)
        self.trans_val = np.asarray(self.trans_val, np.float32).reshape(-1)
        if self.action_bias is not None:
            self.action_bias = np.asarray(self.action_bias, np.float32).reshape(-1)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency."""
        r = len(self.item_index)
        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"delta base must be a non-empty version label (got {self.base!r})")
        if not (isinstance(self.seq, int) and isinstance(self.prev, int) and 0 <= self.prev < self.seq):
            raise ValueError(f"delta needs 0 <= prev < seq (got prev={self.prev!r}, seq={self.seq!r})")
        for name, n in (("item_ids", len(self.item_ids)), ("item_emb", len(self.item_emb)),
                        ("item_bias", len(self.item_bias)), ("item_category", len(self.item_category))):
            if n != r:
                raise ValueError(f"delta {name} has {n} rows for {r} item indices")
        if r and len(np.unique(self.item_index)) != r:
            raise ValueError("delta item_index repeats a row")
        s = len(self.trans_rows)
        if len(self.trans_ptr) != s + 1 or self.trans_ptr[0] != 0 or self.trans_ptr[-1] != len(self.trans_idx) \
                or len(self.trans_idx) != len(self.trans_val) or np.any(np.diff(self.trans_ptr) < 0):
            raise ValueError(f"delta transition CSR is inconsistent (rows {s}, ptr {len(self.trans_ptr)}, "
                             f"idx {len(self.trans_idx)}, val {len(self.trans_val)})")
        if not (np.isfinite(self.item_emb).all() and np.isfinite(self.item_bias).all()
                and np.isfinite(self.trans_val).all()):
            raise ValueError("delta holds non-finite values")
        if self.action_bias is not None and (len(self.action_bias) != 5 or not np.isfinite(self.action_bias).all()):
            raise ValueError(f"delta action_bias must be 5 finite numbers (got {self.action_bias!r})")

    @property
    def label(self) -> str:
        """The label of the weights after this delta."""
        return label(self.base, self.seq)

    def follows(self, current: str) -> bool:
        """Does this delta apply to a model labelled ``current`` (``base`` + exactly ``prev``)?"""
        return label_parts(current) == (self.base, self.prev)

    @property
    def n_rows(self) -> int:
        return len(self.item_index)

    # ------------------------------------------------------------------ bytes
    def encode(self) -> bytes:
        from safetensors.numpy import save

        tensors = {"item_index": self.item_index, "item_emb": self.item_emb, "item_bias": self.item_bias,
                   "item_category": self.item_category, "trans_rows": self.trans_rows, "trans_ptr": self.trans_ptr,
                   "trans_idx": self.trans_idx, "trans_val": self.trans_val}
        if self.action_bias is not None:
            tensors["action_bias"] = self.action_bias
        header = {"format": FORMAT, "base": self.base, "seq": self.seq, "prev": self.prev, "item_ids": self.item_ids,
                  "calibration": list(self.calibration) if self.calibration is not None else None, "meta": self.meta}
        return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                    metadata={"delta": json.dumps(header, separators=(",", ":"))})

    @classmethod
    def decode(cls, data: bytes) -> "ModelDelta":
        """Parse :meth:`encode`'s bytes; ``ValueError`` names what is wrong."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors = load(bytes(data))
            header = _header(data)
        except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a model delta: {exc}") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"delta format {header.get('format')!r}, expected {FORMAT!r}")
        cal = header.get("calibration")
        try:
            return cls(header["base"], int(header["seq"]), int(header["prev"]), tensors["item_index"],
                       list(header["item_ids"]), tensors["item_emb"], tensors["item_bias"], tensors["item_category"],
                       tensors["trans_rows"], tensors["trans_ptr"], tensors["trans_idx"], tensors["trans_val"],
                       tensors.get("action_bias"), (float(cal[0]), tuple(float(x) for x in cal[1])) if cal else None,
                       dict(header.get("meta") or {}))
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"model delta is missing {exc}") from None


def _header(data: bytes) -> dict:
    """The JSON header the safetensors metadata carries."""
    n = int.from_bytes(bytes(data[:8]), "little")
    meta = json.loads(bytes(data[8:8 + n]))["__metadata__"]
    return json.loads(meta["delta"])


# ---------------------------------------------------------------------------------- application
def apply_delta(model, vocab: "ItemVocab", delta: ModelDelta) -> list[int]:
    """Apply ``delta`` to ``model`` (a :class:`~models.model.NextActionModel`) and ``vocab`` in place,
    both or neither: everything is checked first and a ``ValueError`` (naming the problem) changes
    nothing. The chain (:meth:`ModelDelta.follows`) is the caller's to check (the predictor does).
    Returns the reused rows (existing rows whose item id changed).

    What changes is described in :meth:`models.model.NextActionModel.apply_delta` and
    :meth:`models.encoding.ItemVocab.set_items`. A trainer holding an optimizer calls
    ``model.resize_optimizer_state(optimizer)`` after a delta that grew the model.
    """
    if len(vocab) != model.cfg.n_items:
        raise ValueError(f"vocabulary has {len(vocab)} rows, the model n_items={model.cfg.n_items}")
    model.check_delta(delta)
    vocab.check_items(delta.item_index, delta.item_ids)
    reused = vocab.set_items(delta.item_index, delta.item_ids)
    model.apply_delta(delta)
    if len(reused):  # a row given to another item keeps no neighbours (as in the trainer's own model)
        model.clear_neighbours(reused)
    return reused


def make_delta(model, vocab: "ItemVocab", base: str, seq: int, prev: int, item_rows: Sequence[int] | np.ndarray,
               trans_rows: Sequence[int] | np.ndarray = (), meta: dict | None = None, *, action_bias: bool = True,
               calibration: bool = False) -> ModelDelta:
    """The delta carrying ``model``'s current ``item_rows`` (embedding, bias, category, the id
    ``vocab`` has there) and ``trans_rows`` (their successor lists; empty rows when the model has no
    table), the action head's bias (``action_bias``, when the model has a head) and, with
    ``calibration``, the action calibration. ``make_delta`` → ``encode`` → ``decode`` →
    :func:`apply_delta` on another copy of the model's checkpoint gives that copy these exact rows.

    >>> import torch
    >>> from models.config import ModelConfig
    >>> from models.encoding import ItemVocab
    >>> from models.model import NextActionModel
    >>> vocab = ItemVocab(["a", "b"], n_hash_buckets=2)
    >>> cfg = ModelConfig(n_items=len(vocab), n_hash_buckets=2, d_model=8, n_heads=2, max_len=4)
    >>> _ = torch.manual_seed(0)
    >>> trainer, server = NextActionModel(cfg), NextActionModel(cfg)
    >>> _ = server.load_state_dict(trainer.state_dict())
    >>> s_vocab = ItemVocab(vocab.items, 2)
    >>> new = add_items(trainer, vocab, ["c"])                 # trainer: a new item, row 6
    >>> with torch.no_grad():
    ...     trainer.item_bias[[4, 6]] = torch.tensor([1.0, 2.0])  # ... learns rows 4 and 6
    >>> d = make_delta(trainer, vocab, "0123456789ab", seq=1, prev=0, item_rows=[4, *new])
    >>> _ = apply_delta(trainer, vocab, d)                    # the trainer's model = the workers'
    >>> apply_delta(server, s_vocab, ModelDelta.decode(d.encode()))
    []
    >>> s_vocab == vocab, server.cfg.n_items, torch.equal(server.item_emb.weight, trainer.item_emb.weight)
    (True, 7, True)
    """
    import torch

    rows = np.asarray(item_rows, np.int64).reshape(-1)
    t_rows = np.asarray(trans_rows, np.int64).reshape(-1)
    first, n = vocab.first_item, model.cfg.n_items
    if len(vocab) != n:
        raise ValueError(f"vocabulary has {len(vocab)} rows, the model n_items={n}")
    for name, r in (("item_rows", rows), ("trans_rows", t_rows)):
        if len(r) and (int(r.min()) < first or int(r.max()) >= n):
            raise ValueError(f"{name} must be item rows in [{first}, {n}), got [{int(r.min())}, {int(r.max())}]")
    with torch.no_grad():
        sel = torch.as_tensor(rows, device=model.item_emb.weight.device)
        emb = model.item_emb.weight[sel].float().cpu().numpy()
        bias = model.item_bias[sel].float().cpu().numpy()
        cats = model.item_category[sel].cpu().numpy() if model.cat_emb is not None else np.zeros(len(rows), np.int64)
        ptr = model.trans_ptr.cpu().numpy()
        if ptr.size and len(t_rows):
            t_ptr, t_idx, t_val = _take_rows(ptr, model.trans_idx.cpu().numpy(), model.trans_val.float().cpu().numpy(),
                                             t_rows)
        else:
            t_ptr = np.zeros(len(t_rows) + 1, np.int64)
            t_idx, t_val = np.zeros(0, np.int32), np.zeros(0, np.float32)
        head = model.action_head
        a_bias = head.bias.float().cpu().numpy() if action_bias and head is not None else None
    cal = (float(model.cfg.action_temperature), tuple(float(x) for x in model.cfg.action_bias)) if calibration else None
    return ModelDelta(base, seq, prev, rows, [vocab.items[r - first] for r in rows.tolist()], emb, bias, cats,
                      t_rows, t_ptr, t_idx, t_val, a_bias, cal, dict(meta or {}))


def add_items(model, vocab: "ItemVocab", ids: Sequence[str], categories: Sequence[int] | None = None) -> list[int]:
    """Append the item ``ids`` not yet in ``vocab`` to ``model`` and ``vocab`` in place (the trainer,
    before it learns their rows); return the rows of all ``ids`` (new or known), in order. A new row
    starts as what its id read while unknown (its hash bucket's embedding and bias), so adding an
    item changes no input; ``categories`` (buckets, 0 = none) for ``item_categories`` models."""
    import torch

    ids = [str(i) for i in ids]
    fresh = [i for i in dict.fromkeys(ids) if i not in vocab]
    if fresh:
        n = model.cfg.n_items
        buckets = torch.as_tensor([vocab.bucket(i) for i in fresh], device=model.item_emb.weight.device)
        cat = dict(zip(ids, categories)) if categories is not None else {}
        with torch.no_grad():
            emb = model.item_emb.weight[buckets].float().cpu().numpy()
            bias = model.item_bias[buckets].float().cpu().numpy()
        d = ModelDelta("local", 1, 0, np.arange(n, n + len(fresh)), fresh, emb, bias,
                       np.array([int(cat.get(i, 0)) for i in fresh], np.int64))
        apply_delta(model, vocab, d)
    return [vocab.index(i) for i in ids]


def merge(first: ModelDelta, then: ModelDelta) -> ModelDelta:
    """One delta equal to applying ``first`` and then ``then`` (which must follow ``first``): the
    union of their rows, ``then``'s where both have one; ``base+first.prev`` becomes ``base+then.seq``.

    >>> a = ModelDelta("b", 1, 0, [6, 7], ["x", "y"], np.zeros((2, 2)), [0, 0], [0, 0])
    >>> c = merge(a, ModelDelta("b", 2, 1, [7], ["z"], np.ones((1, 2)), [1], [0], action_bias=np.ones(5)))
    >>> c.label, c.prev, c.item_index.tolist(), c.item_ids, c.item_bias.tolist(), c.action_bias is not None
    ('b+2', 0, [6, 7], ['x', 'z'], [0.0, 1.0], True)
    """
    if not then.follows(first.label):
        raise ValueError(f"merge: delta {then.label} (after {label(then.base, then.prev)}) does not follow "
                         f"{first.label}")
    keep = ~np.isin(first.item_index, then.item_index)
    index = np.concatenate([first.item_index[keep], then.item_index])
    order = np.argsort(index, kind="stable")
    ids = [first.item_ids[i] for i in np.flatnonzero(keep)] + list(then.item_ids)
    parts = [e for e in (first.item_emb[keep], then.item_emb) if len(e)]
    emb = np.concatenate(parts) if parts else then.item_emb
    # transition rows: the union (by row), then's list where both have the row
    t_keep = np.flatnonzero(~np.isin(first.trans_rows, then.trans_rows))
    k_ptr, k_idx, k_val = _take_rows(first.trans_ptr, first.trans_idx, first.trans_val, t_keep)
    t_rows = np.concatenate([first.trans_rows[t_keep], then.trans_rows])
    t_order = np.argsort(t_rows, kind="stable")
    t_ptr, t_idx, t_val = _take_rows(np.concatenate([k_ptr, k_ptr[-1] + then.trans_ptr[1:]]),
                                     np.concatenate([k_idx, then.trans_idx]), np.concatenate([k_val, then.trans_val]),
                                     t_order)
    return ModelDelta(
        first.base, then.seq, first.prev, index[order], [ids[i] for i in order], emb[order],
        np.concatenate([first.item_bias[keep], then.item_bias])[order],
        np.concatenate([first.item_category[keep], then.item_category])[order],
        t_rows[t_order], t_ptr, t_idx, t_val,
        then.action_bias if then.action_bias is not None else first.action_bias,
        then.calibration if then.calibration is not None else first.calibration,
        {**first.meta, **then.meta})


def _take_rows(ptr: np.ndarray, idx: np.ndarray, val: np.ndarray, rows: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR ``(ptr, idx, val)`` restricted to ``rows`` (in that order), vectorised.

    >>> _take_rows(np.array([0, 2, 2, 5]), np.arange(5), np.arange(5.0), np.array([2, 0]))[:2]
    (array([0, 3, 5]), array([2, 3, 4, 0, 1]))
    """
    rows = np.asarray(rows, np.int64)
    starts, lens = ptr[rows], ptr[rows + 1] - ptr[rows]
    new_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    pos = np.repeat(starts - new_ptr[:-1], lens) + np.arange(new_ptr[-1])
    return new_ptr, idx[pos], val[pos]
