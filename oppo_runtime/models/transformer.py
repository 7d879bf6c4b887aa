"""Decoder-only transformer (Llama / Qwen2 / Qwen3 / Mistral) over packed tokens.

One decoder stack (``Decoder``) under two heads: ``CausalLM`` (``lm_head``: logits, log-probs)
and ``ScalarHeadModel`` (``score``: one scalar per token, for reward model and critic). The same
module trains (``DenseContext``: autograd, optional gradient checkpointing) and serves the engine
(``PagedContext``: K/V appended to the pages, attention over the pages). All attention, norm and
rotary math goes through ``oppo_runtime.ops`` so the CUDA kernels plug in underneath.

Parameter names equal transformers' state-dict names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``, ``score.weight``): loading and saving is a rename-free mapping.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import (apply_rotary, kv_append, paged_decode_attention, paged_prefill_attention, rms_norm,
                   rotary_cos_sin, token_logprobs, varlen_causal_attention)
from .config import ModelConfig
from .context import DenseContext, PagedContext

__all__ = ["CausalLM", "ScalarHeadModel", "Decoder", "rotary_inv_freq"]


def rotary_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2], float32, computed as transformers does (bit-equal)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        h, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, h, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, ctx):
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(ctx, DenseContext):
            o = varlen_causal_attention(q, k, v, ctx.cu_seqlens, self.scale, max_seqlen=ctx.max_seqlen)
        else:
            k_cache, v_cache = ctx.kv_caches[self.layer_idx]
            kv_append(k, v, k_cache, v_cache, ctx.slot_mapping)
            if ctx.is_decode:
                o = paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale)
            else:
                o = paged_prefill_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens,
                                            ctx.block_tables, self.scale, max_seqlen_q=ctx.max_seqlen_q)
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, ctx):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Embedding, layers, final norm: ``model.*`` in transformers' naming."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Not a buffer: Module.to(bfloat16) would round it. Always float32, one copy per device.
        self._inv_freq_cpu = rotary_inv_freq(config)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq[device]

    def forward(self, input_ids, positions, ctx, use_checkpoint: bool = False):
        h = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, self.inv_freq(h.device))
        use_checkpoint = use_checkpoint and isinstance(ctx, DenseContext) and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpoint:
                h = checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx)
        return self.norm(h)


class _DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: DenseContext | PagedContext) -> torch.Tensor:
        """input_ids [N] long, positions [N] long -> final-normed hidden states [N, hidden_size]."""
        return self.model(input_ids, positions, ctx, use_checkpoint=self.gradient_checkpointing and self.training)

    def kv_geometry(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of this model's KV cache."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device


class CausalLM(_DecoderModel):
    def __init__(self, config: ModelConfig):
        if config.kind != "causal_lm":
            raise ValueError(f"CausalLM needs a *ForCausalLM config, got {config.architecture}")
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, V] in the model's dtype."""
        return self.lm_head(hidden)

    def compute_logprobs(self, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                         chunk_rows: int = 4096) -> torch.Tensor:
        """log p(tokens[i] | hidden[i]) in float32 [N]; the logits exist one row chunk at a time."""
        outs = [token_logprobs(self.compute_logits(hidden[s:s + chunk_rows]), tokens[s:s + chunk_rows],
                               temperature)
                for s in range(0, hidden.shape[0], chunk_rows)]
        return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


class ScalarHeadModel(_DecoderModel):
    def __init__(self, config: ModelConfig):
        if config.kind != "score":
            raise ValueError(f"ScalarHeadModel needs a *ForSequenceClassification config, got {config.architecture}")
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def compute_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> one float32 score per token [N] (head applied in float32)."""
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return F.linear(hidden.to(acc), self.score.weight.to(acc))[:, 0]
