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

import numpy as np

FORMAT = "nextaction-delta/1"


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
