"""The incremental serving state of :class:`~models.model.NextActionModel`.

:class:`KVState` is what :meth:`~models.model.NextActionModel.prefill` returns and
:meth:`~models.model.NextActionModel.step` continues: per user, the attention keys/values of every
layer, the repeat-head keys and the vocabulary indices of the cached events. :class:`LastHidden`
is what the heads need for the last event of each history, so that a serving batch runs every
prefill and step first and scores the catalogue once (:meth:`~models.model.NextActionModel.heads`).

>>> import torch
>>> def user(n):  # a 1-layer state of one user with n cached tokens (H = 2, dh = 4, d = 8)
...     kv = [torch.randn(1, 2, n, 4)]
...     return KVState(kv, [torch.randn(1, 2, n, 4)], torch.randn(1, n, 8), torch.arange(1, n + 1)[None],
...                    torch.tensor([n]), torch.tensor([n]))
>>> st = KVState.stack([user(3), user(1)])  # right-padded to T = 3
>>> tuple(st.keys[0].shape), st.lengths.tolist(), st.items.tolist()
((2, 2, 3, 4), [3, 1], [[1, 2, 3], [1, 0, 0]])
>>> [s.items.tolist() for s in st.split()]
[[[1, 2, 3]], [[1]]]
>>> ev = st.evict_oldest(torch.tensor([True, False]))  # drop user 0's oldest token
>>> ev.lengths.tolist(), ev.positions.tolist(), ev.items[0].tolist()[:2]
([2, 1], [3, 1], [2, 3])
>>> tuple(ev.trimmed().keys[0].shape)
(2, 2, 2, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.features import PAD


@dataclass
class LastHidden:
    """What the heads need for the last event of each history: serving runs a batch's prefills and
    steps first and then all heads in one :meth:`NextActionModel.heads` call, so the catalogue is
    scored (and its ``[V, d]`` table read from memory) once per batch, not once per model call.

    ``h [B, d]``; ``rep [B, T]`` repeat scores over the history positions and ``hist [B, T]`` the
    item indices there (``None`` without a repeat head; ``hist`` also with ``exclude_seen``); ``action [B]`` the last event's action and
    ``item [B, W]`` the vocabulary indices of the last ``W`` events, the last first (for the transition
    and neighbour tables; :attr:`~models.model.NextActionModel.last_window`).
    """

    h: torch.Tensor
    rep: torch.Tensor | None
    hist: torch.Tensor | None
    action: torch.Tensor
    item: torch.Tensor

    @staticmethod
    def cat(parts: list["LastHidden"]) -> "LastHidden":
        """Rows of several parts in order; ``rep``/``hist`` right-padded with 0 / padding (a zero
        repeat score added onto the padding column, which is never scored)."""
        if len(parts) == 1:
            return parts[0]
        rep = hist = None
        if parts[0].hist is not None:  # a repeat head, or the window's items to exclude (exclude_seen)
            T = max(p.hist.shape[1] for p in parts)
            hist = torch.cat([F.pad(p.hist, (0, T - p.hist.shape[1]), value=PAD) for p in parts])
        if parts[0].rep is not None:
            rep = torch.cat([F.pad(p.rep.float(), (0, T - p.rep.shape[1])) for p in parts])
        return LastHidden(torch.cat([p.h for p in parts]), rep, hist, torch.cat([p.action for p in parts]),
                          torch.cat([p.item for p in parts]))

    def rows(self, start: int, stop: int) -> "LastHidden":
        sl = slice(start, stop)
        return LastHidden(self.h[sl], None if self.rep is None else self.rep[sl],
                          None if self.hist is None else self.hist[sl], self.action[sl], self.item[sl])



@dataclass
class KVState:
    """Per-user incremental state for a batch of users (right-padded along ``T``).

    ``keys``/``values``: one ``[B, H, T, dh]`` tensor per layer; ``rep_k``: ``[B, T, d]`` repeat-head
    keys; ``items``: ``[B, T]`` vocabulary indices of the cached events (0 = empty slot);
    ``lengths``: ``[B]`` cached tokens per user; ``positions``: ``[B]`` the position id the next
    token gets (equals ``lengths`` until tokens are evicted).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rep_k: torch.Tensor
    items: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def split(self) -> list["KVState"]:
        """One state per user, trimmed to its own length (for a per-user LRU cache)."""
        out = []
        for b in range(self.batch_size):
            n = int(self.lengths[b])
            out.append(KVState([k[b:b + 1, :, :n].clone() for k in self.keys],
                               [v[b:b + 1, :, :n].clone() for v in self.values],
                               self.rep_k[b:b + 1, :n].clone(), self.items[b:b + 1, :n].clone(),
                               self.lengths[b:b + 1].clone(), self.positions[b:b + 1].clone()))
        return out

    @staticmethod
    def stack(states: list["KVState"]) -> "KVState":
        """Right-pad and concatenate single- or multi-user states into one batch state."""
        T = max(int(s.lengths.max()) for s in states)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            extra = T - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        n_layers = len(states[0].keys)
        return KVState([torch.cat([pad(s.keys[i], 2) for s in states]) for i in range(n_layers)],
                       [torch.cat([pad(s.values[i], 2) for s in states]) for i in range(n_layers)],
                       torch.cat([pad(s.rep_k, 1) for s in states]), torch.cat([pad(s.items, 1) for s in states]),
                       torch.cat([s.lengths for s in states]), torch.cat([s.positions for s in states]))

    def to(self, device: torch.device | str) -> "KVState":
        return KVState([k.to(device) for k in self.keys], [v.to(device) for v in self.values],
                       self.rep_k.to(device), self.items.to(device), self.lengths.to(device),
                       self.positions.to(device))

    def nbytes(self) -> int:
        ts = [*self.keys, *self.values, self.rep_k, self.items, self.lengths, self.positions]
        return sum(t.numel() * t.element_size() for t in ts)

    def evict_oldest(self, rows: torch.Tensor) -> "KVState":
        """Drop the first cached token of the users in ``rows`` (bool ``[B]``), shifting left; their
        ``positions`` are kept (RoPE positions stay relative)."""
        T = self.keys[0].shape[2]
        dev = self.lengths.device
        idx = torch.arange(T, device=dev)[None, :] + rows.long()[:, None]  # (B, T)
        idx = idx.clamp(max=T - 1)

        def shift(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = [t.shape[0]] + [1] * (t.dim() - 1)
            shape[dim] = T
            return torch.gather(t, dim, idx.view(shape).expand_as(t))

        lengths = self.lengths - rows.long()
        return KVState([shift(k, 2) for k in self.keys], [shift(v, 2) for v in self.values], shift(self.rep_k, 1)
                       if self.rep_k.shape[-1] else self.rep_k, shift(self.items, 1), lengths, self.positions)

    def trimmed(self) -> "KVState":
        """The state cut to its longest user's length (itself when nothing is to cut)."""
        T = int(self.lengths.max())
        if T == self.keys[0].shape[2]:
            return self
        return KVState([k[:, :, :T] for k in self.keys], [v[:, :, :T] for v in self.values], self.rep_k[:, :T],
                       self.items[:, :T], self.lengths, self.positions)
