"""Checkpoints: a directory of ``model.safetensors`` + ``config.json`` + ``vocab.json`` +
``manifest.json`` (sha256 of each file and a content hash over them). Never pickle.

* Written atomically: everything goes to a temporary sibling directory which is renamed into place,
  so a reader sees the old checkpoint or the new one, never half of one.
* :func:`load_checkpoint` verifies every file's hash and that config, vocabulary and tensors agree,
  and raises :class:`~models.errors.CheckpointError` naming the specific problem.
* ``version`` (what every prediction is stamped with) is the first 12 hex digits of the content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.config import ModelConfig, TrainConfig
from models.encoding import ItemVocab
from models.errors import CheckpointError, ConfigError

FORMAT = "nextaction-checkpoint/1"
FILES = ("model.safetensors", "config.json", "vocab.json")
MANIFEST = "manifest.json"
TEXT_FILE = "text_projection.safetensors"  # optional: models.text.TextProjection (models.text.PROJECTION_FILE)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on ``device``) and everything saved with it."""

    model: Any  # NextActionModel
    vocab: ItemVocab
    model_config: ModelConfig
    train_config: TrainConfig | None
    metadata: dict = field(default_factory=dict)
    content_hash: str = ""
    path: Path | None = None
    text_projection: Any = None  # models.text.TextProjection when the checkpoint has one (cold-start items)

    @property
    def version(self) -> str:
        return self.content_hash[:12]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(file_hashes: dict[str, str]) -> str:
    """sha256 over ``name:sha256`` lines of the checkpoint files, in a fixed order."""
    text = "".join(f"{name}:{file_hashes[name]}\n" for name in sorted(file_hashes))
    return hashlib.sha256(text.encode()).hexdigest()


def code_version() -> str:
    """The git commit of this checkout (``+dirty`` when modified), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        return rev or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(path: str | Path, model, vocab: ItemVocab, train_config: TrainConfig | None = None,
                    metadata: dict | None = None, text_projection=None) -> Path:
    """Write ``model`` (a :class:`~models.model.NextActionModel`) and its vocabulary to directory
    ``path`` atomically; an existing checkpoint there is replaced. Returns ``path``.
    ``text_projection`` (a :class:`models.text.TextProjection`): also written, as
    :data:`TEXT_FILE`, and hashed like the other files (cold-start items from text)."""
    from safetensors.torch import save_file

    path = Path(path)
    cfg: ModelConfig = model.cfg
    if len(vocab) != cfg.n_items:
        raise CheckpointError(f"vocabulary has {len(vocab)} entries but model config n_items={cfg.n_items}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code_version": code_version()}
        meta.update(metadata or {})
        config = {"format": FORMAT, "model": cfg.to_dict(),
                  "train": train_config.to_dict() if train_config is not None else None, "metadata": meta}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default))
        (tmp / "vocab.json").write_text(vocab.to_json())
        files = FILES
        if text_projection is not None:
            from models.text import save_projection

            if text_projection.d_model != cfg.d_model:
                raise CheckpointError(f"text projection outputs rows of width {text_projection.d_model}, the model "
                                      f"d_model={cfg.d_model}")
            save_projection(tmp / TEXT_FILE, text_projection)
            files = (*FILES, TEXT_FILE)
        hashes = {name: _sha256(tmp / name) for name in files}
        manifest = {"format": FORMAT, "files": hashes, "content_hash": content_hash(hashes)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for name in (*files, MANIFEST):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(path: str | Path) -> dict:
    """The manifest (``files`` hashes and ``content_hash``) without loading anything else."""
    path = Path(path)
    f = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is missing {MANIFEST}")
    try:
        manifest = json.loads(f.read_text())
        manifest["files"], manifest["content_hash"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{f}: not a valid manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{f}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_checkpoint(path: str | Path) -> str:
    """Check that every file exists and matches its recorded sha256; return the content hash."""
    path = Path(path)
    manifest = read_manifest(path)
    hashes = manifest["files"]
    names = (*FILES, TEXT_FILE) if TEXT_FILE in hashes else FILES
    for name in names:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}")
        if name not in hashes:
            raise CheckpointError(f"{path / MANIFEST} has no hash for {name}")
        actual = _sha256(path / name)
        if actual != hashes[name]:
            raise CheckpointError(f"hash mismatch for {path / name}: expected sha256 {hashes[name]}, "
                                  f"got {actual} (file corrupt or modified)")
    expected = content_hash({n: hashes[n] for n in names})
    if manifest["content_hash"] != expected:
        raise CheckpointError(f"{path / MANIFEST}: content_hash {manifest['content_hash']} does not match the "
                              f"file hashes (expected {expected})")
    return manifest["content_hash"]


def load_checkpoint(path: str | Path, device: str = "cpu", expect: dict[str, Any] | None = None) -> Checkpoint:
    """Load and verify a checkpoint; the model is returned in eval mode on ``device``.

    ``expect``: model-config fields the caller needs (e.g. ``{"max_len": 50}``); a different value
    raises ``CheckpointError`` naming the field.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.model import NextActionModel

    path = Path(path)
    digest = verify_checkpoint(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'config.json'}: format {config.get('format')!r}, expected {FORMAT!r}")
    try:
        mcfg = ModelConfig.from_dict(config["model"])
        tcfg = TrainConfig.from_dict(config["train"]) if config.get("train") else None
    except ConfigError as exc:
        raise CheckpointError(f"{path / 'config.json'}: config field {exc.name!r} = {exc.value!r}: "
                              f"{exc.problem}") from None
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: incompatible config ({exc})") from None
    for name, want in (expect or {}).items():
        have = getattr(mcfg, name, None)
        if have != want:
            raise CheckpointError(f"config mismatch in {path}: field {name!r} is {have!r}, expected {want!r}")
    vocab = ItemVocab.from_json((path / "vocab.json").read_text())
    if len(vocab) != mcfg.n_items:
        raise CheckpointError(f"config mismatch in {path}: field 'n_items' is {mcfg.n_items} but vocab.json "
                              f"has {len(vocab)} entries")
    if vocab.n_hash_buckets != mcfg.n_hash_buckets:
        raise CheckpointError(f"config mismatch in {path}: field 'n_hash_buckets' is {mcfg.n_hash_buckets} but "
                              f"vocab.json has {vocab.n_hash_buckets}")
    try:
        state = load_file(str(path / "model.safetensors"), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({exc})") from None
    model = NextActionModel(mcfg)
    own = model.state_dict()
    if "item_input" not in state:  # written before untrained items read their bucket: identity
        state["item_input"] = own["item_input"]
    if "item_category" not in state and not mcfg.item_categories:  # written before item categories existed
        state["item_category"] = own["item_category"]
    for table, prefix in (("transition", "trans"), ("neighbour", "nbr")):  # the tables: their size is the data's
        for name in (f"{prefix}_ptr", f"{prefix}_idx", f"{prefix}_val"):
            state.setdefault(name, own[name])  # written before models had one: no table
            own[name] = state[name]
            setattr(model, name, torch.empty_like(state[name]))  # the empty buffer, resized for load_state_dict
        ptr, idx, val = state[f"{prefix}_ptr"], state[f"{prefix}_idx"], state[f"{prefix}_val"]
        if ptr.numel() and (ptr.numel() != mcfg.n_items + 1 or idx.numel() != val.numel()
                            or int(ptr[-1]) != idx.numel() or (idx.numel() and int(idx.max()) >= mcfg.n_items)):
            raise CheckpointError(f"{path / 'model.safetensors'}: {table} table does not fit n_items="
                                  f"{mcfg.n_items} (ptr {tuple(ptr.shape)}, idx {tuple(idx.shape)}, "
                                  f"val {tuple(val.shape)})")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the model built from config.json: "
                              f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path / 'model.safetensors'}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                                  f"config.json implies {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)
    model.to(torch.device(device)).eval()
    proj = None
    if (path / TEXT_FILE).is_file() and TEXT_FILE in read_manifest(path)["files"]:
        from models.text import load_projection

        proj = load_projection(path / TEXT_FILE, mcfg.d_model)
    return Checkpoint(model, vocab, mcfg, tcfg, config.get("metadata") or {}, digest, path, proj)
