"""Fixtures shared by the model-layer tests."""

from __future__ import annotations

import numpy as np
import pytest

from models.schema import EventSeq

#: The item ids of a ``make_checkpoint(items=15)`` vocabulary.
ITEMS15 = [f"i{k}" for k in range(15)]


@pytest.fixture
def histories15() -> list[EventSeq]:
    """Three seeded histories (1, 4 and 9 events) over the 15 items ``i0..i14``, every action, real gaps."""
    rng = np.random.default_rng(0)
    return [EventSeq.from_columns([ITEMS15[rng.integers(15)] for _ in range(n)], rng.integers(0, 5, n),
                                  1_700_000_000_000 + np.cumsum(rng.integers(1000, 10 ** 7, n)))
            for n in (1, 4, 9)]


@pytest.fixture
def rewrite_weights():
    """``rewrite(path, mutate)``: edit a checkpoint's ``model.safetensors`` tensors in place
    (``mutate(state)``) and re-sign its manifest, as a checkpoint written otherwise (older, or broken)
    but consistently would look."""
    import json

    from safetensors.torch import load_file, save_file

    from models.checkpoint import _sha256, content_hash

    def rewrite(path, mutate) -> None:
        state = load_file(str(path / "model.safetensors"))
        mutate(state)
        save_file(state, str(path / "model.safetensors"))
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["model.safetensors"] = _sha256(path / "model.safetensors")
        manifest["content_hash"] = content_hash(manifest["files"])
        (path / "manifest.json").write_text(json.dumps(manifest))

    return rewrite
