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
