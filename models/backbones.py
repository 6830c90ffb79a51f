"""The sequence backbones :class:`~models.model.NextActionModel` runs its token embeddings through.

:func:`build_backbone` builds a freshly initialised `transformers` model from a
:class:`~models.config.ModelConfig` (never downloaded): ``llama`` (RoPE, causal, KV cache),
``gpt2`` (learned positions), ``bert`` (as a decoder), or :class:`GRUBackbone`, the GRU4Rec-style
baseline. Every backbone takes ``inputs_embeds [B, T, d]`` and returns an object with
``last_hidden_state [B, T, d]`` (and ``past_key_values`` with ``use_cache=True``).
:func:`llama_forward` is the lean serving forward of the ``llama`` backbone, and
:func:`cache_tensors` reads the per-layer keys/values out of a `transformers` cache.

>>> import torch
>>> from models.config import ModelConfig
>>> cfg = ModelConfig(d_model=16, n_layers=1, max_len=8)
>>> bb = build_backbone(cfg).eval()
>>> x = torch.randn(2, 5, 16)
>>> h, keys, values = llama_forward(bb, x, torch.arange(5)[None])
>>> h.shape, len(keys), tuple(keys[0].shape)  # (B, T, d); one [B, H, T, dh] per layer
(torch.Size([2, 5, 16]), 1, (2, 2, 5, 8))
>>> torch.allclose(h, bb(inputs_embeds=x).last_hidden_state, atol=1e-5)
True
>>> build_backbone(cfg.replace(backbone="gru"))(inputs_embeds=x).last_hidden_state.shape
torch.Size([2, 5, 16])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


class _DropFirst(nn.Module):
    """Dropout on a module's tensor output: residual dropout for backbones such as Llama that have
    none of their own."""

    def __init__(self, inner: nn.Module, p: float) -> None:
        super().__init__()
        self.inner, self.drop = inner, nn.Dropout(p)

    def forward(self, *args, **kwargs):
        return self.drop(self.inner(*args, **kwargs))


@dataclass
class _BackboneOutput:
    last_hidden_state: torch.Tensor
    past_key_values: None = None


class GRUBackbone(nn.Module):
    """A GRU4Rec-style recurrent backbone with the `transformers` call shape (``inputs_embeds`` in,
    ``last_hidden_state`` out): the second neural baseline, trained and served by the same code as
    the Transformer. Causal by construction (right padding never reaches a valid position); it has
    no attention cache, so serving recomputes the window (``TransformerPredictor`` turns its KV cache
    off) and the masked objective, which needs bidirectional context, is not available."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gru = nn.GRU(cfg.d_model, cfg.d_model, num_layers=cfg.n_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask=None, past_key_values=None, use_cache: bool = False,
                **_: object) -> _BackboneOutput:
        if past_key_values is not None or use_cache:
            raise ValueError("the gru backbone has no attention cache: serve it with full recomputation")
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("the gru backbone is causal only: the masked objective needs a Transformer backbone")
        h, _ = self.gru(inputs_embeds)  # (B, T, d)
        return _BackboneOutput(self.norm(h))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def llama_forward(model: nn.Module, x: torch.Tensor, position_ids: torch.Tensor,
                  past_keys: list[torch.Tensor] | None = None, past_values: list[torch.Tensor] | None = None,
                  key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A `transformers` ``LlamaModel`` forward for serving, without its per-call machinery.

    The same modules and the same operations as ``LlamaModel.forward`` with ``sdpa`` attention
    (RMSNorm, rotary positions, attention, gated MLP, final norm), minus what costs more than the
    math at serving sizes on CPU: mask builders, cache objects, output capture and config lookups
    (benchmarks/RESULTS.md, "Serving a replayed stream"). Inference only; training and full
    recomputation keep the `transformers` forward, and the serving tests hold the two to 1e-4.

    ``x [B, S, d]``, ``position_ids [B|1, S]``. Without ``past_keys``: causal attention over the S
    positions (right padding needs no mask). With them (per layer ``[B, H, T, dh]``, post-rotary, as
    `transformers` caches them): ``S == 1`` and ``key_mask [B, T + 1]`` (True = may attend).
    Returns ``(h [B, S, d], keys, values)``, per layer ``[B, H, T + S, dh]`` (past, then the new).
    """
    B, S, _ = x.shape
    if past_keys is not None and (S != 1 or key_mask is None):
        raise ValueError(f"with past keys, one new position and a key_mask are needed (got S={S}, "
                         f"key_mask={'set' if key_mask is not None else None})")
    cos, sin = model.rotary_emb(x, position_ids)  # (B|1, S, dh)
    cos, sin = cos[:, None], sin[:, None]  # (B|1, 1, S, dh)
    mask = key_mask[:, None, None, :] if key_mask is not None else None  # (B, 1, 1, T + 1)
    keys, values = [], []
    h = x
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        y = layer.input_layernorm(h)
        shape = (B, S, -1, attn.head_dim)
        q = attn.q_proj(y).view(shape).transpose(1, 2)  # (B, H, S, dh)
        k = attn.k_proj(y).view(shape).transpose(1, 2)
        v = attn.v_proj(y).view(shape).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if past_keys is not None:
            k, v = torch.cat([past_keys[i], k], dim=2), torch.cat([past_values[i], v], dim=2)
        keys.append(k)
        values.append(v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                           is_causal=past_keys is None and S > 1)  # (B, H, S, dh)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(B, S, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h), keys, values


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised `transformers` backbone for ``cfg`` (no hub access), or the GRU baseline."""
    d, ff = cfg.d_model, cfg.ffn_mult * cfg.d_model
    if cfg.backbone == "gru":
        return GRUBackbone(cfg)
    if cfg.backbone == "llama":
        from transformers import LlamaConfig, LlamaModel

        hf = LlamaConfig(vocab_size=1, hidden_size=d, intermediate_size=ff, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                         max_position_embeddings=max(4 * cfg.max_len, 512), attention_dropout=cfg.dropout,
                         rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                         tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
        model = LlamaModel(hf)
        if cfg.dropout > 0:
            for layer in model.layers:
                layer.mlp = _DropFirst(layer.mlp, cfg.dropout)
                layer.self_attn.o_proj = _DropFirst(layer.self_attn.o_proj, cfg.dropout)
        return model
    if cfg.backbone == "gpt2":
        from transformers import GPT2Config, GPT2Model

        hf = GPT2Config(vocab_size=1, n_positions=cfg.max_len, n_embd=d, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                        n_inner=ff, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None,
                        use_cache=False, attn_implementation="sdpa")
        return GPT2Model(hf)
    if cfg.backbone == "bert":
        from transformers import BertConfig, BertModel

        hf = BertConfig(vocab_size=1, hidden_size=d, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                        intermediate_size=ff, hidden_dropout_prob=cfg.dropout,
                        attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=cfg.max_len,
                        type_vocab_size=1, is_decoder=True, use_cache=False, attn_implementation="sdpa")
        return BertModel(hf, add_pooling_layer=False)
    raise ValueError(f"unknown backbone {cfg.backbone!r}")



def cache_tensors(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer key and value tensors ``[B, H, T, dh]`` of a `transformers` cache."""
    if hasattr(cache, "layers"):
        return [lay.keys for lay in cache.layers], [lay.values for lay in cache.layers]
    if hasattr(cache, "self_attention_cache"):  # encoder-decoder wrapper (bert as decoder)
        return cache_tensors(cache.self_attention_cache)
    raise TypeError(f"unsupported cache type {type(cache).__name__}")

