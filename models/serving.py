"""The Transformer as a :class:`~models.predictor.Predictor`: batched, on CPU or CUDA, with a KV cache.

:class:`TransformerPredictor` serves a verified checkpoint. Each event appends one token to the
user's cached attention keys/values (:meth:`~models.model.NextActionModel.step`) instead of
re-encoding the whole window; cache entries are addressed by a digest of the window's events, so a
stale state can never be used (a miss rebuilds it with ``prefill``). Incremental outputs equal full
recomputation while the window is not full; at the cap, ``overflow='exact'`` re-prefills and
``'evict'`` slides the window (an approximation, re-prefilled every ``refresh_every`` steps).
Online deltas (:meth:`~TransformerPredictor.apply_delta`) change the weights in place; a cached
state built before them keeps being stepped for up to ``max_stale_deltas`` deltas, then is rebuilt.
The catalogue is scanned in bf16 and the best ``k + 32`` rescored exactly where that is faster
(``score_dtype``, :func:`~models.devices.resolve_score_dtype`). How and why, with measurements:
docs/serving.md. Each top item carries the model's probability that it is the user's next item
(a softmax over the whole catalogue, repeat and transition scores included, normalised in the
same device pass as the top-K: :meth:`~models.model.NextActionModel.top_items`; docs/contract.md).

Not thread-safe by design: the batcher calls it from one inference thread.

>>> from models.config import ModelConfig
>>> from models.model import NextActionModel
>>> vocab = ItemVocab(["a", "b", "c"], n_hash_buckets=4)
>>> model = NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=16, max_len=8))
>>> p = TransformerPredictor(model, vocab, version="demo", device="cpu", num_threads=1)
>>> h = EventSeq.from_columns(["a", "b"], ["view", "cart"], [0, 60_000])
>>> [len(x.top_items) for x in p.predict([h[:1], h], k=2, users=["u", "u"])]  # u's 2nd event steps
[2, 2]
>>> p.stats["steps"], p.stats["prefills"]
(1, 1)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from models.config import OVERFLOW_MODES
from models.devices import default_cpu_threads, resolve_device, resolve_score_dtype
from models.encoding import ItemVocab, collate, encode, encode_last
from models.errors import CheckpointError, ConfigError
from models.kv_cache import CacheEntry, KVCache, flatten_state, window_key
from models.kv_state import KVState, LastHidden
from models.model import NextActionModel, top_probs
from models.predictor import Prediction, Predictor
from models.schema import EventSeq

log = logging.getLogger(__name__)

#: Score-matrix elements per model call (rows × n_items): 8M fp32 = 32 MiB on CPU (cache-friendly), 512M on CUDA.
DEFAULT_SCORE_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 29}
_GAP_LOG_CLIP = 30.0  # expm1(30) s ≈ 340 years: the gap head's output is clipped to [0, 30] in log space


def length_buckets(max_len: int) -> tuple[int, ...]:
    """Padded sequence lengths: powers of two from 8 below ``max_len``, then ``max_len``.

    >>> length_buckets(50), length_buckets(200), length_buckets(4)
    ((8, 16, 32, 50), (8, 16, 32, 64, 128, 200), (4,))
    """
    out, b = [], 8
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


class TransformerPredictor(Predictor):
    """A :class:`~models.model.NextActionModel` served with batching, device top-K and a KV cache.

    Arguments:
        model: the model (moved to ``device`` and put in eval mode).
        vocab: its item vocabulary (top-K ranks the vocabulary's known items only).
        version: stamped on every prediction (the checkpoint's content-hash prefix).
        device: ``auto`` | ``cpu`` | ``cuda`` (``auto`` → cuda when available).
        num_threads: CPU intra-op threads (default: all cores but one). Ignored on CUDA.
        compile: ``torch.compile`` the full-recomputation scorer (CUDA mostly; first calls are slow).
        incremental: use the KV cache (False: full recomputation for every request).
        cache_users / cache_bytes: LRU bounds (entries ≈ users; bytes of cached tensors).
        overflow: ``exact`` | ``evict`` — what happens when a window is full (module docstring).
        refresh_every: ``evict`` mode: rebuild a user's state after this many evicting steps.
        max_rounds: most sequential rounds per ``predict`` for a user's consecutive events.
        score_dtype: ``auto`` | ``float32`` | ``bfloat16`` — precision of the catalogue scan before
            the exact rescoring of its best candidates (module docstring, :func:`resolve_score_dtype`).
        score_budget: most ``rows × n_items`` score elements per model call (bounds memory).
        buckets: padded sequence lengths (default :func:`length_buckets` of ``max_len``).
        max_stale_deltas: online deltas: a cached user state built this many deltas ago is still
            stepped; an older one is rebuilt from the history (0: after every delta). See
            :meth:`apply_delta`.
        exclude_seen: rank only items outside the user's window (a discovery feed): its items are
            never in ``top_items``, and the category-recency term uses the weight fitted for that
            ranking (``category_weight_unseen``; :meth:`models.model.NextActionModel.category_recency`).

    A bad value of an argument that a setting supplies (``stream_app.predictors.SERVING_OPTIONS``:
    ``device``, ``num_threads``, ``cache_users``, ``cache_bytes``, ``overflow``, ``refresh_every``,
    ``score_dtype``, ``max_stale_deltas``) raises :class:`~models.errors.ConfigError` naming the
    setting (``serve_threads``, ``kv_cache_mb`` ...); one of the other arguments raises
    ``ValueError`` naming the argument.
    """

    def __init__(self, model: NextActionModel, vocab: ItemVocab, *, version: str, device: str = "auto",
                 num_threads: int | None = None, compile: bool = False, incremental: bool = True,
                 cache_users: int = 100_000, cache_bytes: int = 1 << 30, overflow: str = "exact",
                 refresh_every: int = 16, max_rounds: int = 4, score_budget: int | None = None,
                 buckets: Sequence[int] | None = None, score_dtype: str = "auto", max_stale_deltas: int = 10,
                 explain_top: int = 0, path: str | Path | None = None, text_projection=None, text_items: bool = True,
                 text_catalogue: str | Path | None = None, exclude_seen: bool = False) -> None:
        cfg = model.cfg
        if len(vocab) != cfg.n_items:
            raise CheckpointError(f"vocabulary has {len(vocab)} entries but the model has n_items={cfg.n_items}")
        if overflow not in OVERFLOW_MODES:
            raise ConfigError("kv_overflow", overflow, f"must be one of {OVERFLOW_MODES}")
        if overflow == "evict" and cfg.backbone != "llama":
            raise ConfigError("kv_overflow", overflow, f"'evict' needs the llama backbone (relative positions), "
                                                       f"this model uses {cfg.backbone!r}")
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ConfigError("kv_refresh_every", refresh_every, "must be an integer >= 1")
        if isinstance(max_stale_deltas, bool) or not isinstance(max_stale_deltas, int) or max_stale_deltas < 0:
            raise ConfigError("kv_max_stale_deltas", max_stale_deltas, "must be an integer >= 0")
        if isinstance(explain_top, bool) or not isinstance(explain_top, int) or explain_top < 0:
            raise ConfigError("explain_top", explain_top, "must be an integer >= 0 (0 = no explanations)")
        self.explain_top = explain_top
        if not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
        self.device = torch.device(resolve_device(device))
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.num_threads = torch.get_num_threads()
        else:
            n = default_cpu_threads() if num_threads is None else num_threads
            if not isinstance(n, int) or n < 1:
                raise ConfigError("serve_threads", num_threads, "must be an integer >= 1")
            self.num_threads = n
            torch.set_num_threads(n)
        self.model = model.to(self.device).eval()
        self.model.exclude_seen = bool(exclude_seen)
        self.vocab, self.cfg, self.version = vocab, cfg, str(version)
        self.path = Path(path) if path is not None else None
        # the gru baseline has no attention cache to keep: it is served by full recomputation
        self.incremental = bool(incremental) and cfg.backbone != "gru"
        self.overflow, self.refresh_every = overflow, refresh_every
        self.max_rounds = max_rounds
        self.buckets = tuple(sorted(buckets)) if buckets else length_buckets(cfg.max_len)
        if self.buckets[-1] < cfg.max_len:
            raise ValueError(f"buckets: the largest bucket must be >= max_len ({cfg.max_len}), got {self.buckets}")
        budget = DEFAULT_SCORE_BUDGET[self.device.type] if score_budget is None else int(score_budget)
        if budget < 1:
            raise ValueError(f"score_budget must be >= 1, got {score_budget!r}")
        self._score_budget = budget
        self.max_rows = max(1, budget // cfg.n_items)
        self.score_dtype = resolve_score_dtype(score_dtype, self.device.type, cfg.n_items * cfg.d_model * 4)
        if self.incremental and cache_users < 0:
            raise ConfigError("kv_cache_users", cache_users, "must be >= 0 (0 disables the cache)")
        if self.incremental and cache_bytes < 0:
            raise ConfigError("kv_cache_mb", cache_bytes / (1 << 20), "must be >= 0 (0 disables the cache)")
        self.cache = KVCache(cache_users if self.incremental else 0, cache_bytes if self.incremental else 0)
        self._options = dict(device=device, num_threads=num_threads, compile=compile, incremental=incremental,
                             cache_users=cache_users, cache_bytes=cache_bytes, overflow=overflow,
                             refresh_every=refresh_every, max_rounds=max_rounds, score_budget=score_budget,
                             buckets=buckets, score_dtype=score_dtype, max_stale_deltas=max_stale_deltas,
                             explain_top=explain_top, exclude_seen=exclude_seen,
                             text_items=text_items, text_catalogue=text_catalogue)
        self._init_text(text_projection, text_items, text_catalogue)
        self.compiled = bool(compile)
        self._score_last = torch.compile(model.score_last, dynamic=True) if compile else model.score_last
        p = next(model.parameters())
        self._kv_dtype = torch.bfloat16 if self.cuda else p.dtype
        self._hd = cfg.n_heads * cfg.head_dim
        self._rep_dim = cfg.d_model if cfg.repeat_head else 0
        self.stats = {"requests": 0, "steps": 0, "prefills": 0, "full": 0, "model_calls": 0, "stale": 0}
        # online deltas: how many were applied to this version, and which vocabulary indices changed
        # meaning at which count (a cached state older than that holds the index's old meaning)
        self.max_stale_deltas = max_stale_deltas
        self.deltas = 0
        self._moved: dict[int, int] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | Path, **options: Any) -> "TransformerPredictor":
        """Load and verify (content hash) a checkpoint; raise CheckpointError naming the problem."""
        from models.checkpoint import load_checkpoint

        dev = resolve_device(options.get("device", "auto"))
        ck = load_checkpoint(path, device=dev)
        return cls(ck.model, ck.vocab, version=ck.version, path=path, text_projection=ck.text_projection, **options)

    def successor(self, path: str | Path, sha256: str | None = None) -> "TransformerPredictor":
        """The next model version with the same serving options and an empty cache (cached
        keys/values belong to the model that made them). Raises CheckpointError."""
        return type(self).from_checkpoint(path, **self._options)

    def apply_delta(self, delta) -> bool:
        """Apply an online :class:`~models.delta.ModelDelta` in place if it follows :attr:`version`
        (:meth:`~models.delta.ModelDelta.follows`; else return False and change nothing); then
        :attr:`version` is ``delta.label`` and every later prediction uses the new weights: new items
        are in the vocabulary and ranked at once, the score budget follows the new ``n_items``.
        Raises ``ValueError`` (nothing changed) for a delta that follows but does not fit the model.
        Runs on the inference thread between two batches, like :meth:`predict`.

        The KV cache is not flushed: a cached state was computed with the input rows of its time, so
        it is stepped for ``max_stale_deltas`` more deltas and rebuilt from the history after that
        (``stats["stale"]`` counts those rebuilds). A state whose window holds an index that changed
        meaning is rebuilt at once: a row that a delta gave to another item id, or the hash bucket of
        an id that became known (its events now read the item's own row, and count as repeats of it).

        >>> import numpy as np
        >>> from models.config import ModelConfig
        >>> from models.delta import ModelDelta
        >>> from models.model import NextActionModel
        >>> vocab = ItemVocab(["a", "b", "c"], n_hash_buckets=4)
        >>> model = NextActionModel(ModelConfig(n_items=len(vocab), n_hash_buckets=4, d_model=16, max_len=8))
        >>> p = TransformerPredictor(model, vocab, version="0123456789ab", device="cpu", num_threads=1)
        >>> d = ModelDelta("0123456789ab", 1, 0, [9], ["hot"], np.zeros((1, 16)), [50.0], [0])  # a new item
        >>> p.apply_delta(d), p.version, p.apply_delta(d)  # the second time it no longer follows
        (True, '0123456789ab+1', False)
        >>> p.predict([EventSeq.from_columns(["a"], ["view"], [0])], k=1)[0].top_items[0][0]
        'hot'
        """
        from models.delta import apply_delta

        if not delta.follows(self.version):
            return False
        if self._text_added:  # the trainer now sends a row for an item we gave a text row: retire ours
            self._retire_text_rows([i for i in delta.item_ids if i in self._text_added])
        known = self.vocab.__contains__
        buckets = {self.vocab.bucket(i) for i in delta.item_ids if not known(i)}  # ids that become known
        moved = apply_delta(self.model, self.vocab, delta) + sorted(buckets)
        self.cfg = self.model.cfg
        self.max_rows = max(1, self._score_budget // self.cfg.n_items)
        self.version = delta.label
        self.deltas += 1
        for row in moved:
            self._moved[row] = self.deltas
        if self._moved:  # older states are stale anyway: forget what only they could hold
            self._moved = {r: c for r, c in self._moved.items() if c > self.deltas - self.max_stale_deltas}
        if self._text_added:  # text rows the delta's rows took over: append them again (cached rows)
            self.add_item_texts({i: None for i in self._text_added if i not in self.vocab})
        return True

    # ------------------------------------------------------------------ cold-start items from text
    def _init_text(self, proj, enabled: bool, catalogue) -> None:
        """The serving side of :mod:`models.text` (a checkpoint with a text projection)."""
        self.text = None
        self.text_errors = 0  # text rows that could not be made (logged; the items keep their buckets)
        self._text_rows_untaken: dict[str, int] = {}  # take_text_rows: items by result since it was last called
        self._text_added: set[str] = set()
        if proj is None or not enabled:
            return
        from models.text import TextEncoder, TextRows, read_catalogue

        self.text = TextRows(proj, read_catalogue(catalogue) if catalogue else None,
                             TextEncoder(device=self.device.type))

    def add_item_texts(self, texts) -> list[str]:
        """Give the items of ``texts`` (item id → text; ``None``/``""``: the catalogue's text) that the
        vocabulary does not know a row projected from their text, appended to the catalogue scan so
        they can be recommended at once; ids without any text are skipped. Each item's row is computed
        once (cached; :class:`models.text.TextRows`) and survives online deltas (a delta that takes
        its row over is followed by appending it again). The version does not change: the rows follow
        from the checkpoint's projection and the texts. Without a text projection, a no-op. Returns
        the ids added.

        A cached user state that holds such an item from before (it read its hash bucket) keeps that
        until it is rebuilt; the item's new events read its text row."""
        if self.text is None:
            return []
        items = [i for i in dict.fromkeys(texts) if i not in self.vocab]
        if not items:
            return []
        ids, rows, bias = self.text.rows(items, [texts[i] for i in items])
        if not ids:
            return []
        from models.delta import ModelDelta, apply_delta

        n = len(self.vocab)
        delta = ModelDelta(self.version or "local", 1, 0, np.arange(n, n + len(ids)), ids, rows, bias,
                           np.zeros(len(ids), np.int64))
        apply_delta(self.model, self.vocab, delta)
        self.cfg = self.model.cfg
        self.max_rows = max(1, self._score_budget // self.cfg.n_items)
        self._text_added.update(ids)
        self._count_text_rows("added", len(ids))
        return ids

    def _count_text_rows(self, result: str, n: int) -> None:
        if n:
            self._text_rows_untaken[result] = self._text_rows_untaken.get(result, 0) + n

    def take_text_rows(self) -> dict[str, int]:
        """:meth:`models.predictor.Predictor.take_text_rows`: items given a text row (``added``) or
        not (``failed``) since the last call."""
        out, self._text_rows_untaken = self._text_rows_untaken, {}
        return out

    def _retire_text_rows(self, ids: list[str]) -> None:
        """Give the text rows of ``ids`` to placeholder ids that are never ranked (bias -1e4), so a
        delta can hold those ids at its own rows."""
        if not ids:
            return
        rows = [self.vocab.index(i) for i in ids]
        self.vocab.set_items(rows, [f"\x00retired-text-row-{r}" for r in rows])
        with torch.no_grad():
            self.model.item_bias[torch.as_tensor(rows, device=self.model.item_bias.device)] = -1e4
            self.model._rows_cache = self.model._table_cache = None
        self._text_added.difference_update(ids)
        for r in rows:
            self._moved[r] = self.deltas + 1  # the delta about to be applied counts it

    def _text_new_items(self, histories: Sequence[EventSeq], texts: Mapping[str, str] | None = None) -> None:
        """Items first seen now: those of ``texts`` (the events' own ``item_text``) and each history's
        last item that the catalogue has text for. A failure here (the encoder's package missing, say)
        is logged and the batch is served without those rows: they are an improvement, not a need."""
        if self.text is None:
            return
        known = self.vocab.__contains__
        new = {i: t for i, t in texts.items() if t and not known(i)} if texts else {}
        cat = self.text.catalogue
        if cat:
            for h in histories:
                if len(h) and not known(h.items[-1]) and h.items[-1] in cat:
                    new.setdefault(h.items[-1], None)
        if not new:
            return
        try:
            self.add_item_texts(new)
        except Exception as exc:  # noqa: BLE001 - the prediction goes on with the hash-bucket rows
            self.text_errors += 1
            self._count_text_rows("failed", len(new))
            if self.text_errors == 1 or self.text_errors % 1000 == 0:
                log.error("!!! text rows for %d new item(s) failed (%d failures so far); those items keep their "
                          "hash-bucket rows: %s: %s", len(new), self.text_errors, type(exc).__name__, exc)

    def __repr__(self) -> str:
        return (f"TransformerPredictor({self.version} on {self.device}, threads={self.num_threads}, "
                f"incremental={self.incremental}, overflow={self.overflow}, cache={self.cache.max_entries} users / "
                f"{self.cache.max_bytes >> 20} MiB, compile={self.compiled})")

    def warm_up(self) -> None:
        """Run every code path once (full, prefill, step) on a synthetic user; raise CheckpointError if
        the model produces non-finite outputs (a checkpoint that loads but does not work)."""
        names = self.vocab.items[:3] or ["__warmup__"]
        n = min(3, self.cfg.max_len)
        h = EventSeq.from_columns([names[i % len(names)] for i in range(n)], ["view"] * n,
                                  1_700_000_000_000 + 60_000 * np.arange(n))
        preds = self.predict_full([h], k=5)
        if self.cache.enabled:
            preds += self.predict([h[:1]], k=5)  # prefill
            preds += self.predict([h[:2]], k=5)  # step (when max_len >= 2)
            self.cache.clear()
        for p in preds:
            vals = [*p.action_probs, p.next_gap_s, *(s for _, s in p.top_items)]
            if not all(math.isfinite(v) for v in vals):
                raise CheckpointError(f"checkpoint {self.path} (version {self.version}) produces non-finite "
                                      f"outputs on a warm-up history: {vals[:8]}")
        self.stats = dict.fromkeys(self.stats, 0)
        self.cache.stats = dict.fromkeys(self.cache.stats, 0)

    # ------------------------------------------------------------------ Predictor protocol
    def predict(self, histories: Sequence[EventSeq], k: int, users: Sequence[str] | None = None,
                texts: Mapping[str, str] | None = None) -> list[Prediction]:
        """One prediction per history, in input order (the triggering event is each history's last).

        ``users`` (optional, same length): the user id of each history — keeps one cache entry
        per user and enables :meth:`forget_user`. Without it, the cache still works (content keys).
        ``texts`` (optional): item id → text (the batch's events' ``item_text``); with a text
        projection, the items of it that the vocabulary does not know get their text rows first
        (:meth:`add_item_texts`), so this very call can rank them. Without one, ignored.
        """
        k = self._check_k(k)
        n = len(histories)
        if users is not None and len(users) != n:
            raise ValueError(f"users has {len(users)} entries for {n} histories")
        if n == 0:
            return []
        self.stats["requests"] += n
        self._text_new_items(histories, texts)
        if not self.cache.enabled:
            return self.predict_full(histories, k)
        self._ensure_threads()
        W = self.cfg.max_len
        lens = [len(h) for h in histories]
        prev_keys = [window_key(h, m - 1, W) if m >= 2 else None for h, m in zip(histories, lens)]
        cur_keys = [window_key(h, m, W) if m >= 1 else None for h, m in zip(histories, lens)]
        # rounds: a request whose previous window is produced by an earlier request of this batch
        # (the same user's previous event) runs one round after it, so it can step from its state.
        rounds: list[list[int]] = [[] for _ in range(self.max_rounds)]
        round_of: dict[int, int] = {}
        for j in range(n):
            r = min(round_of.get(prev_keys[j], -1) + 1, self.max_rounds - 1) if prev_keys[j] is not None else 0
            if cur_keys[j] is not None:
                round_of[cur_keys[j]] = r
            rounds[r].append(j)
        out: list[Prediction | None] = [None] * n
        # every model call of the batch first (a round's steps depend on the previous round's
        # states), then the heads once for all of them: one pass over the item table per batch
        pending: list[tuple[list[int], LastHidden]] = []  # (rows, their last positions)
        with torch.inference_mode(), self._autocast():
            for members in rounds:
                if not members:
                    continue
                steps: list[tuple[int, CacheEntry]] = []
                prefills: list[int] = []
                for j in members:
                    e = self.cache.get(prev_keys[j]) if prev_keys[j] is not None else None
                    if e is not None and self._stale(e):  # built too many deltas ago: rebuilt
                        self.stats["stale"] += 1
                        self.cache.pop(prev_keys[j])
                        e = None
                    if e is not None and self._can_step(e):
                        steps.append((j, e))
                    else:
                        prefills.append(j)
                if steps:
                    self._run_steps(steps, histories, prev_keys, cur_keys, users, pending)
                if prefills:
                    self._run_prefills(prefills, histories, cur_keys, users, pending)
            rows = [j for r, _ in pending for j in r]
            last = LastHidden.cat([p for _, p in pending])
            for s in range(0, len(rows), self.max_rows):  # bounded [rows, V] score matrices
                o = self.model.heads(last.rows(s, s + self.max_rows), k, self.score_dtype)
                self._emit(o, rows[s: s + self.max_rows], out)
        return self._explained(histories, out)  # type: ignore[arg-type]

    def predict_full(self, histories: Sequence[EventSeq], k: int, texts: Mapping[str, str] | None = None
                     ) -> list[Prediction]:
        """Full recomputation (no cache): encode every window, ``score_last``, device top-K
        (``texts``: as in :meth:`predict`)."""
        k = self._check_k(k)
        n = len(histories)
        if n == 0:
            return []
        self._text_new_items(histories, texts)
        self._ensure_threads()
        out: list[Prediction | None] = [None] * n
        enc = [encode(h, self.vocab, self.cfg) for h in histories]
        with torch.inference_mode(), self._autocast():
            for T, rows in self._group_by_bucket([len(e["item"]) for e in enc]):
                for s in range(0, len(rows), self.max_rows):
                    chunk = rows[s: s + self.max_rows]
                    batch = self._to_device(collate([enc[j] for j in chunk], pad_to=T))  # (B, T) each
                    o = self._score_last(batch, k, self.score_dtype)
                    self.stats["full"] += len(chunk)
                    self.stats["model_calls"] += 1
                    self._emit(o, chunk, out)
        return self._explained(histories, out)  # type: ignore[arg-type]

    def _explained(self, histories: Sequence[EventSeq], out: list[Prediction]) -> list[Prediction]:
        """With ``explain_top > 0``: each prediction's ``why`` (:mod:`models.explain`: occlusion of the
        window's events and of the newest event's context, batched over the whole batch)."""
        if self.explain_top > 0:
            from models.explain import explain_batch  # noqa: PLC0415 - only when explanations are on

            with self._autocast():
                for p, e in zip(out, explain_batch(self.model, self.vocab, histories, top=self.explain_top)):
                    p.why = e.to_json()
        return out

    # ------------------------------------------------------------------ cache management
    def forget_user(self, user: str) -> bool:
        """Drop a user's cached state (privacy deletion). Needs ``users`` passed to :meth:`predict`."""
        return self.cache.forget_user(user)

    def forget_users(self, users: Sequence[str]) -> int:
        """The :class:`~models.predictor.Predictor` contract: drop each user's cached state."""
        return sum(self.cache.forget_user(u) for u in users)

    def clear_cache(self) -> None:
        self.cache.clear()

    def cache_info(self) -> dict:
        """Entries, bytes, and hit/miss/eviction counters of the KV cache, plus request counters."""
        return {"entries": len(self.cache), "bytes": self.cache.nbytes, "max_entries": self.cache.max_entries,
                "max_bytes": self.cache.max_bytes, **self.cache.stats, **self.stats}

    def bytes_per_token(self) -> int:
        """Cached bytes per event token: keys + values of every layer, the repeat key, the item id."""
        f = 2 * self.cfg.n_layers * self._hd + self._rep_dim
        return f * torch.tensor([], dtype=self._kv_dtype).element_size() + 8

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_k(k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (got {k!r})")
        return int(k)

    def _ensure_threads(self) -> None:
        # intra-op threads are process-wide; re-assert ours in the executor thread that runs us
        if not self.cuda and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.cuda:
            return batch
        # pinned staging (PyTorch's caching host allocator reuses the blocks) + async H2D copies
        return {key: t.pin_memory().to(self.device, non_blocking=True) for key, t in batch.items()}

    def _group_by_bucket(self, lengths: Sequence[int], min_group: int = 16) -> list[tuple[int, list[int]]]:
        """Indices grouped by padded length bucket; groups smaller than ``min_group`` join the next
        larger bucket (fewer, fuller model calls). Returns ``[(T, indices)]``, T ascending."""
        groups: dict[int, list[int]] = {}
        for j, m in enumerate(lengths):
            groups.setdefault(_bucket(max(m, 1), self.buckets), []).append(j)
        out: list[tuple[int, list[int]]] = []
        carry: list[int] = []
        for T in sorted(groups):
            carry = carry + groups[T]
            if len(carry) >= min_group or T == max(groups):
                out.append((T, carry))
                carry = []
        return out

    def _can_step(self, e: CacheEntry) -> bool:
        if e.n < self.cfg.max_len:
            return True  # the window grows: stepping is exact
        # full window: evict mode drops the oldest token (approximate) until refresh_every evictions
        return self.overflow == "evict" and e.since_prefill < self.refresh_every

    def _stale(self, e: CacheEntry) -> bool:
        """Was ``e`` built more than ``max_stale_deltas`` deltas ago, or before a delta changed the
        meaning of an index in its window (:meth:`apply_delta`)?"""
        if self.deltas - e.deltas > self.max_stale_deltas:
            return True
        if self._moved:
            moved = self._moved
            return any(moved.get(i, -1) > e.deltas for i in e.items.tolist())
        return False

    def _cacheable(self, n_tokens: int) -> bool:
        # exact mode: a full window can never be stepped (the next event re-prefills) — don't store it
        return n_tokens >= 1 and (self.overflow == "evict" or n_tokens < self.cfg.max_len)

    def _run_prefills(self, rows: list[int], histories, cur_keys, users, pending: list) -> None:
        enc = [encode(histories[j], self.vocab, self.cfg) for j in rows]
        lens = [len(e["item"]) for e in enc]
        for T, idx in self._group_by_bucket(lens):
            for s in range(0, len(idx), self.max_rows):
                part = idx[s: s + self.max_rows]
                chunk = [rows[i] for i in part]
                batch = collate([enc[i] for i in part], pad_to=T)  # (B, T) per feature; lengths (B,)
                if bool((batch["lengths"] == 0).any()):  # empty history: one padding token
                    batch["lengths"] = batch["lengths"].clamp(min=1)
                last, state = self.model.prefill(self._to_device(batch), heads=False)
                self.stats["prefills"] += len(chunk)
                self.stats["model_calls"] += 1
                pending.append((chunk, last))
                self._store(state, chunk, [lens[i] for i in part], None, cur_keys, users, since=0)

    def _run_steps(self, steps: list[tuple[int, CacheEntry]], histories, prev_keys, cur_keys, users,
                   pending: list) -> None:
        evict = self.overflow == "evict"
        for T, idx in self._group_by_bucket([e.n for _, e in steps]):
            for s in range(0, len(idx), self.max_rows):
                part = [steps[i] for i in idx[s: s + self.max_rows]]
                chunk = [j for j, _ in part]
                entries = [e for _, e in part]
                state = self._stack(entries, T)
                tokens = collate([encode_last(histories[j], self.vocab, self.cfg) for j in chunk])  # (B, 1)
                last, new_state = self.model.step(self._to_device(tokens), state, evict=evict, heads=False)
                self.stats["steps"] += len(chunk)
                self.stats["model_calls"] += 1
                pending.append((chunk, last))
                for j in chunk:
                    self.cache.pop(prev_keys[j])
                self._store(new_state, chunk, [min(e.n + 1, self.cfg.max_len) for e in entries], entries,
                            cur_keys, users)

    def _stack(self, entries: list[CacheEntry], T: int) -> KVState:
        """Per-user entries → one right-padded batch state with ``T`` cached columns."""
        cfg, hd, L = self.cfg, self._hd, self.cfg.n_layers
        buf = pad_sequence([e.kv for e in entries], batch_first=True)  # (B, T', F)
        items = pad_sequence([e.items for e in entries], batch_first=True)  # (B, T')
        if buf.shape[1] < T:
            buf = F.pad(buf, (0, 0, 0, T - buf.shape[1]))
            items = F.pad(items, (0, T - items.shape[1]))
        B = buf.shape[0]

        def heads(i: int) -> torch.Tensor:  # (B, H, T, dh)
            return buf[:, :, i * hd:(i + 1) * hd].unflatten(2, (cfg.n_heads, cfg.head_dim)).transpose(1, 2)

        keys = [heads(i) for i in range(L)]
        values = [heads(L + i) for i in range(L)]
        rep_k = buf[:, :, 2 * L * hd:] if self._rep_dim else buf.new_zeros(B, T, 0)  # (B, T, d | 0)
        lengths = torch.tensor([e.n for e in entries], dtype=torch.long, device=buf.device)  # (B,)
        positions = torch.tensor([e.position for e in entries], dtype=torch.long, device=buf.device)  # (B,)
        return KVState(keys, values, rep_k, items, lengths, positions)

    def _store(self, state: KVState, rows: list[int], n_tokens: list[int], prev: list[CacheEntry] | None,
               cur_keys, users, since: int | None = None) -> None:
        if not self.cache.enabled:
            return
        keep = [b for b, m in enumerate(n_tokens) if self._cacheable(m) and cur_keys[rows[b]] is not None]
        if not keep:
            return
        flat = flatten_state(state).to(self._kv_dtype)  # (B, T, F)
        per_tok = flat.shape[-1] * flat.element_size() + state.items.element_size()
        lengths = state.lengths.tolist()
        positions = state.positions.tolist()
        for b in keep:
            m = int(lengths[b])
            j = rows[b]
            if since is not None:
                sp, built = since, self.deltas
            else:  # count the approximate (evicting) steps since the state was rebuilt
                sp = prev[b].since_prefill + int(prev[b].n >= self.cfg.max_len)  # type: ignore[index]
                built = prev[b].deltas  # type: ignore[index]  # its oldest tokens' weights
            entry = CacheEntry(flat[b, :m].clone(), state.items[b, :m].clone(), m, int(positions[b]), sp,
                               users[j] if users is not None else None, m * per_tok, built)
            self.cache.put(cur_keys[j], entry)

    def _emit(self, o: dict[str, torch.Tensor], rows: list[int], out: list) -> None:
        """Copy only the K ids and probabilities (top-K and the catalogue's normaliser ran on the
        device: :meth:`~models.model.NextActionModel.top_items`), action probs and gap back to the host."""
        k = o["top_scores"].shape[1]
        # the K scores and the row's log-normaliser in one device -> host copy
        host = torch.cat([o["top_scores"].float(), o["item_log_norm"].float()[:, None]], 1).cpu().numpy()
        ids, vals = o["top_items"].cpu().tolist(), top_probs(host[:, :k], host[:, k]).tolist()  # (B, k) each
        probs = o["action_probs"].float().cpu().numpy().astype(np.float64)  # (B, 5)
        probs /= probs.sum(axis=1, keepdims=True)
        gaps = np.expm1(np.clip(o["gap_log_s"].float().cpu().numpy().astype(np.float64), 0.0, _GAP_LOG_CLIP))
        names = self.vocab.items
        first = self.vocab.first_item
        plist, glist = probs.tolist(), gaps.tolist()
        for b, j in enumerate(rows):
            tops = [(names[i - first], v) for i, v in zip(ids[b], vals[b])]
            out[j] = Prediction(action_probs=plist[b], top_items=tops, next_gap_s=glist[b])
