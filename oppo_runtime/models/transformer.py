"""Decoder-only transformer (Llama / Qwen2 / Qwen3 / Mistral) over packed tokens.

One decoder stack (``Decoder``) under two heads: ``CausalLM`` (``lm_head``: logits, log-probs)
and ``ScalarHeadModel`` (``score``: one scalar per token, for reward model and critic). The same
module trains (``DenseContext``: autograd, optional gradient checkpointing) and serves the engine
(``PagedContext``: K/V appended to the pages, attention over the pages). All attention, norm and
rotary math goes through ``oppo_runtime.ops`` so the CUDA kernels plug in underneath.

Parameter names equal transformers' state-dict names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``, ``score.weight``): loading and saving is a rename-free mapping.

Two forward paths, one set of weights:
  * autograd path (``DenseContext``, or anything with grad enabled): the math of
    ``ops.norm_rope``; on CUDA RMSNorm and silu(gate)*up run as one Triton kernel each way
    (``ops.train_fused``, whose references are that math and what the CPU runs). Training, the
    recomputed PPO old log-probs and the update's first forward are the same computation (the
    PPO ratio starts at exactly 1);
  * inference path (``PagedContext`` under no_grad / inference_mode: the engine and the scorers):
    the fused ops of ``ops.fused``, about 10 kernels per layer instead of ~45 -- add+RMSNorm
    (the residual travels beside the hidden state, as in vLLM), one QKV GEMM, one rotary kernel
    for q and k (with Qwen3's q_norm/k_norm inside), the attention ops, o_proj, add+RMSNorm, one
    gate_up GEMM, silu*mul, down_proj. On the CPU the references run and give bit-for-bit the
    autograd path's numbers.

Fused projections (``fuse_projections()``, called once by the engine after the model is on its
device): each layer allocates one weight [q+k+v, h] (and bias) and one [2I, h], copies the
q/k/v and gate/up weights in, and re-points those Parameters' ``.data`` to row slices (views) of
it. The Parameters stay the same objects under the same names and shapes, so loading,
``state_dict()``, ``update_weights(state_dict)`` (``copy_`` in place) and an optimizer that
updates them in place all write into the fused tensor, and the engine can keep running on the
training model's own parameters with no copy. The fused tensors are plain attributes, not
parameters or buffers: ``named_parameters()`` and ``state_dict()`` are unchanged. ``model.to()``
(and ``.half()``, ``.cuda()``, ...) re-fuses from the converted parameters (``_apply``). Anything
that replaces the Parameters' storage behind our back (``load_state_dict(assign=True)``, FSDP
sharding, ``param.data = ...``) is detected on the next inference forward, which raises and
asks for ``fuse_projections()`` again rather than running on stale weights. ``save_model``
clones tensors (safetensors refuses views that share storage).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import (kv_append, paged_decode_attention, paged_prefill_attention,
                   rotary_cos_sin, token_logprobs, varlen_causal_attention)
from ..ops.attention import decode_rope_in, paged_decode_attention_rope, paged_decode_attention_rope_refuses
from ..ops._backend import record_backend
from ..ops.fused import (decode_gate_up_silu, decode_gemm_fusion, decode_linear, decode_norm_fold, fold_norm_weight,
                         folded_qkv_rotary, folded_silu_mul, fused_add_rms_norm, gate_up_silu, gate_up_silu_refuses,
                         kv_append_refuses, norm_gate_up_silu, norm_qkv_rotary, qkv_kernel_refuses,
                         rotary_cos_sin_cache, rotary_qk, silu_mul)
from ..ops.logprobs import entropy_from_logits, linear_token_logprobs
from ..ops.train_fused import rms_norm_train, rotary_train, silu_mul_train
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


class _FusedLinears:
    """Row-concatenation of some ``nn.Linear``s' weights (and biases) whose Parameters view it."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        with torch.no_grad(), torch.inference_mode(False):   # real tensors: training may use them
            self.weight = torch.cat([lin.weight.detach() for lin in linears])
            has_bias = linears[0].bias is not None
            self.bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
            row = 0
            for lin in linears:
                rows = lin.weight.shape[0]
                lin.weight.data = self.weight[row:row + rows]
                if has_bias:
                    lin.bias.data = self.bias[row:row + rows]
                row += rows
        self._ptrs = self._data_ptrs()

    def _data_ptrs(self) -> list[int]:
        return [p.data_ptr() for lin in self.linears for p in (lin.weight, lin.bias) if p is not None]

    def intact(self) -> bool:
        """Whether the parameters still view this fused weight."""
        return self._data_ptrs() == self._ptrs

    def check(self, where: str) -> None:
        if not self.intact():
            raise RuntimeError(f"{where}: the parameters no longer view the fused weight (replaced after "
                               "fuse_projections(): load_state_dict(assign=True), sharding, param.data = ...); "
                               "call model.fuse_projections() again")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _NormFold:
    """A decoder layer's qkv and gate_up weights with its two RMSNorm weights folded in (each column
    scaled: ``W * norm.weight``), for the norm-folded decode layer (``ops.fused.decode_norm_fold``).

    The copies are refreshed in place (their addresses never change, so CUDA graphs captured on
    them stay valid) when ``refresh(force=True)`` is called (``ActorEngine.update_weights`` does, for
    every layer) or when a source's version counter moved: ``refresh()`` compares the sum of the
    sources' counters with that of the last fold. Most in-place updates bump a counter (``copy_``,
    ``load_state_dict``, foreach and for-loop optimizers); a fused optimizer (``AdamW(fused=True)``,
    the trainer's on CUDA) and writes through ``param.data`` do not, hence the forced refresh after
    every weight update. The eager forward calls ``refresh()`` (outside a graph capture), and
    ``ModelRunner`` before every decode-graph replay."""

    def __init__(self, layer: "DecoderLayer"):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_src, self.gate_up_src = attn.qkv, mlp.gate_up
        self.norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        # every tensor a fold reads, and every parameter that views one (each has its own counter)
        self.sources = [attn.qkv.weight, mlp.gate_up.weight, *self.norms,
                        *(lin.weight for lin in attn.qkv.linears + mlp.gate_up.linears)]
        with torch.no_grad(), torch.inference_mode(False):   # real tensors: refreshed in and out of inference
            self.qkv = torch.empty_like(attn.qkv.weight)
            self.gate_up = torch.empty_like(mlp.gate_up.weight)
        self._key = None
        self.refreshes = 0

    def current_for(self, layer: "DecoderLayer") -> bool:
        """Whether this fold is of the layer's present fused weights and norms (not replaced since)."""
        return (self.qkv_src is layer.self_attn.qkv and self.gate_up_src is layer.mlp.gate_up
                and self.norms[0] is layer.input_layernorm.weight and self.norms[1] is layer.post_attention_layernorm.weight)

    def _state(self) -> int:
        # versions only (~1 us a layer: the runner checks before every replay); a source replaced
        # rather than updated leaves the fused weight the graphs read anyway (qkv.check says so eagerly)
        return sum(t._version for t in self.sources)

    def refresh(self, force: bool = False) -> bool:
        """Fold again if a source changed since the last fold (or ``force``); True if it did."""
        key = self._state()
        if key == self._key and not force:
            return False
        with torch.no_grad():
            fold_norm_weight(self.qkv_src.weight, self.norms[0], out=self.qkv)
            fold_norm_weight(self.gate_up_src.weight, self.norms[1], out=self.gate_up)
        self._key = key
        self.refreshes += 1
        return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_train(x, self.weight, self.eps)      # one Triton kernel each way on CUDA


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
        self.qkv: _FusedLinears | None = None

    def fuse_projections(self) -> None:
        # kept when intact: a CUDA graph captured on the fused weight must not see it freed
        if self.qkv is None or not self.qkv.intact():
            self.qkv = _FusedLinears([self.q_proj, self.k_proj, self.v_proj])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.qkv is not None:          # .to()/.half()/...: the parameters moved, fuse them again
            self.qkv = _FusedLinears([self.q_proj, self.k_proj, self.v_proj])
        return self

    def forward(self, x, cos, sin, ctx):
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary_train(q, k, cos, sin)       # one Triton kernel each way on CUDA
        return self._attend_and_project(q, k, v, ctx)

    def forward_fused(self, x, positions, cos_sin_cache, ctx):
        """Inference path: one QKV GEMM (when fused), one rotary kernel (q_norm/k_norm inside, and the
        K/V append to the pages)."""
        n = x.shape[0]
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv is not None:
            self.qkv.check(f"layer {self.layer_idx} q/k/v_proj")
            qkv = self.qkv(x)
            if isinstance(ctx, PagedContext) and ctx.is_decode and decode_rope_in():
                o = self._decode_rope_in(qkv, positions, cos_sin_cache, ctx)
                if o is not None:
                    return self.o_proj(o.reshape(n, q_dim))
            q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        # paged: the rotary kernel also appends the rotated k and v to the pages (one launch fewer)
        kv = None
        if isinstance(ctx, PagedContext):
            kv = (v, *ctx.kv_caches[self.layer_idx], ctx.slot_mapping)
        if self.q_norm is not None:
            q, k = rotary_qk(q, k, cos_sin_cache, positions, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                             kv=kv)
        else:
            q, k = rotary_qk(q, k, cos_sin_cache, positions, kv=kv)
        return self._attend_and_project(q, k, v, ctx, appended=kv is not None)

    def _decode_rope_in(self, qkv, positions, cos_sin_cache, ctx):
        """``OPPO_DECODE_ROPE_IN=1``: the rotary, the K/V append and the attention of a decode step in
        one kernel (``paged_decode_attention_rope``) -> [n, Hq, D]; None (logged why) where it does
        not serve this layer, which then takes the rotary kernel and the attention."""
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        why = "q_norm/k_norm" if self.q_norm is not None else (
            paged_decode_attention_rope_refuses(self.num_heads, qkv, k_cache, v_cache) if qkv.is_cuda else None)
        if why is not None:
            record_backend("decode_rope", f"rotary kernel (not in the attention: {why})")
            return None
        record_backend("decode_rope", "in the attention")
        return paged_decode_attention_rope(qkv, self.num_heads, k_cache, v_cache, ctx.block_tables, ctx.context_lens,
                                           self.scale, cos_sin_cache, positions, ctx.slot_mapping,
                                           workspace=ctx.decode_workspace, max_partition=ctx.decode_max_partition)

    def _attend_and_project(self, q, k, v, ctx, appended: bool = False):
        decode = isinstance(ctx, PagedContext) and ctx.is_decode
        return decode_linear(self.o_proj, self._attend(q, k, v, ctx, appended), decode)

    def _attend(self, q, k, v, ctx, appended: bool = False):
        """Attention of q [n, Hq, D] -> [n, Hq * D] (k, v appended to the pages first unless ``appended``)."""
        n = q.shape[0]
        if isinstance(ctx, DenseContext):
            o = varlen_causal_attention(q, k, v, ctx.cu_seqlens, self.scale, max_seqlen=ctx.max_seqlen)
        else:
            k_cache, v_cache = ctx.kv_caches[self.layer_idx]
            if not appended:
                kv_append(k, v, k_cache, v_cache, ctx.slot_mapping)
            if ctx.is_decode:
                o = paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale,
                                           workspace=ctx.decode_workspace, max_partition=ctx.decode_max_partition)
            else:
                o = paged_prefill_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.context_lens,
                                            ctx.block_tables, self.scale, max_seqlen_q=ctx.max_seqlen_q)
        return o.reshape(n, self.num_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.gate_up: _FusedLinears | None = None

    def fuse_projections(self) -> None:
        if self.gate_up is None or not self.gate_up.intact():
            self.gate_up = _FusedLinears([self.gate_proj, self.up_proj])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.gate_up is not None:
            self.gate_up = _FusedLinears([self.gate_proj, self.up_proj])
        return self

    def forward(self, x):
        return self.down_proj(silu_mul_train(self.gate_proj(x), self.up_proj(x)))

    def forward_fused(self, x, decode: bool = False):
        """Inference path: one gate_up GEMM and one silu*mul kernel (when fused); in a decode step
        under ``OPPO_DECODE_GATE_UP_SILU=1`` the two as one kernel (``ops.fused.gate_up_silu``)
        where it can take the operands (else logged why not); down_proj through ``decode_linear``
        (``OPPO_DECODE_LINEAR_KSPLIT=1``)."""
        if self.gate_up is None:
            return self.forward(x)
        self.gate_up.check("gate_proj/up_proj")
        if decode and decode_gate_up_silu():
            why = gate_up_silu_refuses(x, self.gate_up.weight, self.gate_up.bias)
            if why is None:
                record_backend("decode_mlp", "gate_up_silu (one kernel)")
                return decode_linear(self.down_proj, gate_up_silu(x, self.gate_up.weight), decode)
            record_backend("decode_mlp", f"gate_up GEMM + silu_mul ({why})")
        return decode_linear(self.down_proj, silu_mul(self.gate_up(x)), decode)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_fold: _NormFold | None = None      # built on the first norm-folded decode step

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.norm_fold = None             # .to()/.half()/...: fold the moved weights again
        return self

    def forward(self, h, cos, sin, ctx):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_fused(self, x, residual, positions, cos_sin_cache, ctx):
        """(x, residual) -> (mlp output, residual); the residual add of each sublayer is deferred
        into the next add+RMSNorm (residual None: x is the embedding, the stream starts here)."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if isinstance(ctx, PagedContext) and ctx.is_decode:
            unfolded = self._norm_fold_refused(ctx)
            if unfolded is None:
                return self._forward_decode_norm_folded(x, residual, positions, cos_sin_cache, ctx), None
            refused = self._gemm_fusion_refused(ctx)
            if refused is None:
                return self._forward_decode_gemm_fused(x, residual, positions, cos_sin_cache, ctx)
            record_backend("decode_layer", f"unfused (9 launches{refused or unfolded})")
        x, residual = fused_add_rms_norm(x, residual, norm1.weight, norm1.eps)
        x = self.self_attn.forward_fused(x, positions, cos_sin_cache, ctx)
        x, residual = fused_add_rms_norm(x, residual, norm2.weight, norm2.eps)
        return self.mlp.forward_fused(x, decode=isinstance(ctx, PagedContext) and ctx.is_decode), residual

    def _gemm_fusion_refused(self, ctx) -> str | None:
        """None when this decode step takes the 5-launch layer (``OPPO_DECODE_GEMM_FUSION=1``, fused
        projections and, on CUDA, operands the fused kernels take: their references sync with the
        host, so a decode graph could not be captured); else why not, for the log ('' if off)."""
        if not decode_gemm_fusion():
            return ""
        attn = self.self_attn
        if attn.qkv is None or self.mlp.gate_up is None:
            return ": projections not fused"
        k_cache, v_cache = ctx.kv_caches[attn.layer_idx]
        if k_cache.is_cuda:
            why = qkv_kernel_refuses(attn.qkv.weight.dtype, attn.head_dim, attn.num_kv_heads, k_cache, v_cache)
            if why is not None:
                return f": the fused kernels refuse {why}"
        return None

    def _forward_decode_gemm_fused(self, x, residual, positions, cos_sin_cache, ctx):
        """The decode layer in 5 launches: add+RMSNorm+QKV+rotary+K/V append, attention, o_proj,
        add+RMSNorm+gate_up+silu*mul, down_proj (instead of 9; see ops.fused)."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        attn.qkv.check(f"layer {attn.layer_idx} q/k/v_proj")
        mlp.gate_up.check("gate_proj/up_proj")
        k_cache, v_cache = ctx.kv_caches[attn.layer_idx]
        qn, kn = attn.q_norm, attn.k_norm
        q, residual = norm_qkv_rotary(x, residual, norm1.weight, norm1.eps, attn.qkv.weight, attn.qkv.bias,
                                      attn.num_heads, attn.num_kv_heads, cos_sin_cache, positions, k_cache, v_cache,
                                      ctx.slot_mapping, None if qn is None else qn.weight,
                                      None if kn is None else kn.weight, 1e-6 if qn is None else qn.eps)
        x = attn._attend_and_project(q, None, None, ctx, appended=True)
        act, residual = norm_gate_up_silu(x, residual, norm2.weight, norm2.eps, mlp.gate_up.weight, mlp.gate_up.bias)
        record_backend("decode_layer", "gemm-fused (5 launches)")
        return mlp.down_proj(act), residual

    def _norm_fold_refused(self, ctx) -> str | None:
        """None when this decode step takes the norm-folded layer (``OPPO_DECODE_NORM_FOLD=1``, fused
        projections, bfloat16 or float32, no o_proj/down_proj bias, and on CUDA caches the rotary
        kernel appends to); else why not, for the log ('' if off)."""
        if not decode_norm_fold():
            return ""
        if decode_gemm_fusion():
            raise ValueError("OPPO_DECODE_NORM_FOLD=1 and OPPO_DECODE_GEMM_FUSION=1: choose one (both replace the "
                             "decode layer's add+RMSNorm kernels)")
        attn, mlp = self.self_attn, self.mlp
        if attn.qkv is None or mlp.gate_up is None:
            return ": projections not fused"
        dtype = attn.qkv.weight.dtype
        if dtype not in (torch.bfloat16, torch.float32):
            return (f": no norm fold for {dtype} (the unnormalised stream times the weights can pass float16's "
                    "range)" if dtype == torch.float16 else f": no norm fold for {dtype}")
        if attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
            return ": no norm fold with an o_proj/down_proj bias"
        k_cache, v_cache = ctx.kv_caches[attn.layer_idx]
        if k_cache.is_cuda:
            why = kv_append_refuses(dtype, attn.num_kv_heads, attn.head_dim, k_cache, v_cache)
            if why is not None:
                return f": no norm fold for {why}"
        return None

    def _forward_decode_norm_folded(self, x, residual, positions, cos_sin_cache, ctx):
        """The decode layer with each RMSNorm folded into the projection after it (7 launches: QKV,
        rotary with the row scale + K/V append, attention, o_proj + residual, gate_up, silu*mul with
        the row scale, down_proj + residual) -> the residual stream after the layer. ``x`` is the
        stream (``residual`` None), or the sublayer output to add to ``residual`` (an unfolded layer
        before). The stream is updated in place (addmm_ with beta 1)."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        attn.qkv.check(f"layer {attn.layer_idx} q/k/v_proj")
        mlp.gate_up.check("gate_proj/up_proj")
        if self.norm_fold is None or not self.norm_fold.current_for(self):
            self.norm_fold = _NormFold(self)
        fold = self.norm_fold
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            fold.refresh()           # a capture bakes in the fold's address; the runner refreshes before replays
        s = x if residual is None else residual + x
        n = s.shape[0]
        k_cache, v_cache = ctx.kv_caches[attn.layer_idx]
        qn, kn = attn.q_norm, attn.k_norm
        q = folded_qkv_rotary(torch.mm(s, fold.qkv.t()), s, norm1.eps, attn.qkv.bias, attn.num_heads,
                              attn.num_kv_heads, cos_sin_cache, positions, k_cache, v_cache, ctx.slot_mapping,
                              None if qn is None else qn.weight, None if kn is None else kn.weight,
                              1e-6 if qn is None else qn.eps)
        o = attn._attend(q, None, None, ctx, appended=True)
        s = s.addmm_(o.reshape(n, attn.num_heads * attn.head_dim), attn.o_proj.weight.t())
        act = folded_silu_mul(torch.mm(s, fold.gate_up.t()), s, norm2.eps, mlp.gate_up.bias)
        s = s.addmm_(act, mlp.down_proj.weight.t())
        record_backend("decode_layer", "norm-folded (7 launches)")
        return s


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
        self._cos_sin_cache: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq[device]

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        """[P, head_dim] float32 cos | sin of every position this model runs (float32, one per device)."""
        if device not in self._cos_sin_cache:
            positions = max(self.config.max_position_embeddings, self.config.max_model_len or 0)
            with torch.no_grad(), torch.inference_mode(False):
                self._cos_sin_cache[device] = rotary_cos_sin_cache(self.inv_freq(device), positions, device)
        return self._cos_sin_cache[device]

    def forward(self, input_ids, positions, ctx, use_checkpoint: bool = False):
        h = self.embed_tokens(input_ids)
        if isinstance(ctx, PagedContext) and not torch.is_grad_enabled():
            return self._forward_fused(h, positions, ctx)
        cos, sin = rotary_cos_sin(positions, self.inv_freq(h.device))
        use_checkpoint = use_checkpoint and isinstance(ctx, DenseContext) and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpoint:
                h = checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx)
        return self.norm(h)

    def refresh_norm_folds(self, force: bool = False) -> int:
        """Refresh every layer's norm fold whose weights changed (see ``_NormFold``); how many did."""
        return sum(layer.norm_fold.refresh(force) for layer in self.layers if layer.norm_fold is not None)

    def _forward_fused(self, h, positions, ctx):
        cache = self.cos_sin_cache(h.device)
        residual = None
        for layer in self.layers:
            h, residual = layer.forward_fused(h, residual, positions, cache, ctx)
        return fused_add_rms_norm(h, residual, self.norm.weight, self.norm.eps)[0]


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

    def fuse_projections(self) -> "_DecoderModel":
        """One QKV and one gate_up weight per layer, viewed by the named parameters (see the module
        docstring). Call once the model is on its device. Idempotent: intact fused weights are kept
        (CUDA graphs captured on them stay valid); stale ones (parameters replaced since) are
        rebuilt from the parameters' current values. The autograd path never reads them."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        return self

    def refresh_norm_folds(self, force: bool = False) -> int:
        """The norm-folded decode layers' weight copies refreshed where a weight changed since their
        last fold (``ModelRunner`` calls it before every decode-graph replay; ``force``: all of them,
        e.g. after writes through ``param.data``, which no version counter sees). How many were."""
        return self.model.refresh_norm_folds(force)

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

    def compute_token_logprobs(self, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                               with_entropy: bool = False, *, chunk_rows: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p(tokens[i] | hidden[i]) [N], entropy [N] or None), float32, for training.

        One fused op (``ops.logprobs.linear_token_logprobs``) over ``lm_head.weight`` (tied to the
        embeddings or not: the gradient lands in whichever Parameter it is): the logits exist one
        row chunk at a time in forward and backward, none is saved for backward, and the entropy
        is differentiable too. ``lm_head`` has no bias here; were one added, this falls back to the
        reference composition (``token_logprobs`` / ``entropy_from_logits`` of ``compute_logits``),
        which keeps the logits for backward.
        """
        if self.lm_head.bias is not None:
            logits = self.compute_logits(hidden)
            return (token_logprobs(logits, tokens, temperature),
                    entropy_from_logits(logits, temperature) if with_entropy else None)
        return linear_token_logprobs(hidden, self.lm_head.weight, tokens, temperature, with_entropy, chunk_rows)


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
