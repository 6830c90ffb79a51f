"""Model and training configuration: plain dataclasses with validation and a JSON round trip.

Every field is validated in :meth:`ModelConfig.validate` / :meth:`TrainConfig.validate`; a bad value
raises :class:`~models.errors.ConfigError` naming the field and the value.

>>> cfg = ModelConfig(n_items=2000)
>>> cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_len, cfg.backbone
(64, 2, 2, 50, 'llama')
>>> ModelConfig.from_json(cfg.to_json()) == cfg
True
>>> ModelConfig(d_model=63, n_heads=2)
Traceback (most recent call last):
...
models.errors.ConfigError: 'd_model' = 63: must be divisible by n_heads (2)
>>> ModelConfig.from_dict({"d_model": 32, "colour": "red"})
Traceback (most recent call last):
...
models.errors.ConfigError: 'ModelConfig.colour' = 'red': unknown field
>>> TrainConfig(lr=-1.0)
Traceback (most recent call last):
...
models.errors.ConfigError: 'lr' = -1.0: must be > 0
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from models.errors import ConfigError
from models.features import FEATURES, first_item
from models.schema import N_ACTIONS
from models.transitions import TRANSITION_SCORES

BACKBONES = ("llama", "gpt2", "bert", "gru")  # gru: the GRU4Rec-style baseline (models.backbones.GRUBackbone)
OBJECTIVES = ("causal", "masked_then_causal")
DEVICES = ("auto", "cpu", "cuda")
#: Serving choices (models.serving, models.devices), here so that settings can name them without torch.
SCORE_DTYPES = ("auto", "float32", "bfloat16")
OVERFLOW_MODES = ("exact", "evict")


class _JsonMixin:
    """``to_dict``/``from_dict``/``to_json``/``from_json`` for a flat dataclass."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in names:
                raise ConfigError(f"{cls.__name__}.{k}", v, "unknown field")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(cls.__name__, text[:60], f"not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ConfigError(cls.__name__, d, "must be a JSON object")
        return cls.from_dict(d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _check(cond: bool, name: str, value: object, problem: str) -> None:
    if not cond:
        raise ConfigError(name, value, problem)


def _int(name: str, value: object, lo: int | None = None) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
    if lo is not None:
        _check(value >= lo, name, value, f"must be >= {lo}")


def _num(name: str, value: object) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "must be a number")


@dataclass(frozen=True)
class ModelConfig(_JsonMixin):
    """Shape of the model. ``n_items`` is the full item vocabulary size, i.e. ``len(ItemVocab)``
    (padding + mask token + hash buckets + known items), not the number of known items."""

    n_items: int = 0  # 0 = not set yet (train.model_config_for sets it from the dataset)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 2  # feed-forward width = ffn_mult * d_model
    max_len: int = 50  # events per window (the last max_len events of a history)
    dropout: float = 0.3  # embeddings, hidden states and attention
    backbone: str = "llama"  # llama: RoPE + causal + KV cache; gpt2: learned positions; bert (is_decoder)
    objective: str = "causal"  # or masked_then_causal (BERT4Rec-style pretraining, then causal)
    # --- token features -------------------------------------------------------------------------
    n_hash_buckets: int = 1024  # item ids not in the vocabulary hash into these (models.features layout)
    # fraction of input items training replaces by a random hash bucket (0 = off: the bucket rows are set to
    # the mean trained item embedding instead; benchmarks/RESULTS.md, "Transformer training", session 3)
    unknown_item_rate: float = 0.0
    # add a learned embedding of each item's catalogue category (hashed into n_category_buckets) to its row
    item_categories: bool = False
    item_categories_input: bool = True  # ... also on the input tokens (False: scored rows only)
    n_category_buckets: int = 1024
    n_gap_buckets: int = 32  # log2-scale buckets of the gap to the previous event
    n_device_buckets: int = 64
    n_location_buckets: int = 1024
    features: tuple[str, ...] = FEATURES  # token features summed into the embedding (models.features)
    # --- heads ----------------------------------------------------------------------------------
    repeat_head: bool = True  # learned copy score over the user's own history items
    action_head: bool = True
    action_prior: bool = False  # add a learned logit row per current action to the action head
    gap_head: bool = True  # regression on log1p(seconds to next event); needs timestamps
    # --- loss -----------------------------------------------------------------------------------
    # 0 = full-softmax CE over the catalogue; K > 0 = sampled softmax against K distinct uniform negatives
    # shared by the batch, ~V/K times cheaper per target (benchmarks/RESULTS.md, "Transformer training", where an
    # epoch went)
    n_negatives: int = 0
    action_loss_weight: float = 0.5
    gap_loss_weight: float = 0.1
    mask_prob: float = 0.2  # masked pretraining: fraction of items replaced by the mask token
    label_smoothing: float = 0.0
    # --- action calibration (fitted on validation after training: models/calibration.py) ---------
    action_temperature: float = 1.0  # served action probabilities = softmax(T * logits + bias)
    action_bias: tuple[float, ...] = ()  # () = none, else one bias per action
    item_temperature: float = 1.0  # served item probabilities = softmax(item scores / T) (calibration.py)
    # --- item transitions (models/transitions.py; table counted and weight fitted after training) -
    transition_top: int = 100  # successors kept per item (0 = no table)
    transition_feature: str = "log"  # a models.transitions.TRANSITION_SCORES kind (fitted choice)
    transition_weight: float = 0.0  # item score += weight * feature(last item -> item); 0 = off
    # --- item neighbours (models/neighbours.py; co-occurrence table built and weight fitted after training)
    neighbour_top: int = 50  # most similar items kept per item (0 = no table)
    neighbour_window: int = 2  # the last events whose neighbours are scored (fitted choice)
    neighbour_weight: float = 0.0  # item score += weight * sum of cosine(recent item, item); 0 = off
    # --- category recency (item_categories models; window and weight fitted after training) --------
    category_recency: bool = True  # fit the term after training (False: never; weight stays 0)
    category_window: int = 1  # the last events whose categories are scored (fitted choice)
    # item score += weight / (1 + distance of the last of those events in the item's category); 0 = off
    category_weight: float = 0.0
    category_weight_unseen: float = 0.0  # ... when the history's items are excluded (fitted on masked validation)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _int("n_items", self.n_items, 0)
        min_items = first_item(self.n_hash_buckets) + 1  # padding, mask, the hash buckets and one known item
        _check(self.n_items == 0 or self.n_items >= min_items, "n_items", self.n_items,
               f"must be 0 (unset) or len(ItemVocab) >= n_hash_buckets + 3 = {min_items}")
        for name in ("d_model", "n_layers", "n_heads", "ffn_mult", "max_len", "n_hash_buckets", "n_gap_buckets",
                     "n_device_buckets", "n_location_buckets"):
            _int(name, getattr(self, name), 1)
        _check(self.d_model % self.n_heads == 0, "d_model", self.d_model,
               f"must be divisible by n_heads ({self.n_heads})")
        _check(self.n_gap_buckets >= 4, "n_gap_buckets", self.n_gap_buckets, "must be >= 4")
        for name in ("n_device_buckets", "n_location_buckets"):
            _check(getattr(self, name) >= 2, name, getattr(self, name), "must be >= 2")
        _num("dropout", self.dropout)
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        _check(self.backbone in BACKBONES, "backbone", self.backbone, f"must be one of {BACKBONES}")
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"must be one of {OBJECTIVES}")
        _check(self.backbone != "gru" or self.objective == "causal", "objective", self.objective,
               "the gru backbone is causal only (masked pretraining needs a Transformer backbone)")
        _check(isinstance(self.features, tuple) and all(f in FEATURES for f in self.features), "features",
               self.features, f"must be a subset of {FEATURES}")
        _check("item" in self.features, "features", self.features, "must include 'item'")
        _int("n_negatives", self.n_negatives, 0)
        for name in ("action_loss_weight", "gap_loss_weight", "label_smoothing"):
            _num(name, getattr(self, name))
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _num("unknown_item_rate", self.unknown_item_rate)
        _check(0.0 <= self.unknown_item_rate < 1.0, "unknown_item_rate", self.unknown_item_rate, "must be in [0, 1)")
        _num("mask_prob", self.mask_prob)
        _check(0.0 < self.mask_prob < 1.0, "mask_prob", self.mask_prob, "must be in (0, 1)")
        _check(self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "must be < 1")
        _num("action_temperature", self.action_temperature)
        _check(0.0 < self.action_temperature < 100.0, "action_temperature", self.action_temperature,
               "must be in (0, 100)")
        _check(isinstance(self.action_bias, tuple) and len(self.action_bias) in (0, N_ACTIONS)
               and all(isinstance(b, (int, float)) and math.isfinite(b) for b in self.action_bias),
               "action_bias", self.action_bias, f"must be () or {N_ACTIONS} finite numbers")
        _num("item_temperature", self.item_temperature)
        _check(0.0 < self.item_temperature < 1000.0, "item_temperature", self.item_temperature,
               "must be in (0, 1000)")
        _int("transition_top", self.transition_top, 0)
        _check(self.transition_feature in TRANSITION_SCORES, "transition_feature", self.transition_feature,
               f"must be one of {TRANSITION_SCORES}")
        _num("transition_weight", self.transition_weight)
        _check(math.isfinite(self.transition_weight) and self.transition_weight >= 0, "transition_weight",
               self.transition_weight, "must be finite and >= 0")
        _int("neighbour_top", self.neighbour_top, 0)
        _int("neighbour_window", self.neighbour_window, 1)
        _check(self.neighbour_window <= self.max_len, "neighbour_window", self.neighbour_window,
               f"must be <= max_len ({self.max_len})")
        _num("neighbour_weight", self.neighbour_weight)
        _check(math.isfinite(self.neighbour_weight) and self.neighbour_weight >= 0, "neighbour_weight",
               self.neighbour_weight, "must be finite and >= 0")
        _int("category_window", self.category_window, 1)
        _check(self.category_window <= self.max_len, "category_window", self.category_window,
               f"must be <= max_len ({self.max_len})")
        for name in ("category_weight", "category_weight_unseen"):
            w = getattr(self, name)
            _num(name, w)
            _check(math.isfinite(w) and w >= 0, name, w, "must be finite and >= 0")
            _check(w == 0 or self.item_categories, name, w, "needs item_categories (the items' categories are "
                                                              "what it scores)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def uses(self, feature: str) -> bool:
        return feature in self.features


@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    """How to train. ``budget_min`` bounds wall-clock time (0 = no bound)."""

    lr: float = 5e-3  # peak learning rate (benchmarks/RESULTS.md, "Transformer training", Beauty recipe runs B vs D)
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    epochs: int = 200
    pretrain_epochs: int = 0  # masked_then_causal: epochs of masked pretraining (0 = 25% of epochs)
    batch_size: int = 256
    # evaluations without validation NDCG@10 improvement before stopping (a plateau at a high lr first
    # anneals: models.train.ANNEAL_BELOW)
    patience: int = 5
    eval_every: int = 1  # epochs between validation passes
    # validate and save an exponential moving average of the weights with this half-life in epochs
    # (models.averaging; 0 = the last step's weights)
    ema_epochs: float = 0.0
    seed: int = 42
    device: str = "auto"
    budget_min: float = 0.0
    num_threads: int = 0  # CPU intra-op threads (0 = leave torch's default)
    # validation ranking, passed to models.evaluate: history 'allowed' (as served; the default since issue 17)
    # or 'masked' (history items removed, the SASRec-paper protocol)
    eval_protocol: str = "allowed"
    max_eval_users: int = 3000  # validate on a fixed sample of this many users (0 = all)
    window_stride: int = 0  # long histories: extra training windows every stride events (0 = last only)
    # leave-one-out: train on every user's events but the test target (as the baselines are fitted),
    # except the max_eval_users validation users, whose validation target stays held out
    fit_unvalidated: bool = True
    # after training, fit the action head's temperature + biases on the validation cases (calibration.py)
    calibrate_actions: bool = True
    # ... and the item scores' temperature (the next-item probabilities; ranking unchanged)
    calibrate_items: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("lr", "weight_decay", "grad_clip", "budget_min", "ema_epochs"):
            _num(name, getattr(self, name))
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _check(self.budget_min >= 0, "budget_min", self.budget_min, "must be >= 0 (0 = no budget)")
        _check(self.ema_epochs >= 0, "ema_epochs", self.ema_epochs, "must be >= 0 (0 = off)")
        for name in ("warmup_steps", "pretrain_epochs", "num_threads", "max_eval_users", "window_stride"):
            _int(name, getattr(self, name), 0)
        for name in ("epochs", "batch_size", "patience", "eval_every"):
            _int(name, getattr(self, name), 1)
        _int("seed", self.seed)
        _check(self.schedule in ("cosine", "linear", "constant"), "schedule", self.schedule,
               "must be one of ('cosine', 'linear', 'constant')")
        _check(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        _check(self.eval_protocol in ("masked", "allowed"), "eval_protocol", self.eval_protocol,
               "must be 'masked' or 'allowed'")
