"""THE encoding: a user's :class:`~models.schema.EventSeq` → model input arrays.

Training, serving (the stream) and benchmarks all call :func:`encode`; nothing else turns events into
model input. Properties the rest of the system relies on:

* **Window**: the last ``max_len`` events, **left-aligned** (position ``i`` = the ``i``-th event of the
  window; batches are right-padded by :func:`collate`).
* **Token-local features**: token ``i``'s features depend only on event ``i`` and its predecessor
  (for the time gap), never on later events and never on where the window starts. So the features
  of an event are the same whether it is encoded in a full window or alone with
  :func:`encode_last`, which is what lets the stream cache attention keys/values per user and
  encode one new token per event.
* **Index 0 is padding** in every integer feature.

The token features and the vocabulary layout are declared in :mod:`models.features` (all ``int64``
arrays of length ``L``, in :data:`~models.features.FEATURES` order); features switched off in
``cfg.features`` are all zeros (the padding embedding contributes nothing). ``gap_log``
(``float32``) is ``log1p`` of the gap in seconds to the previous event (0 for the first) and is the
regression target of the time head.

>>> from models.config import ModelConfig
>>> from models.schema import EventSeq
>>> vocab = ItemVocab(["a", "b", "c"], n_hash_buckets=4)
>>> len(vocab), vocab.index("a"), vocab.index("c"), vocab.index("zzz") in range(2, 6)
(9, 6, 8, True)
>>> cfg = ModelConfig(n_items=len(vocab), n_hash_buckets=4, max_len=3)
>>> h = EventSeq.from_columns(["a", "b", "a", "c"], ["view", "view", "cart", "purchase"],
...                           [0, 1_000, 61_000, 3_661_000], devices=["ios", "ios", "", "web"])
>>> x = encode(h, vocab, cfg)
>>> x["item"].tolist(), x["action"].tolist()
([7, 6, 8], [1, 3, 5])
>>> x["gap"].tolist()  # 1 s, 60 s, 3600 s to the previous event: log2 buckets
[3, 7, 13]
>>> x["hour"].tolist(), x["dow"].tolist()  # 1970-01-01 was a Thursday (dow 4)
([1, 1, 2], [4, 4, 4])
>>> x["device"].tolist()[1], x["device"].tolist()[0] > 0
(0, True)
>>> {k: v[-1].item() for k, v in encode_last(h, vocab, cfg).items()} == {k: v[-1].item() for k, v in x.items()}
True
>>> b = collate([x, encode(h[0:1], vocab, cfg)])
>>> b["item"].shape, b["lengths"].tolist(), b["item"][1].tolist()
(torch.Size([2, 3]), [3, 1], [6, 0, 0])
"""

from __future__ import annotations

import json
import zlib
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from models.errors import CheckpointError
from models.features import FEATURES, N_SPECIAL, first_item
from models.schema import EventSeq

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from models.config import ModelConfig

_MS_HOUR = 3_600_000
_MS_DAY = 86_400_000


@lru_cache(maxsize=1 << 16)
def stable_hash(text: str) -> int:
    """A process-independent 32-bit hash (crc32 of UTF-8; never Python's salted ``hash``).

    >>> stable_hash("ios")
    2469297747
    """
    return zlib.crc32(text.encode("utf-8"))


def hash_bucket(text: str, n_buckets: int) -> int:
    """0 for ``""`` (unknown), else ``1 + crc32 % (n_buckets - 1)``.

    >>> hash_bucket("", 64), hash_bucket("ios", 64) == hash_bucket("ios", 64) != 0
    (0, True)
    """
    if not text:
        return 0
    return 1 + stable_hash(text) % (n_buckets - 1)


class ItemVocab:
    """Item id ↔ index, in the layout of :mod:`models.features`: padding, mask token, ``H`` hash
    buckets for unknown items, then the known items in the given order (``first_item`` onwards).
    Growing the vocabulary (:meth:`extended`) appends rows: every existing index stays where it was.
    Online deltas change a vocabulary in place (:meth:`set_items`): new rows are appended, and a known
    item's row can be given to another id (row reuse; the old id then reads its hash bucket again).

    >>> v = ItemVocab(["x", "y"], n_hash_buckets=2)
    >>> v.first_item, len(v), v.index("x"), N_SPECIAL <= v.index("unseen") < v.first_item
    (4, 6, 4, True)
    >>> ItemVocab.from_json(v.to_json()) == v
    True
    >>> w = v.extended(["z", "x"])
    >>> len(w), w.index("x"), w.index("z")
    (7, 4, 6)
    >>> w.set_items([5, 7], ["y2", "new"])  # row 5 now holds "y2" (reused), row 7 is appended
    [5]
    >>> len(w), w.index("y2"), w.index("new"), w.index("y") == w.bucket("y")
    (8, 5, 7, True)
    """

    def __init__(self, items: Iterable[str], n_hash_buckets: int = 1024) -> None:
        if n_hash_buckets < 1:
            raise ValueError(f"n_hash_buckets must be >= 1, got {n_hash_buckets}")
        self.items: list[str] = [str(i) for i in items]
        self.n_hash_buckets = int(n_hash_buckets)
        self.first_item = first_item(self.n_hash_buckets)
        self._index = {item: self.first_item + k for k, item in enumerate(self.items)}
        if len(self._index) != len(self.items):
            seen: set[str] = set()
            dup = next(i for i in self.items if i in seen or seen.add(i))
            raise ValueError(f"duplicate item id in vocabulary: {dup!r}")

    def __len__(self) -> int:
        return self.first_item + len(self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemVocab) and (self.items, self.n_hash_buckets) == (other.items,
                                                                                      other.n_hash_buckets)

    def __contains__(self, item: str) -> bool:
        return item in self._index

    def index(self, item: str) -> int:
        """Vocabulary index; unknown ids map to their hash bucket (:meth:`bucket`)."""
        idx = self._index.get(item)
        if idx is None:
            return self.bucket(item)
        return idx

    def bucket(self, item: str) -> int:
        """The hash-bucket index of ``item`` (known or not): ``N_SPECIAL + crc32(id) % n_hash_buckets``."""
        return N_SPECIAL + stable_hash(item) % self.n_hash_buckets

    def indices(self, items: Sequence[str]) -> np.ndarray:
        """:meth:`index` of each item, as ``int64[len(items)]``."""
        get, first, nb = self._index.get, N_SPECIAL, self.n_hash_buckets
        return np.fromiter((get(i) or first + stable_hash(i) % nb for i in items), np.int64, len(items))

    def extended(self, new_items: Iterable[str]) -> "ItemVocab":
        """A vocabulary with ``new_items`` (not yet known) appended; existing indices unchanged."""
        extra = [i for i in dict.fromkeys(map(str, new_items)) if i not in self._index]
        return ItemVocab(self.items + extra, self.n_hash_buckets)

    def check_items(self, indices: Sequence[int] | np.ndarray, ids: Sequence[str]) -> list[int]:
        """Validate :meth:`set_items` arguments without changing anything; return the existing rows
        whose id would change (reused rows), ascending. Raises ``ValueError`` naming the first
        problem: an index below :attr:`first_item` (padding, mask, hash buckets), a repeated index,
        appended indices that do not continue the vocabulary (``len(self)``, ``len(self) + 1`` ...),
        or an id that would be held by two rows."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        ids = [str(i) for i in ids]
        if len(ids) != len(idx):
            raise ValueError(f"set_items: {len(idx)} indices but {len(ids)} ids")
        n, first = len(self), self.first_item
        below = idx[idx < first]
        if below.size:
            raise ValueError(f"set_items: index {int(below[0])} is below the first item row ({first}): "
                             "padding, mask and hash-bucket rows hold no item id")
        if len(np.unique(idx)) != len(idx):
            vals, counts = np.unique(idx, return_counts=True)
            raise ValueError(f"set_items: index {int(vals[counts > 1][0])} is given twice")
        new = np.sort(idx[idx >= n])
        expect = np.arange(n, n + len(new))
        if len(new) and not np.array_equal(new, expect):
            bad = int(new[np.flatnonzero(new != expect)[0]])
            raise ValueError(f"set_items: index {bad} leaves a gap: new rows must continue the vocabulary "
                             f"at {n}, {n + 1}, ... (it has {n} rows)")
        changed = {int(i) for i in idx}
        seen: dict[str, int] = {}
        reused = []
        for i, item in zip(idx.tolist(), ids):
            if item in seen:
                raise ValueError(f"set_items: item id {item!r} is given to rows {seen[item]} and {i}")
            seen[item] = i
            held = self._index.get(item)
            if held is not None and held != i and held not in changed:
                raise ValueError(f"set_items: item id {item!r} is already at row {held}, cannot also be at row {i}")
            if i < n and self.items[i - first] != item:
                reused.append(i)
        return sorted(reused)

    def set_items(self, indices: Sequence[int] | np.ndarray, ids: Sequence[str]) -> list[int]:
        """Give row ``indices[k]`` the item id ``ids[k]``, in place (an online delta: :mod:`models.delta`).

        An index ``== len(self)`` (and the following ones, in any order in the arguments but without
        a gap) appends a row; the index of an existing item row replaces that row's id (**row
        reuse**: the old id is then unknown and maps to its hash bucket, :meth:`bucket`); an index
        whose id does not change is a no-op. Checked first (:meth:`check_items`), so a ``ValueError``
        changes nothing. Returns the reused rows (ascending).
        """
        reused = self.check_items(indices, ids)
        first, n = self.first_item, len(self)
        pairs = sorted(zip(np.asarray(indices, np.int64).reshape(-1).tolist(), (str(i) for i in ids)))
        for i, _ in pairs:  # the old ids of changed rows first (a swap within one call works)
            if i < n:
                old = self.items[i - first]
                if self._index.get(old) == i:
                    del self._index[old]
        for i, item in pairs:
            if i < n:
                self.items[i - first] = item
            else:
                self.items.append(item)
            self._index[item] = i
        return reused

    def to_json(self) -> str:
        return json.dumps({"format": "nextaction-vocab/1", "n_hash_buckets": self.n_hash_buckets,
                           "items": self.items})

    @classmethod
    def from_json(cls, text: str) -> "ItemVocab":
        try:
            d = json.loads(text)
            if d.get("format") != "nextaction-vocab/1":
                raise CheckpointError(f"vocab.json: unknown format {d.get('format')!r} "
                                      f"(expected 'nextaction-vocab/1')")
            return cls(d["items"], d["n_hash_buckets"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"vocab.json is not a valid vocabulary: {exc}") from None


def _gap_buckets(gap_s: np.ndarray, n_buckets: int) -> np.ndarray:
    """``2 + floor(log2(1 + gap_s))`` capped at ``n_buckets - 1`` (vectorised)."""
    b = 2 + np.floor(np.log2(1.0 + np.maximum(gap_s, 0.0))).astype(np.int64)
    return np.minimum(b, n_buckets - 1)


def encode(history: EventSeq, vocab: ItemVocab, cfg: "ModelConfig", max_len: int | None = None
           ) -> dict[str, np.ndarray]:
    """Encode the last ``max_len`` (default ``cfg.max_len``) events of ``history``, left-aligned.

    Returns ``{feature: int64[L]}`` for every :data:`~models.features.FEATURES` entry, in that
    order, plus ``gap_log`` (float32[L]), ``L = min(len(history), max_len)``. Pure: same input, same
    output, in every process.
    """
    n_all = len(history)
    max_len = cfg.max_len if max_len is None else max_len
    L = min(n_all, max_len)
    start = n_all - L
    ev = history[start:] if start else history
    ts = ev.ts.astype(np.int64)
    prev = np.empty(L, np.int64)
    if L:
        prev[1:] = ts[:-1]
        prev[0] = history.ts[start - 1] if start else ts[0]
    gap_s = (ts - prev).astype(np.float64) / 1000.0
    gap_log = np.log1p(np.maximum(gap_s, 0.0)).astype(np.float32)

    def gap() -> np.ndarray:
        g = _gap_buckets(gap_s, cfg.n_gap_buckets)
        if L and start == 0:
            g[0] = 1  # the user's first event: no predecessor
        return g

    values = {  # one entry per models.features.FEATURES name (a missing one fails every call)
        "item": lambda: vocab.indices(ev.items),
        "action": lambda: ev.actions.astype(np.int64) + 1,
        "gap": gap,
        "hour": lambda: (ts // _MS_HOUR) % 24 + 1,
        "dow": lambda: (ts // _MS_DAY + 3) % 7 + 1,
        "device": lambda: np.fromiter((hash_bucket(d, cfg.n_device_buckets) for d in ev.devices), np.int64, L),
        "location": lambda: np.fromiter((hash_bucket(d, cfg.n_location_buckets) for d in ev.locations), np.int64, L),
    }
    zeros = np.zeros(L, np.int64)
    out: dict[str, np.ndarray] = {f: values[f]() if f == "item" or cfg.uses(f) else zeros for f in FEATURES}
    if L and start == 0:
        gap_log[0] = 0.0
    out["gap_log"] = gap_log
    return out


def encode_last(history: EventSeq, vocab: ItemVocab, cfg: "ModelConfig", n: int = 1) -> dict[str, np.ndarray]:
    """The features of the last ``n`` events only — identical to ``encode(history)[-n:]`` (it *is*
    :func:`encode`, on the last ``n + 1`` events so the first of them still sees its predecessor)."""
    enc = encode(history.tail(n + 1), vocab, cfg, max_len=n + 1)
    if len(history) > n:
        return {k: v[1:] for k, v in enc.items()}
    return enc


def collate(encoded: Sequence[dict[str, np.ndarray]], pad_to: int | None = None) -> dict[str, "torch.Tensor"]:
    """Right-pad a list of :func:`encode` outputs into a batch.

    Returns ``{feature: LongTensor[B, T]}``, ``gap_log: FloatTensor[B, T]`` and
    ``lengths: LongTensor[B]``, with ``T = max(lengths)`` (or ``pad_to``).
    """
    import torch

    B = len(encoded)
    lengths = np.fromiter((len(e["item"]) for e in encoded), np.int64, B)
    T = int(lengths.max(initial=0)) if pad_to is None else int(pad_to)
    out: dict[str, torch.Tensor] = {}
    for key in (*FEATURES, "gap_log"):
        arr = np.zeros((B, T), np.float32 if key == "gap_log" else np.int64)
        for r, e in enumerate(encoded):
            v = e[key]
            arr[r, : len(v)] = v[:T]
        out[key] = torch.from_numpy(arr)
    out["lengths"] = torch.from_numpy(np.minimum(lengths, T))
    return out
