"""The per-user attention cache of :class:`~models.serving.TransformerPredictor`.

A :class:`KVCache` is an LRU of :class:`CacheEntry` (one user's cached window: keys, values and
repeat keys per token, :func:`flatten_state` of a :class:`~models.kv_state.KVState`), keyed by
:func:`window_key`, a digest of the window's events: equal digests mean equal model input, so a
stale state can never be used (an entry also records how many online deltas its weights had:
:attr:`CacheEntry.deltas`, which the predictor bounds). It is bounded by entries and by bytes, and
with user ids holds at most one entry per user. Not thread-safe (one inference thread uses it).

>>> import torch
>>> from models.schema import EventSeq
>>> h = EventSeq.from_columns(["a", "b"], ["view", "cart"], [0, 60_000])
>>> window_key(h, 1, 8) == window_key(h[:1], 1, 8) != window_key(h, 2, 8)
True
>>> def entry(user, n=2):
...     return CacheEntry(torch.zeros(n, 4), torch.zeros(n, dtype=torch.long), n, n, 0, user, 48 * n)
>>> c = KVCache(max_entries=2, max_bytes=1 << 20)
>>> c.put(1, entry("u")); c.put(2, entry("v")); c.put(3, entry("u"))  # u's new window replaces its old one
>>> len(c), 1 in c, c.get(3).n, c.get(1)
(2, False, 2, None)
>>> c.put(4, entry("w")); [key in c for key in (2, 3, 4)], c.stats["evictions"]  # over max_entries: LRU goes
([False, True, True], 1)
>>> c.forget_user("u"), len(c)
(True, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from models.kv_state import KVState
from models.schema import EventSeq


def window_key(history: EventSeq, end: int, max_len: int) -> int:
    """Digest of the window :func:`~models.encoding.encode` builds from ``history[:end]``: its last
    ``max_len`` events and, when the window does not start at the user's first event, the
    predecessor's timestamp (the first token's gap feature depends on it). Equal digests ⇒ equal
    model input, so a state cached under this digest is valid for any history that produces it."""
    start = max(0, end - max_len)
    prev = int(history.ts[start - 1]) if start else None
    return hash((end - start, prev, history.ts[start:end].tobytes(), history.actions[start:end].tobytes(),
                 tuple(history.items[start:end]), tuple(history.devices[start:end]),
                 tuple(history.locations[start:end])))


@dataclass(slots=True)
class CacheEntry:
    """One user's cached window. ``kv``: ``[n, F]`` — per token, the keys and values of every layer
    (``H * dh`` each) followed by the repeat-head key (``d`` or 0), in the model's compute dtype and on
    its device; ``items``: ``[n]`` vocabulary indices of the window's events."""

    kv: torch.Tensor  # (n, F)
    items: torch.Tensor  # (n,) int64
    n: int  # cached tokens
    position: int  # position id the next token gets (== n unless tokens were evicted)
    since_prefill: int  # evicting (approximate) steps since the state was rebuilt from the history
    user: str | None
    nbytes: int
    deltas: int = 0  # online deltas applied to the model when its oldest token was computed


class KVCache:
    """LRU of :class:`CacheEntry` keyed by window digest, bounded by entries and by bytes.

    With user ids (``put(..., user=...)``) a user holds at most one entry: storing a new one drops
    the user's previous entry, and :meth:`forget_user` drops it on request.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0:
            raise ValueError(f"KVCache: max_entries must be >= 0 (0 disables the cache), got {max_entries!r}")
        if max_bytes < 0:
            raise ValueError(f"KVCache: max_bytes must be >= 0 (0 disables the cache), got {max_bytes!r}")
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._d: OrderedDict[int, CacheEntry] = OrderedDict()
        self._by_user: dict[str, int] = {}
        self.nbytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "stores": 0}

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: int) -> bool:
        return key in self._d

    def get(self, key: int) -> CacheEntry | None:
        """The entry (marked most recently used) or None; counts a hit or a miss."""
        e = self._d.get(key)
        if e is None:
            self.stats["misses"] += 1
            return None
        self._d.move_to_end(key)
        self.stats["hits"] += 1
        return e

    def pop(self, key: int) -> CacheEntry | None:
        e = self._d.pop(key, None)
        if e is not None:
            self.nbytes -= e.nbytes
            if e.user is not None and self._by_user.get(e.user) == key:
                del self._by_user[e.user]
        return e

    def put(self, key: int, entry: CacheEntry) -> None:
        if not self.enabled or entry.nbytes > self.max_bytes:
            return
        if entry.user is not None:
            old = self._by_user.get(entry.user)
            if old is not None and old != key:
                self.pop(old)
        self.pop(key)
        self._d[key] = entry
        self.nbytes += entry.nbytes
        if entry.user is not None:
            self._by_user[entry.user] = key
        self.stats["stores"] += 1
        while len(self._d) > self.max_entries or self.nbytes > self.max_bytes:
            k, _ = next(iter(self._d.items()))
            self.pop(k)
            self.stats["evictions"] += 1

    def forget_user(self, user: str) -> bool:
        """Drop ``user``'s entry (privacy deletion); True if there was one."""
        key = self._by_user.get(user)
        return key is not None and self.pop(key) is not None

    def clear(self) -> None:
        self._d.clear()
        self._by_user.clear()
        self.nbytes = 0


def flatten_state(state: KVState) -> torch.Tensor:
    """``KVState`` → ``[B, T, F]``: per token, layer keys, layer values (``H*dh`` each), repeat key
    (the layout of :attr:`CacheEntry.kv`)."""
    parts = [k.transpose(1, 2).flatten(2) for k in state.keys]  # each (B, T, H*dh)
    parts += [v.transpose(1, 2).flatten(2) for v in state.values]
    if state.rep_k.shape[-1]:
        parts.append(state.rep_k.to(parts[0].dtype))  # (B, T, d)
    return torch.cat(parts, dim=-1)
