"""The next-action Transformer: :class:`NextActionModel`, our embeddings and heads around a backbone.

Input: a :func:`models.encoding.collate` batch. Each token is embedded as
``LayerNorm(item row + one embedding per token feature)`` (:mod:`models.features`) and run through
a backbone (:mod:`models.backbones`, built from the config, never downloaded). Heads, at every
position ``t`` (each predicts event ``t + 1``):

* next item: ``h_t · E_item + bias`` over the vocabulary (the item table is tied to the input),
  plus a learned **repeat score** ``q(h_t) · k(h_j) / sqrt(d) + recency(t - j)`` added to the item
  of each history position ``j <= t`` and, when the checkpoint has one, a **transition score**
  ``w * f(count(last item -> j))`` (:mod:`models.transitions`), and a **neighbour score**
  ``w' * sum(cosine(i, j))`` over the last ``cfg.neighbour_window`` events ``i`` (:mod:`models.neighbours`),
  and with item categories a **category-recency score** ``w'' / (1 + d)`` for an item whose category
  one of the last ``cfg.category_window`` events had, ``d`` events ago (:meth:`~NextActionModel.category_recency`).
  Trained with full-softmax cross-entropy, or a sampled softmax over ``cfg.n_negatives`` uniform
  negatives shared by the batch.
* next action: a softmax over :data:`models.schema.ACTIONS` (optionally calibrated:
  :mod:`models.calibration`).
* time to the next event: regression on ``log1p(seconds)`` (Huber).

Serving: :meth:`NextActionModel.score_last` on a batch, or incrementally :meth:`~NextActionModel.prefill`
once per user, then :meth:`~NextActionModel.step` with one new token per event
(:class:`~models.kv_state.KVState`). Incremental outputs equal full recomputation while the window
is not full (``length < max_len``); at the cap :meth:`~NextActionModel.step` raises unless
``evict=True`` (``llama`` only), which drops the oldest token (an approximation: the remaining
cached states still remember it). Why it is built this way: docs/architecture.md, "The model" and
"Model defaults and why".

>>> from models.config import ModelConfig
>>> from models.encoding import ItemVocab, collate, encode, encode_last
>>> from models.schema import EventSeq
>>> vocab = ItemVocab(["a", "b", "c"], n_hash_buckets=4)
>>> cfg = ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=16, max_len=8, dropout=0.0)
>>> _ = torch.manual_seed(0)
>>> model = NextActionModel(cfg).eval()
>>> h = EventSeq.from_columns(["a", "b", "c"], ["view", "cart", "view"], [0, 60_000, 120_000])
>>> out = model.score_last(collate([encode(h, vocab, cfg)]))
>>> out["item_scores"].shape, out["action_probs"].shape, out["gap_log_s"].shape  # V = len(vocab)
(torch.Size([1, 9]), torch.Size([1, 5]), torch.Size([1]))
>>> _, state = model.prefill(collate([encode(h[:2], vocab, cfg)]))
>>> inc, state = model.step(collate([encode_last(h, vocab, cfg)]), state)
>>> torch.allclose(inc["item_scores"], out["item_scores"], atol=1e-4), state.lengths.tolist()
(True, [3])
>>> _, loss = model.train()(collate([encode(h, vocab, cfg)]))  # training: (outputs, scalar loss)
>>> loss.dim()
0
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone, cache_tensors, llama_forward
from models.config import ModelConfig
from models.errors import ConfigError
from models.features import MASK, N_SPECIAL, PAD, embedding_rows, first_item
from models.kv_state import KVState, LastHidden
from models.schema import N_ACTIONS
from models.topk import chunked_topk

if TYPE_CHECKING:  # pragma: no cover
    from models.delta import ModelDelta

#: Extra candidates a reduced-precision catalogue scan keeps for exact rescoring (:meth:`NextActionModel.top_items`).
TOPK_MARGIN = 32


class NextActionModel(nn.Module):
    """See the module docstring. ``forward(batch) -> (outputs, loss)``; ``score_last(batch)`` for serving."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.n_items == 0:
            raise ConfigError("n_items", 0, "set it to len(ItemVocab) (models.train.model_config_for does)")
        self.cfg = cfg
        d = cfg.d_model
        self.first_item = first_item(cfg.n_hash_buckets)  # models.features layout: pad, mask, buckets, items
        self.item_emb = nn.Embedding(cfg.n_items, d, padding_idx=PAD)
        # the embedding row each vocabulary index reads as *input*: itself, or for a known item that
        # never occurred in training its hash bucket (its own row was only ever trained as an output
        # negative, and as input it made the heads extrapolate wildly). Saved with the weights.
        self.register_buffer("item_input", torch.arange(cfg.n_items), persistent=True)
        # cfg.item_categories: each vocabulary index's category bucket (0 = none), set by training
        self.cat_emb = nn.Embedding(cfg.n_category_buckets + 1, d, padding_idx=0) if cfg.item_categories else None
        self._rows_cache: tuple | None = None  # item_vectors() while serving
        self._table_cache: tuple | None = None  # (rows, bias) in a scan dtype while serving
        self.register_buffer("item_category", torch.zeros(cfg.n_items if cfg.item_categories else 0,
                                                          dtype=torch.long), persistent=True)
        # item-to-item transition table (models/transitions.py), CSR over vocabulary indices; empty
        # until training fits it (set_transitions). Scored with weight cfg.transition_weight.
        self.register_buffer("trans_ptr", torch.zeros(0, dtype=torch.long), persistent=True)
        self.register_buffer("trans_idx", torch.zeros(0, dtype=torch.int32), persistent=True)
        self.register_buffer("trans_val", torch.zeros(0), persistent=True)
        # item neighbours (models/neighbours.py), the same CSR layout; scored for the last
        # cfg.neighbour_window events with weight cfg.neighbour_weight (set_neighbours)
        self.register_buffer("nbr_ptr", torch.zeros(0, dtype=torch.long), persistent=True)
        self.register_buffer("nbr_idx", torch.zeros(0, dtype=torch.int32), persistent=True)
        self.register_buffer("nbr_val", torch.zeros(0), persistent=True)
        self.feat_emb = nn.ModuleDict({f: nn.Embedding(n, d, padding_idx=0) for f, n in embedding_rows(cfg).items()})
        self.emb_norm = nn.LayerNorm(d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.backbone = build_backbone(cfg)
        # prefill/step in eval mode run the llama backbone through llama_forward (False: `transformers`)
        self.lean_serving = True
        # serving mode: rank only items outside the user's window (discovery surfaces); the history
        # items score -inf and the category term uses cfg.category_weight_unseen (fitted for this mode)
        self.exclude_seen = False
        self.out_drop = nn.Dropout(cfg.dropout)
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_items))
        if cfg.repeat_head:
            self.rep_q = nn.Linear(d, d)
            self.rep_k = nn.Linear(d, d)
            self.rep_recency = nn.Embedding(cfg.max_len + 1, 1)
        self.action_head = nn.Linear(d, N_ACTIONS) if cfg.action_head else None
        # next-action logits += a learned row per *current* action (a last-action Markov path that
        # the hidden-state dropout does not touch); index 0 = action unknown / feature off
        self.action_prior = nn.Embedding(N_ACTIONS + 1, N_ACTIONS) if cfg.action_head and cfg.action_prior else None
        self.gap_head = nn.Linear(d, 1) if cfg.gap_head else None
        self._init_weights()
        if self.action_prior is not None:
            nn.init.zeros_(self.action_prior.weight)

    def _init_weights(self) -> None:
        nn.init.normal_(self.item_emb.weight, std=0.05)
        for emb in self.feat_emb.values():
            nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
            for emb in self.feat_emb.values():
                emb.weight[0].zero_()
        if self.cfg.repeat_head:
            nn.init.normal_(self.rep_q.weight, std=0.02)
            nn.init.normal_(self.rep_k.weight, std=0.02)
            nn.init.zeros_(self.rep_q.bias)
            nn.init.zeros_(self.rep_k.bias)
            nn.init.zeros_(self.rep_recency.weight)

    @torch.no_grad()
    def init_item_bias(self, counts) -> None:
        """Start the per-item bias at centred ``log(1 + count)`` of the training events (``counts``
        indexed by vocabulary): the model starts at the popularity prior instead of uniform, which
        saves the first epoch(s) of full-softmax training."""
        c = torch.as_tensor(counts, dtype=torch.float32, device=self.item_bias.device)
        b = torch.log1p(c)
        known = b[self.first_item:]
        b = b - (known.mean() if known.numel() else 0.0)
        b[: self.first_item] = b[self.first_item:].min() if known.numel() else 0.0
        self.item_bias.copy_(b)

    # ------------------------------------------------------------------------------------------
    # building blocks
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_untrained_items(self, indices, buckets) -> None:
        """Make the known items at vocabulary ``indices`` (never seen in training) read the embedding
        of their hash ``buckets`` as input, as unknown items do (``ItemVocab.bucket``). Their output
        rows (scores) are unchanged."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.item_input.device)
        self.item_input.copy_(torch.arange(self.cfg.n_items, device=self.item_input.device))
        self.item_input[idx] = torch.as_tensor(buckets, dtype=torch.long, device=self.item_input.device)

    @torch.no_grad()
    def set_unknown_item_rows(self, trained_indices) -> None:
        """Set every hash-bucket row to the mean embedding of the items at ``trained_indices`` (the
        known items training saw): the expected embedding of an item of unknown identity, for unknown
        ids and untrained catalogue items alike (see ``item_input``). Only for models trained with
        ``unknown_item_rate = 0``, whose bucket rows training never touches (why the mean:
        benchmarks/RESULTS.md, "Transformer training", session 3)."""
        idx = torch.as_tensor(trained_indices, dtype=torch.long, device=self.item_emb.weight.device)
        if idx.numel():
            self.item_emb.weight[N_SPECIAL:self.first_item] = self.item_emb.weight[idx].mean(0)  # bucket rows

    @torch.no_grad()
    def set_item_categories(self, buckets) -> None:
        """Set each vocabulary index's category bucket (``[n_items]``, 0 = no category)."""
        self.item_category.copy_(torch.as_tensor(buckets, dtype=torch.long, device=self.item_category.device))

    def item_vectors(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Item rows as scored and as read: the item's own embedding (+ its category's, with
        ``item_categories``); all ``[V, d]`` rows, or those at ``idx``."""
        if self.cat_emb is None:
            return self.item_emb.weight if idx is None else self.item_emb(idx)
        if idx is not None:
            return self.item_emb(idx) + self.cat_emb(self.item_category[idx])
        if self.training or torch.is_grad_enabled():
            return self.item_emb.weight + self.cat_emb(self.item_category)
        # serving: the [V, d] sum once per weight version, not once per batch
        key = self._item_weights_key()
        if self._rows_cache is None or self._rows_cache[0] != key:
            self._rows_cache = (key, self.item_emb.weight + self.cat_emb(self.item_category))
        return self._rows_cache[1]

    def _item_weights_key(self) -> tuple:
        """Identifies the current item rows and biases (storage and in-place version of each source
        tensor): the serving caches of :meth:`item_vectors` and :meth:`_item_table` rebuild on a change."""
        src = [self.item_emb.weight, self.item_bias]
        if self.cat_emb is not None:
            src += [self.cat_emb.weight, self.item_category]
        return tuple((t.data_ptr(), t._version) for t in src)

    @torch.no_grad()
    def set_transitions(self, table) -> None:
        """Install a :class:`~models.transitions.Transitions` table (None: remove it). Its values are
        scored as they are (build them with ``with_feature``), times ``cfg.transition_weight``."""
        self.trans_ptr, self.trans_idx, self.trans_val = self._csr_buffers(table, "table")

    def _csr_buffers(self, table, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ptr, idx, val)`` on the model's device for a CSR table over the vocabulary (None: empty)."""
        dev = self.item_emb.weight.device
        if table is None:
            ptr, idx, val = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.int32), torch.zeros(0)
        else:
            if table.n_items != self.cfg.n_items:
                raise ValueError(f"{what} has {table.n_items} rows, expected the model's n_items={self.cfg.n_items}")
            ptr, idx, val = (torch.as_tensor(table.ptr, dtype=torch.long), torch.as_tensor(table.idx, dtype=torch.int32),
                             torch.as_tensor(table.val, dtype=torch.float32))
        return ptr.to(dev), idx.to(dev), val.to(dev)

    @torch.no_grad()
    def set_neighbours(self, table) -> None:
        """Install a neighbour table (:func:`models.neighbours.count_neighbours`; None: remove it),
        scored times ``cfg.neighbour_weight`` for each of the last ``cfg.neighbour_window`` events."""
        self.nbr_ptr, self.nbr_idx, self.nbr_val = self._csr_buffers(table, "neighbour table")

    @torch.no_grad()
    def clear_neighbours(self, rows) -> None:
        """Forget the neighbours of vocabulary ``rows`` given to other items online: their own lists
        and their places in other items' lists score 0 from now on (the table keeps its shape)."""
        rows = torch.as_tensor(np.asarray(rows, np.int64).reshape(-1), device=self.nbr_ptr.device)
        if not self.nbr_ptr.numel() or not rows.numel():
            return
        own = torch.zeros(self.nbr_idx.numel(), dtype=torch.bool, device=rows.device)
        for r in rows.tolist():
            own[int(self.nbr_ptr[r]): int(self.nbr_ptr[r + 1])] = True
        self.nbr_val[own | torch.isin(self.nbr_idx.long(), rows)] = 0.0

    # ------------------------------------------------------------------------------------------
    # online deltas (models/delta.py)
    # ------------------------------------------------------------------------------------------
    def check_delta(self, delta: "ModelDelta") -> ModelConfig:
        """Raise ``ValueError`` naming the first way ``delta`` does not fit this model (nothing
        changes); return the config the model has after :meth:`apply_delta`."""
        cfg, first, n = self.cfg, self.first_item, self.cfg.n_items
        idx = delta.item_index
        if len(idx) and delta.item_emb.shape[1] != cfg.d_model:
            raise ValueError(f"delta item rows have width {delta.item_emb.shape[1]}, the model d_model={cfg.d_model}")
        if len(idx) and int(idx.min()) < first:
            raise ValueError(f"delta item row {int(idx.min())} is below the first item row ({first})")
        new = np.sort(idx[idx >= n])
        if len(new) and not np.array_equal(new, np.arange(n, n + len(new))):
            raise ValueError(f"delta appends rows {new[:5].tolist()}... to a model of {n} rows: new rows must be "
                             f"{n}, {n + 1}, ... without a gap")
        n_after = n + len(new)
        if self.cat_emb is not None and len(idx):
            cats = delta.item_category
            if int(cats.min()) < 0 or int(cats.max()) > cfg.n_category_buckets:
                raise ValueError(f"delta item categories must be in [0, {cfg.n_category_buckets}]")
        rows = delta.trans_rows
        if len(rows):
            if len(np.unique(rows)) != len(rows):
                raise ValueError("delta trans_rows repeats a row")
            for name, a in (("trans_rows", rows), ("trans_idx", delta.trans_idx)):
                if len(a) and (int(a.min()) < first or int(a.max()) >= n_after):
                    raise ValueError(f"delta {name} must be item rows in [{first}, {n_after}), got "
                                     f"[{int(a.min())}, {int(a.max())}]")
        if delta.action_bias is not None and self.action_head is None:
            raise ValueError("delta carries an action bias but the model has no action head")
        changes: dict = {"n_items": n_after}
        if delta.calibration is not None:
            t, b = delta.calibration
            changes.update(action_temperature=float(t), action_bias=tuple(float(x) for x in b))
        return dataclasses.replace(cfg, **changes)  # validates (ConfigError is a ValueError)

    @torch.no_grad()
    def apply_delta(self, delta: "ModelDelta") -> None:
        """Apply ``delta``'s arrays in place (the vocabulary is not touched: call
        :func:`models.delta.apply_delta`, which keeps both in step). Checked first
        (:meth:`check_delta`), so a ``ValueError`` changes nothing.

        * rows past ``n_items`` grow the item tables (``item_emb``, ``item_bias``, ``item_input``,
          ``item_category``, the transition ``trans_ptr``): the parameters are re-allocated but keep
          their identity (``param.data`` is replaced; ``requires_grad`` stays), so an optimizer's
          references stay valid, but per-parameter state of the old shape (Adam's moments) does not
          fit: call :meth:`resize_optimizer_state` after a delta that grew the model;
        * each delta row gets its embedding, bias and category, and reads **its own row** as input
          (``item_input[row] = row``);
        * each delta transition row replaces that row's successors (the other rows are unchanged). A
          model without a table gets one (empty rows elsewhere); it is scored only while
          ``cfg.transition_weight > 0``;
        * the action head's bias and the calibration (``action_temperature``, ``action_bias``) when
          the delta carries them; ``cfg.n_items`` follows the growth;
        * the serving caches of the item table rebuild on the next call.
        """
        cfg = self.check_delta(delta)
        trans = self._replaced_transition_rows(delta.trans_rows, delta.trans_ptr, delta.trans_idx, delta.trans_val,
                                               cfg.n_items) if len(delta.trans_rows) else None
        dev = self.item_emb.weight.device
        n_old, n_new = self.cfg.n_items, cfg.n_items
        if n_new > n_old:
            self._grow_items(n_new)
        if delta.n_rows:
            rows = torch.as_tensor(delta.item_index, dtype=torch.long, device=dev)
            w = self.item_emb.weight
            w[rows] = torch.as_tensor(delta.item_emb, device=dev).to(w.dtype)
            self.item_bias[rows] = torch.as_tensor(delta.item_bias, device=dev).to(self.item_bias.dtype)
            self.item_input[rows] = rows
            if self.cat_emb is not None:
                self.item_category[rows] = torch.as_tensor(delta.item_category, dtype=torch.long, device=dev)
        if trans is not None:
            self.trans_ptr, self.trans_idx, self.trans_val = trans
        if delta.action_bias is not None:
            b = self.action_head.bias
            b.copy_(torch.as_tensor(delta.action_bias, device=b.device).to(b.dtype))
        self.cfg = cfg
        self._rows_cache = self._table_cache = None

    def _grow_items(self, n_items: int) -> None:
        """Append zero rows to every per-item table up to ``n_items`` (parameters keep their identity)."""
        n_old = self.cfg.n_items
        for p in (self.item_emb.weight, self.item_bias):
            grown = p.new_zeros((n_items, *p.shape[1:]))
            grown[:n_old] = p
            p.data = grown
            p.grad = None  # a gradient of the old shape cannot accumulate into the new one
        self.item_emb.num_embeddings = n_items
        dev = self.item_input.device
        self.item_input = torch.cat([self.item_input, torch.arange(n_old, n_items, device=dev)])
        if self.cat_emb is not None:
            self.item_category = torch.cat([self.item_category, self.item_category.new_zeros(n_items - n_old)])
        if self.trans_ptr.numel():
            self.trans_ptr = torch.cat([self.trans_ptr, self.trans_ptr[-1:].expand(n_items - n_old)])
        if self.nbr_ptr.numel():
            self.nbr_ptr = torch.cat([self.nbr_ptr, self.nbr_ptr[-1:].expand(n_items - n_old)])

    @torch.no_grad()
    def set_transition_rows(self, rows, ptr, idx, val) -> None:
        """Replace the successor lists of the table rows ``rows [S]`` (CSR over them: ``ptr [S + 1]``,
        successor indices ``idx``, scored values ``val``); other rows keep theirs. A model without a
        table gets one. What a delta's transition rows do (:meth:`apply_delta`), for the trainer's
        own model before :func:`models.delta.make_delta` extracts them."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        ptr = np.asarray(ptr, np.int64).reshape(-1)
        idx, val = np.asarray(idx, np.int32).reshape(-1), np.asarray(val, np.float32).reshape(-1)
        n, first = self.cfg.n_items, self.first_item
        if len(ptr) != len(rows) + 1 or ptr[0] != 0 or ptr[-1] != len(idx) or len(idx) != len(val) \
                or np.any(np.diff(ptr) < 0) or len(np.unique(rows)) != len(rows):
            raise ValueError("set_transition_rows: inconsistent CSR (or a repeated row)")
        for name, a in (("rows", rows), ("idx", idx)):
            if len(a) and (int(a.min()) < first or int(a.max()) >= n):
                raise ValueError(f"set_transition_rows: {name} must be item rows in [{first}, {n})")
        if len(rows):
            self.trans_ptr, self.trans_idx, self.trans_val = self._replaced_transition_rows(rows, ptr, idx, val, n)

    def _replaced_transition_rows(self, t_rows: np.ndarray, dptr: np.ndarray, t_idx: np.ndarray,
                                  t_val: np.ndarray, n_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CSR buffers for ``n_items`` rows (growth: empty new rows) with rows ``t_rows`` replaced."""
        dev = self.item_emb.weight.device
        ptr, idx, val = self.trans_ptr, self.trans_idx, self.trans_val
        n_old = self.cfg.n_items
        if ptr.numel():
            ptr = torch.cat([ptr, ptr[-1:].expand(n_items - n_old)])
        else:  # no table yet: all rows empty
            ptr = torch.zeros(n_items + 1, dtype=torch.long, device=dev)
        order = np.argsort(t_rows, kind="stable")
        rows = t_rows[order]
        sel = torch.as_tensor(rows, device=dev)
        starts, ends = ptr[sel].tolist(), ptr[sel + 1].tolist()
        d_idx = torch.as_tensor(t_idx, dtype=torch.int32, device=dev)
        d_val = torch.as_tensor(t_val, device=dev).to(val.dtype)
        d_lens = np.diff(dptr)
        if np.array_equal(np.subtract(ends, starts), d_lens[order]):
            # every row keeps its length (e.g. a full top-K list): written in place, no re-allocation
            pos = torch.as_tensor(_ranges(np.asarray(starts), d_lens[order]), device=dev)
            src = torch.as_tensor(_ranges(dptr[:-1][order], d_lens[order]), device=dev)
            idx[pos], val[pos] = d_idx[src], d_val[src]
            return ptr, idx, val
        parts_i, parts_v, at = [], [], 0
        for r, s, e, o in zip(rows.tolist(), starts, ends, order.tolist()):
            parts_i += [idx[at:s], d_idx[dptr[o]:dptr[o + 1]]]
            parts_v += [val[at:s], d_val[dptr[o]:dptr[o + 1]]]
            at = e
        parts_i.append(idx[at:])
        parts_v.append(val[at:])
        lens = ptr.diff()
        lens[sel] = torch.as_tensor(d_lens[order], device=dev)
        new_ptr = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        return new_ptr, torch.cat(parts_i), torch.cat(parts_v)

    def resize_optimizer_state(self, optimizer: torch.optim.Optimizer) -> int:
        """After a delta grew the item tables (:meth:`apply_delta`): pad the optimizer's
        per-parameter state of ``item_emb.weight`` and ``item_bias`` to the new size, so training
        continues where it was: new rows start as a fresh parameter would (zero moments for Adam,
        Adagrad's ``initial_accumulator_value`` for its sums). Returns the tensors resized."""
        n = 0
        for p in (self.item_emb.weight, self.item_bias):
            for key, t in optimizer.state.get(p, {}).items():
                if torch.is_tensor(t) and t.dim() == p.dim() and t.shape[1:] == p.shape[1:] and t.shape[0] < p.shape[0]:
                    fill = optimizer.defaults.get("initial_accumulator_value", 0.0) if key == "sum" else 0.0
                    grown = t.new_full(p.shape, fill)
                    grown[: t.shape[0]] = t
                    optimizer.state[p][key] = grown
                    n += 1
        return n

    @property
    def uses_transitions(self) -> bool:
        return self.cfg.transition_weight != 0.0 and self.trans_ptr.numel() == self.cfg.n_items + 1

    @property
    def uses_neighbours(self) -> bool:
        return self.cfg.neighbour_weight != 0.0 and self.nbr_ptr.numel() == self.cfg.n_items + 1

    @property
    def uses_tables(self) -> bool:
        """Whether scoring adds table entries (transitions or neighbours) for the last items."""
        return self.uses_transitions or self.uses_neighbours

    @property
    def category_weight(self) -> float:
        """The category-recency weight served in the current mode (:attr:`exclude_seen`)."""
        return self.cfg.category_weight_unseen if self.exclude_seen else self.cfg.category_weight

    @property
    def uses_category_recency(self) -> bool:
        """Whether scoring adds the category-recency term (:meth:`category_recency`)."""
        return self.category_weight != 0.0 and self.cat_emb is not None

    @property
    def last_window(self) -> int:
        """How many of the last events the tables and the category term read (``last_items`` columns)."""
        return max(self.cfg.neighbour_window, self.cfg.category_window if self.uses_category_recency else 1)

    def category_recency(self, last_items: torch.Tensor, window: int | None = None,
                         weight: float | None = None) -> torch.Tensor:
        """``[N, n_category_buckets + 1]``: the category-recency score of each category bucket for
        ``last_items [N, W]`` (the last events' vocabulary indices, the last first; ``[N]``: the last
        only): ``weight / (1 + d)`` where ``d`` is how many events before the last one the most recent
        of the last ``window`` events in that category is (:func:`models.train.copy_feature`), 0 for a
        category none of them is in and for bucket 0 (no category). An item's term is its category's
        entry: next items in the categories the user is browsing rank higher, whether or not they were
        seen in training (cold items get their category from the catalogue, ``item_category``).
        ``window``/``weight`` default to the fitted ``category_window`` and the mode's weight
        (:attr:`category_weight`)."""
        if last_items.dim() == 1:
            last_items = last_items[:, None]
        W = min(self.cfg.category_window if window is None else window, last_items.shape[1])
        w = self.category_weight if weight is None else weight
        cats = self.item_category[last_items[:, :W]]  # (N, W); 0 = no category, padding, unknown item
        rec = w / (1.0 + torch.arange(W, device=cats.device, dtype=torch.float32))  # (W,)
        out = torch.zeros(cats.shape[0], self.cfg.n_category_buckets + 1, device=cats.device)
        out.scatter_reduce_(1, cats, rec.expand_as(cats).contiguous(), reduce="amax")
        out[:, 0] = 0.0
        return out

    def _table_entries(self, last_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The table entries for ``last_items [N, W]`` (the last event's vocabulary index first, then
        the ones before it, padding where the history is shorter; ``[N]``: the last one only) as flat
        ``(row [E], item index [E], weighted value [E])``: the transition rows of the last item and
        the neighbour rows of each of the last ``cfg.neighbour_window`` events (a row may repeat)."""
        if last_items.dim() == 1:
            last_items = last_items[:, None]
        parts = []
        if self.uses_transitions:
            parts.append(_csr_entries(self.trans_ptr, self.trans_idx, self.trans_val, last_items[:, 0],
                                      self.cfg.transition_weight))
        if self.uses_neighbours:
            W = min(self.cfg.neighbour_window, last_items.shape[1])
            r, c, v = _csr_entries(self.nbr_ptr, self.nbr_idx, self.nbr_val, last_items[:, :W].reshape(-1),
                                   self.cfg.neighbour_weight)
            parts.append((torch.div(r, W, rounding_mode="floor"), c, v))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]

    def _add_tables(self, logits: torch.Tensor, last_items: torch.Tensor) -> None:
        """``logits[b, j] += w * val(i -> j)`` for the table entries of row ``b``'s last items."""
        rows, cols, vals = self._table_entries(last_items)
        if rows.numel():
            logits.index_put_((rows, cols), vals.to(logits.dtype), accumulate=True)

    def embed(self, batch: dict[str, torch.Tensor], items: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[B, T, d]`` (``items`` overrides ``batch['item']``, e.g. masked)."""
        idx = self.item_input[batch["item"] if items is None else items]  # (B, T)
        if self.training and self.cfg.unknown_item_rate > 0:  # teach the buckets "an unseen item"
            drop = (idx >= self.first_item) & (torch.rand(idx.shape, device=idx.device) < self.cfg.unknown_item_rate)
            idx = torch.where(drop, torch.randint_like(idx, N_SPECIAL, self.first_item), idx)
        x = self.item_emb(idx)  # (B, T, d)
        if self.cat_emb is not None and self.cfg.item_categories_input:  # the item's own category
            x = x + self.cat_emb(self.item_category[batch["item"] if items is None else items])
        for f, emb in self.feat_emb.items():
            x = x + emb(batch[f])
        return self.emb_drop(self.emb_norm(x))

    @property
    def _lean(self) -> bool:
        return self.lean_serving and self.cfg.backbone == "llama" and not self.training

    def _run_backbone(self, x: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                      use_cache: bool = False):
        kw = {}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        out = self.backbone(inputs_embeds=x, attention_mask=attention_mask, past_key_values=past_key_values,
                            use_cache=use_cache, **kw)
        return out.last_hidden_state, out.past_key_values

    def hidden(self, batch: dict[str, torch.Tensor], bidirectional: bool = False,
               items: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone output ``[B, T, d]``. Causal: right padding needs no mask (padding only
        follows valid tokens). Bidirectional: a 4-D padding mask is passed as-is."""
        x = self.embed(batch, items)  # (B, T, d)
        mask = None
        if bidirectional:
            T = x.shape[1]
            valid = torch.arange(T, device=x.device)[None, :] < batch["lengths"].to(x.device)[:, None]  # (B, T)
            mask = valid[:, None, None, :].expand(-1, 1, T, T)  # (B, 1, T, T) True = attend
        h, _ = self._run_backbone(x, attention_mask=mask)
        return self.out_drop(h)

    def _repeat_scores(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``r[b, t, j]`` for ``j <= t < length`` else 0: ``[B, T, T]``."""
        B, T, d = h.shape
        q, k = self.rep_q(h), self.rep_k(h)  # (B, T, d)
        r = q @ k.transpose(1, 2) / math.sqrt(d)  # (B, T, T)
        ar = torch.arange(T, device=h.device)
        dist = (ar[:, None] - ar[None, :]).clamp(0, self.cfg.max_len)  # (T, T)
        r = r + self.rep_recency(dist).squeeze(-1)
        keep = (ar[None, :] <= ar[:, None])[None] & (ar[None, None, :] < lengths[:, None, None])  # (B, T, T)
        return r.masked_fill(~keep, 0.0)

    def item_logits(self, h: torch.Tensor, rep: torch.Tensor | None = None,
                    hist_items: torch.Tensor | None = None, last_item: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """Scores over the whole vocabulary ``[N, V]`` for hidden states ``h [N, d]``; ``rep [N, T]``
        and ``hist_items [N, T]`` add the repeat scores onto the history items, ``last_item [N, W]`` (the
        last events' indices, the last first; ``[N]``: the last only) the transition scores of the
        last item's successors and the neighbour scores (when the model has those tables). Padding and mask rows are
        ``-inf``. ``dtype`` (e.g. ``torch.bfloat16``): scan the item table in that precision
        (a cached copy while serving; see :meth:`top_items`); the scores come back as fp32 and the
        repeat and transition scores are added in fp32."""
        W, bias = self._item_table(dtype)
        logits = torch.addmm(bias, h.to(W.dtype), W.T)  # (N, V)
        if dtype is not None and logits.dtype != torch.float32:
            logits = logits.float()
        if rep is not None:
            logits.scatter_add_(1, hist_items, rep.to(logits.dtype))
        if last_item is not None and self.uses_tables:
            self._add_tables(logits, last_item)
        if last_item is not None and self.uses_category_recency:
            logits += self.category_recency(last_item).index_select(1, self.item_category)
        if self.exclude_seen and hist_items is not None:  # only items outside the window are ranked
            logits.scatter_(1, hist_items, float("-inf"))
        logits[:, :N_SPECIAL] = float("-inf")  # padding and mask are never predicted
        return logits

    def _item_table(self, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [V, d], bias [V])`` as scored, in ``dtype`` (None: the weights' own). A converted
        copy is kept while serving and rebuilt when a weight changes (online updates)."""
        W = self.item_vectors()
        if dtype is None or dtype == W.dtype:
            return W, self.item_bias
        if self.training or torch.is_grad_enabled():
            return W.to(dtype), self.item_bias.to(dtype)
        key = (self._item_weights_key(), dtype)
        if self._table_cache is None or self._table_cache[0] != key:
            self._table_cache = (key, W.to(dtype), self.item_bias.to(dtype))
        return self._table_cache[1], self._table_cache[2]

    def rescore_items(self, h: torch.Tensor, rep: torch.Tensor | None, hist_items: torch.Tensor | None,
                      last_item: torch.Tensor | None, cand: torch.Tensor) -> torch.Tensor:
        """Exact fp32 scores ``[N, C]`` of the vocabulary indices ``cand [N, C]``: what
        :meth:`item_logits` gives at those columns (item row · h + bias + repeat + transition,
        neighbour and category-recency scores), computed for ``C`` items instead of the whole catalogue."""
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            W = self.item_vectors().float()[cand]  # (N, C, d)
            s = torch.bmm(W, h[:, :, None]).squeeze(-1) + self.item_bias.float()[cand]  # (N, C)
            hit = hist_items[:, None, :] == cand[:, :, None] if hist_items is not None else None  # (N, C, T)
            if rep is not None:  # every history position holding the candidate adds its repeat score
                s = s + (hit * rep.float()[:, None, :]).sum(-1)
            if last_item is not None and self.uses_tables:
                rows, cols, vals = self._table_entries(last_item)
                if rows.numel():
                    match = cols[:, None] == cand[rows]  # (E, C): the successor is that candidate
                    s.index_add_(0, rows, match * vals.float()[:, None])
            if last_item is not None and self.uses_category_recency:
                s = s + self.category_recency(last_item).gather(1, self.item_category[cand])
            if self.exclude_seen and hit is not None:
                s = s.masked_fill(hit.any(-1), float("-inf"))
        return s

    def top_items(self, h: torch.Tensor, rep: torch.Tensor | None, hist_items: torch.Tensor | None,
                  last_item: torch.Tensor | None, k: int, coarse: torch.dtype | None = None,
                  margin: int = TOPK_MARGIN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``k`` best known items per row: ``(scores [N, k] fp32, vocabulary indices [N, k],
        log_norm [N] fp32)``.

        ``log_norm`` is the log-normaliser of the whole score vector over the known items (the
        catalogue: padding, mask and hash-bucket rows excluded, as in training's softmax), repeat
        and transition scores included, computed in the same pass as the top-K: ``exp(scores -
        log_norm[:, None])`` are the model's probabilities that each item is the next one.

        ``coarse=None``: one exact scan of the catalogue; ``log_norm`` is the fp32 log-sum-exp of
        the same scores. ``coarse=torch.bfloat16``: the catalogue is scanned in bf16, the best
        ``k + margin`` are kept and rescored exactly (:meth:`rescore_items`), and the top ``k`` of
        those are returned: the exact top-K unless an item outside the coarse top ``k + margin``
        belongs in it (docs/serving.md, top-K on the device). ``log_norm`` then sums the rescored
        candidates' exact terms and the other items' scanned terms: if each of those scores is off
        by at most ``delta``, ``log_norm`` is off by at most ``delta`` times the probability mass
        outside the candidates, and every returned probability by that factor (docs/contract.md,
        measured in tests/unit/models/test_model.py).
        """
        first = self.first_item
        inv_t = 1.0 / self.cfg.item_temperature  # the calibrated probabilities: softmax(scores / T)
        exact = coarse is None or coarse == torch.float32
        if exact:  # fp32 even under CUDA autocast
            with torch.autocast(h.device.type, enabled=False):
                scores = self.item_logits(h.float(), rep, hist_items, last_item)[:, first:]  # (N, n_known)
        else:
            scores = self.item_logits(h, rep, hist_items, last_item, dtype=coarse)[:, first:]
        k = min(k, scores.shape[1])
        if k == 0:
            return scores.new_zeros(scores.shape[0], 0), scores.new_zeros(scores.shape[0], 0, dtype=torch.long), \
                _log_sum_exp(scores.float() * inv_t)
        # the normaliser reuses the score matrix in place once the top-K is read from it (no copy),
        # shifted by each row's best score (the top-1: no overflow)
        if exact:
            top_s, top_i = chunked_topk(scores, k)
            top_s = top_s.float()
            if inv_t != 1.0:  # after the top-K (same ranking): one in-place scaling of the matrix
                scores.mul_(inv_t)
                top_s = top_s * inv_t
            return top_s, top_i + first, _shifted_log_norm(scores, top_s[:, 0])
        cand_s, cand_j = chunked_topk(scores, min(k + margin, scores.shape[1]))  # (N, C) columns
        cand = cand_j + first
        exact_s = self.rescore_items(h, rep, hist_items, last_item, cand)
        top_s, j = torch.topk(exact_s, k, dim=1)
        # the candidates' exact terms + the other items' scanned ones
        m = cand_s[:, 0].float()
        scores.scatter_(1, cand_j, float("-inf"))
        if inv_t != 1.0:
            scores.mul_(inv_t)
            exact_s, top_s, m = exact_s * inv_t, top_s * inv_t, m * inv_t
        cand_mass = torch.exp(exact_s - m[:, None]).sum(1)
        return top_s, cand.gather(1, j), _shifted_log_norm(scores, m, extra=cand_mass)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], objective: str = "causal", last_only: bool = False):
        """Train/eval pass over all positions. ``batch`` is a :func:`models.encoding.collate` output.

        ``objective='causal'``: position ``t`` predicts event ``t + 1`` (item, action, gap); with
        ``last_only`` only the last event is a target (predicted from all the events before it: the
        online trainer's examples, whose earlier positions were learned when they happened).
        ``objective='masked'``: BERT4Rec-style — random items replaced by the mask token,
        bidirectional attention, predict the masked items.
        Returns ``(outputs, loss)`` with ``outputs = {hidden [B,T,d], action_logits [B,T,5],
        gap_pred [B,T], n_targets}`` and ``loss`` a scalar (with per-part values in ``outputs``).
        """
        if objective == "masked":
            return self._forward_masked(batch)
        items, lengths = batch["item"], batch["lengths"]
        inp, T = _inputs(batch, self.cfg.max_len)  # a window of max_len + 1 events: max_len inputs
        h = self.hidden(inp)  # (B, T, d)
        ar = torch.arange(T, device=items.device)
        tmask = ar[None, :] < (lengths[:, None] - 1)  # (B, T): positions with a next event
        if last_only:
            tmask = ar[None, :] == (lengths[:, None] - 2)  # (B, T): the position before the last event
        rows, cols = tmask.nonzero(as_tuple=True)  # N target positions
        h_n = h[rows, cols]  # (N, d)
        tgt_item = items[rows, cols + 1]  # (N,)
        rep = hist = None
        if self.cfg.repeat_head:
            rep = self._repeat_scores(h, inp["lengths"])[rows, cols]  # (N, T)
            hist = inp["item"][rows]  # (N, T); entries past the position carry rep = 0
        outputs: dict[str, torch.Tensor] = {"hidden": h, "n_targets": torch.tensor(len(rows))}
        loss_item = self._item_loss(h_n, tgt_item, rep, hist)
        loss = loss_item
        outputs["loss_item"] = loss_item.detach()
        if self.action_head is not None:
            a_logits = self.action_head(h)  # (B, T, 5)
            if self.action_prior is not None:
                a_logits = a_logits + self.action_prior(inp["action"])
            outputs["action_logits"] = a_logits
            tgt_action = batch["action"][rows, cols + 1] - 1  # (N,)
            if bool((tgt_action >= 0).all()):  # actions present (feature on)
                loss_a = F.cross_entropy(a_logits[rows, cols], tgt_action)
                loss = loss + self.cfg.action_loss_weight * loss_a
                outputs["loss_action"] = loss_a.detach()
        if self.gap_head is not None:
            g = self.gap_head(h).squeeze(-1)  # (B, T)
            outputs["gap_pred"] = g
            loss_g = F.huber_loss(g[rows, cols], batch["gap_log"][rows, cols + 1].to(g.dtype))
            loss = loss + self.cfg.gap_loss_weight * loss_g
            outputs["loss_gap"] = loss_g.detach()
        return outputs, loss

    def _item_loss(self, h_n, tgt, rep, hist) -> torch.Tensor:
        cfg = self.cfg
        if len(tgt) == 0:
            return h_n.sum() * 0.0
        if cfg.n_negatives <= 0:
            # softmax over the known-item rows only (targets are always known items: padding, mask
            # and hash-bucket rows are skipped), computed without copying the (N, V) matrix
            first = self.first_item
            logits = torch.addmm(self.item_bias[first:], h_n, self.item_vectors()[first:].T)  # (N, n_known)
            if rep is not None:
                known = hist >= first
                logits.scatter_add_(1, (hist - first).clamp(min=0), rep.masked_fill(~known, 0.0).to(logits.dtype))
            y = torch.where(tgt >= first, tgt - first, torch.full_like(tgt, -100))  # unknown targets ignored
            if bool((y < 0).all()):
                return logits.sum() * 0.0
            return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        # sampled softmax: the target + K distinct negatives shared by the batch, drawn uniformly from
        # the known items (a uniform proposal needs no logQ correction). Two matmuls, no (N, K, d)
        # gather: cost ~K/V of the full softmax.
        n_known = cfg.n_items - self.first_item
        K = min(cfg.n_negatives, n_known)
        neg = torch.randperm(n_known, device=h_n.device)[:K] + self.first_item  # (K,)
        pos = (h_n * self.item_vectors(tgt)).sum(-1) + self.item_bias[tgt]  # (N,)
        negl = torch.addmm(self.item_bias[neg], h_n, self.item_vectors(neg).T)  # (N, K)
        slot = torch.full((cfg.n_items,), K, dtype=torch.long, device=h_n.device)  # vocab index -> column
        slot[neg] = torch.arange(K, device=h_n.device)
        if rep is not None:
            # repeat scores of history items: onto the target when it is in the history, and onto
            # each sampled negative that is
            pos = pos + (rep * (hist == tgt[:, None]).to(rep.dtype)).sum(-1)
            col = slot[hist]  # (N, T); K = not a sampled negative
            negl.scatter_add_(1, col.clamp(max=K - 1), rep.masked_fill(col == K, 0.0).to(negl.dtype))
        t_col = slot[tgt]  # a negative that happens to be the target is removed
        hit = (t_col < K).nonzero(as_tuple=True)[0]
        negl[hit, t_col[hit]] = float("-inf")
        keep = tgt >= self.first_item  # unknown (hash-bucket) targets are ignored, as in the full softmax
        if not bool(keep.any()):
            return negl.sum() * 0.0
        pos, negl = pos[keep].float(), negl[keep].float()
        # cross-entropy with the target as class 0, without concatenating an (N, 1+K) copy
        m = torch.maximum(pos, negl.max(1).values).detach()
        lse = m + torch.log(torch.exp(pos - m) + torch.exp(negl - m[:, None]).sum(1))
        return (lse - pos).mean()

    def _forward_masked(self, batch):
        batch, _ = _inputs(batch, self.cfg.max_len)
        items, lengths = batch["item"], batch["lengths"]
        B, T = items.shape
        valid = torch.arange(T, device=items.device)[None, :] < lengths[:, None]  # (B, T)
        m = (torch.rand(B, T, device=items.device) < self.cfg.mask_prob) & valid
        # always mask the last event of some sequences, as the fine-tune/serving task predicts the end
        last = torch.zeros_like(m)
        last[torch.arange(B), (lengths - 1).clamp(min=0)] = torch.rand(B, device=items.device) < 0.5
        m = m | (last & valid)
        h = self.hidden(batch, bidirectional=True, items=items.masked_fill(m, MASK))  # (B, T, d)
        rows, cols = m.nonzero(as_tuple=True)
        loss = self._item_loss(h[rows, cols], items[rows, cols], None, None)
        return {"hidden": h, "n_targets": torch.tensor(len(rows)), "loss_item": loss.detach()}, loss

    # ------------------------------------------------------------------------------------------
    # serving
    # ------------------------------------------------------------------------------------------
    def heads(self, last: LastHidden, k: int | None = None, coarse: torch.dtype | None = None) -> dict:
        """The serving outputs (see :meth:`score_last`) for prepared last positions."""
        return self._heads_last(last.h, last.rep, last.hist, last.action, last.item, k, coarse)

    def _heads_last(self, h_last: torch.Tensor, rep: torch.Tensor | None, hist: torch.Tensor | None,
                    last_action: torch.Tensor | None = None, last_item: torch.Tensor | None = None,
                    k: int | None = None, coarse: torch.dtype | None = None) -> dict:
        out: dict = {"hidden": h_last}
        if k is None:
            out["item_scores"] = self.item_logits(h_last, rep, hist, last_item)  # (B, V)
            if self.cfg.item_temperature != 1.0:  # fitted on validation (calibration.py)
                out["item_scores"] = out["item_scores"] / self.cfg.item_temperature
            out["item_log_norm"] = _log_sum_exp(out["item_scores"][:, self.first_item:].float())  # (B,)
        else:
            out["top_scores"], out["top_items"], out["item_log_norm"] = self.top_items(h_last, rep, hist, last_item,
                                                                                    k, coarse)  # (B, k), (B,)
        if self.action_head is not None:
            logits = self.action_head(h_last).float()  # (B, 5)
            if self.action_prior is not None and last_action is not None:
                logits = logits + self.action_prior(last_action).float()
            if self.cfg.action_temperature != 1.0 or self.cfg.action_bias:  # fitted on validation (calibration.py)
                logits = logits * self.cfg.action_temperature
                if self.cfg.action_bias:
                    logits = logits + logits.new_tensor(self.cfg.action_bias)
            out["action_probs"] = torch.softmax(logits, dim=-1)  # (B, 5)
        else:
            out["action_probs"] = torch.full((h_last.shape[0], N_ACTIONS), 1.0 / N_ACTIONS, device=h_last.device)
        if self.gap_head is not None:
            out["gap_log_s"] = self.gap_head(h_last).squeeze(-1).float()  # (B,)
        else:
            out["gap_log_s"] = torch.zeros(h_last.shape[0], device=h_last.device)
        return out

    def score_last(self, batch: dict[str, torch.Tensor], k: int | None = None, coarse: torch.dtype | None = None
                   ) -> dict[str, torch.Tensor]:
        """Serving outputs for the last event of each history: ``action_probs [B, 5]``,
        ``item_scores [B, V]`` (whole vocabulary, ``-inf`` on padding/mask rows; higher = more
        likely next), ``item_log_norm [B]`` (the log-sum-exp of ``item_scores`` over the known
        items: ``exp(item_scores - item_log_norm)`` is the next-item distribution over the
        catalogue), ``gap_log_s [B]`` (predicted ``log1p`` seconds to the next event).
        With ``k``: ``top_scores [B, k]``, ``top_items [B, k]`` (vocabulary indices of known
        items, see :meth:`top_items`) and ``item_log_norm [B]`` instead of ``item_scores``: the
        items' probabilities are ``exp(top_scores - item_log_norm[:, None])`` (:func:`top_probs`)."""
        items, lengths = batch["item"], batch["lengths"]
        B, T = items.shape
        h = self.hidden(batch)  # (B, T, d)
        last = (lengths - 1).clamp(min=0)
        ar = torch.arange(B, device=items.device)
        h_last = h[ar, last]  # (B, d)
        rep = None
        if self.cfg.repeat_head:
            rep = self._repeat_scores(h, lengths)[ar, last]  # (B, T)
        hist = items if rep is not None or self.exclude_seen else None
        return self._heads_last(h_last, rep, hist, batch["action"][ar, last],
                                _last_items(items, lengths, self.last_window), k, coarse)

    @torch.no_grad()
    def prefill(self, batch: dict[str, torch.Tensor], heads: bool = True
                ) -> tuple[dict[str, torch.Tensor] | LastHidden, KVState]:
        """:meth:`score_last` plus the :class:`KVState` to continue each user with :meth:`step`
        (``heads=False``: a :class:`LastHidden` for a later :meth:`heads` call instead of outputs)."""
        items, lengths = batch["item"], batch["lengths"]
        B, T = items.shape
        x = self.embed(batch)
        if self._lean:
            h, keys, values = llama_forward(self.backbone, x, torch.arange(T, device=x.device)[None])
        else:
            h, cache = self._run_backbone(x, use_cache=True)
            keys, values = cache_tensors(cache)
        h = self.out_drop(h)
        ar = torch.arange(B, device=items.device)
        last = (lengths - 1).clamp(min=0)
        rep = rep_k = None
        if self.cfg.repeat_head:
            rep = self._repeat_scores(h, lengths)[ar, last]
            rep_k = self.rep_k(h)  # (B, T, d)
        else:
            rep_k = h.new_zeros(B, T, 0)
        valid = torch.arange(T, device=items.device)[None, :] < lengths[:, None]
        state = KVState(keys, values, rep_k, items.masked_fill(~valid, PAD), lengths.clone(), lengths.clone())
        hist = items if rep is not None or self.exclude_seen else None
        out = LastHidden(h[ar, last], rep, hist, batch["action"][ar, last],
                         _last_items(items, lengths, self.last_window))
        return (self.heads(out) if heads else out), state

    @torch.no_grad()
    def step(self, tokens: dict[str, torch.Tensor], state: KVState, evict: bool = False, heads: bool = True
             ) -> tuple[dict[str, torch.Tensor] | LastHidden, KVState]:
        """Append one new event per user (``tokens``: a collate of :func:`models.encoding.encode_last`
        outputs, ``[B, 1]``) to ``state``; return the serving outputs for it (``heads=False``: a
        :class:`LastHidden`) and the new state.

        Raises ``ValueError`` if a user's window is full (``length == max_len``) unless ``evict``.
        """
        cfg = self.cfg
        B = tokens["item"].shape[0]
        dev = tokens["item"].device
        lengths, positions = state.lengths.to(dev), state.positions.to(dev)
        full = lengths >= cfg.max_len
        if bool(full.any()):
            if not evict:
                raise ValueError(f"{int(full.sum())} user window(s) already hold max_len={cfg.max_len} tokens: "
                                 "re-prefill from the history or call step(..., evict=True)")
            if cfg.backbone != "llama":
                raise ValueError(f"evict=True needs relative positions (llama backbone), not {cfg.backbone!r}")
            state = state.evict_oldest(full)
            lengths = state.lengths
        T = state.keys[0].shape[2]
        x = self.embed(tokens)  # (B, 1, d)
        ar_t = torch.arange(T, device=dev)
        attn = torch.cat([(ar_t[None, :] < lengths[:, None]), torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
        pos_ids = positions[:, None]
        if cfg.backbone != "llama":
            pos_ids = lengths[:, None]  # learned absolute positions = window index
        if self._lean:
            h, new_k, new_v = llama_forward(self.backbone, x, pos_ids, state.keys, state.values, key_mask=attn)
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
            for i, (k, v) in enumerate(zip(state.keys, state.values)):
                cache.update(k, v, i)
            h, cache = self._run_backbone(x, attention_mask=attn.long(), position_ids=pos_ids,
                                          past_key_values=cache, use_cache=True)
            new_k, new_v = cache_tensors(cache)
        h = self.out_drop(h)[:, 0]  # (B, d)
        # new_k/new_v: each (B, H, T+1, dh); the new token sits at index T
        ar_b = torch.arange(B, device=dev)
        keys, values = [], []
        for k, v in zip(new_k, new_v):
            k2, v2 = k.clone(), v.clone()
            k2[ar_b, :, lengths] = k[:, :, T]
            v2[ar_b, :, lengths] = v[:, :, T]
            keys.append(k2)
            values.append(v2)
        items = torch.cat([state.items.to(dev), state.items.new_zeros(B, 1).to(dev)], 1)
        items[ar_b, lengths] = tokens["item"][:, 0]
        rep = None
        if cfg.repeat_head:
            rk = torch.cat([state.rep_k.to(dev), state.rep_k.new_zeros(B, 1, state.rep_k.shape[2]).to(dev)], 1)
            rk[ar_b, lengths] = self.rep_k(h)
            q = self.rep_q(h)  # (B, d)
            rep = (rk @ q[:, :, None]).squeeze(-1) / math.sqrt(cfg.d_model)  # (B, T+1)
            ar_t1 = torch.arange(T + 1, device=dev)
            dist = (lengths[:, None] - ar_t1[None, :]).clamp(0, cfg.max_len)
            rep = rep + self.rep_recency(dist).squeeze(-1)
            rep = rep.masked_fill(ar_t1[None, :] > lengths[:, None], 0.0)
        else:
            rk = state.rep_k.new_zeros(B, T + 1, 0)
        new_state = KVState(keys, values, rk, items, lengths + 1, positions + 1)
        new_state = new_state.trimmed()
        hist = items if rep is not None or self.exclude_seen else None
        out = LastHidden(h, rep, hist, tokens["action"][:, 0],
                         _last_items(items, lengths + 1, self.last_window))
        return (self.heads(out) if heads else out), new_state


def top_probs(top_scores, log_norm) -> np.ndarray:
    """The probabilities ``[B, k]`` (float64, at most 1) of top-K scores ``[B, k]`` under their rows'
    log-normalisers ``[B]`` (:meth:`NextActionModel.top_items`), computed on the host: K numbers per
    row, cheaper there than K more device kernels.

    >>> top_probs(torch.tensor([[0.0, -1.0]]), torch.tensor([math.log(2.0)])).round(4).tolist()
    [[0.5, 0.1839]]
    """
    s = np.asarray(top_scores.float().cpu() if torch.is_tensor(top_scores) else top_scores, np.float64)
    z = np.asarray(log_norm.float().cpu() if torch.is_tensor(log_norm) else log_norm, np.float64)
    return np.minimum(np.exp(s - z[:, None]), 1.0)


def _log_sum_exp(scores: torch.Tensor) -> torch.Tensor:
    """``log(sum(exp(scores), 1))`` of a 2-D fp32 score matrix, per row (``-inf`` for a row that is all
    ``-inf``).

    >>> _log_sum_exp(torch.tensor([[0.0, 0.0], [1000.0, float("-inf")]])).tolist()
    [0.6931471824645996, 1000.0]
    """
    return torch.logsumexp(scores, dim=1)


def _shifted_log_norm(scores: torch.Tensor, m: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``m + log(sum(exp(scores - m), 1) + extra)`` per row, for ``m`` at least about each row's
    maximum (no overflow; terms more than ~87 below ``m`` underflow to 0, i.e. less than ``1e-38`` of
    the row's mass). **Overwrites** ``scores`` (2-D fp32) with ``exp(scores - m)``: the cheapest way
    on a CPU (one in-place subtraction and exponential, no temporary ``[N, V]`` matrix; the same as
    ``torch.logsumexp`` otherwise).

    >>> s = torch.tensor([[1.0, 1.0, float("-inf")], [0.0, -1000.0, 3.0]])
    >>> _shifted_log_norm(s.clone(), torch.tensor([1.0, 3.0])).tolist() == _log_sum_exp(s).tolist()
    True
    """
    total = scores.sub_(m[:, None]).exp_().sum(1)
    if extra is not None:
        total = total + extra
    return m + torch.log(total)


def _csr_entries(ptr: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, src: torch.Tensor, weight: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows ``src [M]`` of a CSR table as flat ``(position in src [E], column [E], weight * value [E])``.

    >>> ptr, idx, val = torch.tensor([0, 0, 2, 3]), torch.tensor([2, 1], dtype=torch.int32), torch.tensor([1., 2.])
    >>> [t.tolist() for t in _csr_entries(ptr, torch.tensor([2, 1, 0], dtype=torch.int32),
    ...                                   torch.tensor([1., 2., 3.]), torch.tensor([1, 0, 2]), 0.5)]
    [[0, 0, 2], [2, 1, 0], [0.5, 1.0, 1.5]]
    """
    start = ptr[src]  # (M,)
    n = ptr[src + 1] - start  # (M,) entries per row
    total = int(n.sum())
    rows = torch.repeat_interleave(torch.arange(len(n), device=n.device), n, output_size=total)  # (E,)
    first = torch.repeat_interleave(n.cumsum(0) - n, n, output_size=total)
    pos = start[rows] + torch.arange(total, device=n.device) - first
    return rows, idx[pos].long(), val[pos] * weight


def _last_items(items: torch.Tensor, lengths: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, window]``: the vocabulary indices of each row's last ``window`` events, the last first,
    padding where the row is shorter.

    >>> _last_items(torch.tensor([[5, 6, 7], [8, 0, 0]]), torch.tensor([3, 1]), 2).tolist()
    [[7, 6], [8, 0]]
    """
    pos = lengths[:, None] - 1 - torch.arange(window, device=items.device)[None, :]  # (B, window)
    got = items.gather(1, pos.clamp(0, items.shape[1] - 1))
    return got.masked_fill(pos < 0, PAD)


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, lens))``, vectorised."""
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return np.repeat(np.asarray(starts, np.int64) - offsets[:-1], lens) + np.arange(offsets[-1])


def _inputs(batch: dict[str, torch.Tensor], max_len: int) -> tuple[dict[str, torch.Tensor], int]:
    """The first ``min(T, max_len)`` columns of a batch (training windows hold max_len + 1 events;
    the last one is only a target)."""
    T = batch["item"].shape[1]
    if T <= max_len:
        return batch, T
    inp = {k: (v[:, :max_len] if k != "lengths" else v.clamp(max=max_len)) for k, v in batch.items()}
    return inp, max_len
