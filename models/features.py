"""What a model input token is: the token features and the item vocabulary layout, declared once.

Config validation (:class:`models.config.ModelConfig`), the encoding (:func:`models.encoding.encode`,
:func:`~models.encoding.collate`, :class:`~models.encoding.ItemVocab`) and the model
(:class:`models.model.NextActionModel`, one embedding table per feature) all read this module;
it imports neither torch nor the config, so every layer can.

**Vocabulary layout** (item indices): :data:`PAD` = 0 padding, :data:`MASK` = 1 the mask token of
masked pretraining, then ``n_hash_buckets`` hash buckets for item ids the vocabulary does not know,
then the known items from :func:`first_item` on. Indices below :func:`first_item` are never scored
or predicted. Buckets come before the items so that growing the vocabulary appends rows and no
trained index moves.

**Token features** (:data:`TOKEN_FEATURES`, in this order): each is an ``int64`` per token with 0 =
padding / unknown / feature off, embedded by a table of :meth:`TokenFeature.rows` rows.

>>> PAD, MASK, N_SPECIAL, first_item(4)  # 4 hash buckets: indices 2..5, known items from 6 on
(0, 1, 2, 6)
>>> FEATURES
('item', 'action', 'gap', 'hour', 'dow', 'device', 'location')
>>> from models.config import ModelConfig
>>> embedding_rows(ModelConfig(features=("item", "action", "hour"), n_gap_buckets=16))
{'action': 6, 'hour': 25}
>>> embedding_rows(ModelConfig(n_gap_buckets=16, n_device_buckets=8, n_location_buckets=32))
{'action': 6, 'gap': 16, 'hour': 25, 'dow': 8, 'device': 8, 'location': 32}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from models.schema import N_ACTIONS


class FeatureSizes(Protocol):
    """What this module reads from a :class:`~models.config.ModelConfig` (which imports this module)."""

    n_items: int
    n_gap_buckets: int
    n_device_buckets: int
    n_location_buckets: int

    def uses(self, feature: str) -> bool: ...

# ----------------------------------------------------------------------------- vocabulary layout
PAD = 0
MASK = 1
#: Rows before the hash buckets (``PAD``, ``MASK``).
N_SPECIAL = 2


def first_item(n_hash_buckets: int) -> int:
    """Vocabulary index of the first known item: after padding, mask and the hash buckets."""
    return N_SPECIAL + n_hash_buckets


# ----------------------------------------------------------------------------- token features
@dataclass(frozen=True)
class TokenFeature:
    """One token feature: its values (``meaning``, 0 = padding) and its embedding table's size."""

    name: str
    meaning: str
    _rows: Callable[[FeatureSizes], int]

    def rows(self, cfg: FeatureSizes) -> int:
        """Rows of this feature's embedding table for ``cfg`` (0 = padding included)."""
        return int(self._rows(cfg))


#: Every token feature, in the order of the encoding's arrays and the model's embedding tables.
#: ``item`` is always on (its table is the model's item table); the others are switched by
#: ``ModelConfig.features`` (off = all zeros).
TOKEN_FEATURES: dict[str, TokenFeature] = {f.name: f for f in (
    TokenFeature("item", "vocabulary index (layout above; unknown ids -> their hash bucket)", lambda c: c.n_items),
    TokenFeature("action", "1 + index into models.schema.ACTIONS", lambda c: N_ACTIONS + 1),
    TokenFeature("gap", "1 = the user's first event, else 2 + floor(log2(1 + seconds since the previous event)), "
                        "capped at n_gap_buckets - 1", lambda c: c.n_gap_buckets),
    TokenFeature("hour", "1 + hour of day (UTC): 1..24", lambda c: 25),
    TokenFeature("dow", "day of week: 1..7, Monday = 1", lambda c: 8),
    TokenFeature("device", "0 = unknown, else 1 + crc32(device) % (n_device_buckets - 1)",
                 lambda c: c.n_device_buckets),
    TokenFeature("location", "0 = unknown, else 1 + crc32(location) % (n_location_buckets - 1)",
                 lambda c: c.n_location_buckets),
)}
#: The token feature names, in order.
FEATURES: tuple[str, ...] = tuple(TOKEN_FEATURES)


def embedding_rows(cfg: FeatureSizes) -> dict[str, int]:
    """``{feature: rows}`` of the feature embedding tables ``cfg`` uses, in :data:`FEATURES` order
    (``item`` excluded: it is the item table, ``cfg.n_items`` rows)."""
    return {name: f.rows(cfg) for name, f in TOKEN_FEATURES.items() if name != "item" and cfg.uses(name)}
