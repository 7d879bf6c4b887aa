"""Triton kernels of the fused inference ops (``ops.fused`` is their Python face and reference).

Each kernel reproduces the rounding of the unfused torch code it replaces: every intermediate
that torch stores in the model dtype is rounded to that dtype here too (``.to(dt).to(f32)``), so
rotary and silu*mul are bit-equal to the reference on bf16/fp16 and RMSNorm differs only by the
order of its float32 sum of squares.

    _add_rms_norm_kernel   one row per program: residual add, sum of squares, scale, weight
    _rotary_qk_kernel      one token per program: all q and k heads, optional per-head RMSNorm first
    _silu_mul_kernel       (row, column block) per program
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

__all__ = ["available", "add_rms_norm", "rotary_qk", "silu_mul"]


def available() -> bool:
    return triton is not None


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride,
                             res_out_ptr, res_out_stride, H, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        # x, residual, res_out: [N, H] (rows strided, each row contiguous); weight [H]; out [N, H].
        # Without a residual, res_out is x itself (never written): its dtype is the normed input's.
        row = tl.program_id(0).to(tl.int64)
        in_dtype = res_out_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + cols, mask=ok, other=0.0).to(tl.float32)
            s = (x + r).to(res_out_ptr.dtype.element_ty)          # h = h + sublayer(h), in the model dtype
            tl.store(res_out_ptr + row * res_out_stride + cols, s, mask=ok)
            x = s.to(tl.float32)
        var = tl.sum(x * x, 0) / H
        y = (x * tl.math.rsqrt(var + eps)).to(in_dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rotate_heads(x_ptr, head_stride, out_ptr, w_ptr, eps, H, c, s, out2_ptr, out2_ok,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
                      HAS_OUT2: tl.constexpr):
        # x: [H, 2*HALF] of one token (heads strided, each head contiguous); out: contiguous [H, 2*HALF];
        # HAS_OUT2: the result also to out2 (the token's row of the K cache), where out2_ok
        dt = out_ptr.dtype.element_ty
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        ok = (h < H) & (d < HALF)
        x1 = tl.load(x_ptr + h * head_stride + d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + h * head_stride + HALF + d, mask=ok, other=0.0).to(tl.float32)
        if HAS_NORM:   # Qwen3's q_norm / k_norm over each head, before the rotation
            var = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF)
            rstd = tl.math.rsqrt(var + eps)[:, None]
            w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the model dtype as torch does
        o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
        o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
        base = out_ptr + h * (2 * HALF) + d
        tl.store(base, o1.to(dt), mask=ok)
        tl.store(base + HALF, o2.to(dt), mask=ok)
        if HAS_OUT2:
            base2 = out2_ptr + h * (2 * HALF) + d
            tl.store(base2, o1.to(out2_ptr.dtype.element_ty), mask=ok & out2_ok)
            tl.store(base2 + HALF, o2.to(out2_ptr.dtype.element_ty), mask=ok & out2_ok)

    @triton.jit
    def _rotary_qk_kernel(q_ptr, q_stride0, q_stride1, k_ptr, k_stride0, k_stride1, q_out_ptr, k_out_ptr,
                          cache_ptr, cache_stride, max_pos, pos_ptr, qw_ptr, kw_ptr, eps, HQ, HKV,
                          v_ptr, v_stride0, v_stride1, kc_ptr, vc_ptr, page_stride, block_size, slot_ptr,
                          HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                          BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr, WRITE_KV: tl.constexpr):
        # q [N, HQ, D], k [N, HKV, D]; cos_sin_cache [max_pos, D] float32 (cos | sin); positions [N].
        # WRITE_KV: also the rotated k and v [N, HKV, D] into the paged caches [blocks, block_size,
        # HKV, D] (page stride page_stride, each page contiguous) at slot_mapping[tok] (-1: skip),
        # which the kv_append kernel otherwise does as one more launch per layer
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        inside = (pos >= 0) & (pos < max_pos)          # a position past the cache gives NaN, not garbage
        c = tl.load(cache_ptr + pos * cache_stride + d, mask=(d < HALF) & inside, other=float("nan"))
        s = tl.load(cache_ptr + pos * cache_stride + HALF + d, mask=(d < HALF) & inside, other=float("nan"))
        dt = q_out_ptr.dtype.element_ty
        c = c.to(dt).to(tl.float32)                    # cos.to(x.dtype)
        s = s.to(dt).to(tl.float32)
        _rotate_heads(q_ptr + tok * q_stride0, q_stride1, q_out_ptr + tok * HQ * 2 * HALF, qw_ptr, eps, HQ, c, s,
                      q_out_ptr, False, HALF, BLOCK_HQ, BLOCK_D, HAS_NORM, False)
        if WRITE_KV:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            keep = slot >= 0
            slot = tl.maximum(slot, 0)
            row = (slot // block_size) * page_stride + (slot % block_size) * (HKV * 2 * HALF)
            _rotate_heads(k_ptr + tok * k_stride0, k_stride1, k_out_ptr + tok * HKV * 2 * HALF, kw_ptr, eps, HKV,
                          c, s, kc_ptr + row, keep, HALF, BLOCK_HKV, BLOCK_D, HAS_NORM, True)
            h = tl.arange(0, BLOCK_HKV)[:, None]
            dd = tl.arange(0, 2 * BLOCK_D)[None, :]
            okv = (h < HKV) & (dd < 2 * HALF)
            v = tl.load(v_ptr + tok * v_stride0 + h * v_stride1 + dd, mask=okv, other=0.0)
            tl.store(vc_ptr + row + h * (2 * HALF) + dd, v.to(vc_ptr.dtype.element_ty), mask=okv & keep)
        else:
            _rotate_heads(k_ptr + tok * k_stride0, k_stride1, k_out_ptr + tok * HKV * 2 * HALF, kw_ptr, eps, HKV,
                          c, s, k_out_ptr, False, HALF, BLOCK_HKV, BLOCK_D, HAS_NORM, False)

    @triton.jit
    def _silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, INTER, BLOCK: tl.constexpr):
        # x [N, 2*INTER] (gate | up), rows strided; out [N, INTER]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < INTER
        dt = out_ptr.dtype.element_ty
        g = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * x_stride + INTER + cols, mask=ok, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)      # F.silu rounds to the dtype
        tl.store(out_ptr + row * out_stride + cols, (a * u).to(dt), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x, residual [N, H] -> (normed [N, H], x + residual [N, H]) (second is x when residual is None)."""
    N, H = x.shape
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(N, H, dtype=torch.promote_types(res_dtype, weight.dtype), device=x.device)
    res_out = x if residual is None else torch.empty(N, H, dtype=res_dtype, device=x.device)
    if N:
        block = triton.next_power_of_2(H)
        r = x if residual is None else residual
        _add_rms_norm_kernel[(N,)](x, x.stride(0), r, r.stride(0), weight, out, out.stride(0),
                                   res_out, res_out.stride(0), H, eps,
                                   HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block))
    return out, res_out


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
              q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float, kv=None):
    """q [N, Hq, D], k [N, Hkv, D] (heads may be strided) -> new contiguous (q, k); with
    ``kv=(v, k_cache, v_cache, slot_mapping)`` the rotated k and v also go to the caches."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(N, Hkv, D, dtype=k.dtype, device=k.device)
    if N:
        has_norm = q_norm_weight is not None
        qw = q_norm_weight if has_norm else cos_sin_cache     # unread placeholders
        kw = k_norm_weight if has_norm else cos_sin_cache
        half = D // 2
        block_d = triton.next_power_of_2(half)
        if kv is not None:
            v, k_cache, v_cache, slots = kv
            kv_args = (v, v.stride(0), v.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.shape[1], slots)
        else:
            kv_args = (k, 0, 0, k_out, k_out, 0, 1, positions)          # unread placeholders
        _rotary_qk_kernel[(N,)](q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), q_out, k_out,
                                cos_sin_cache, cos_sin_cache.stride(0), cos_sin_cache.shape[0], positions,
                                qw, kw, eps, Hq, Hkv, *kv_args, HALF=half, BLOCK_HQ=triton.next_power_of_2(Hq),
                                BLOCK_HKV=triton.next_power_of_2(Hkv), BLOCK_D=block_d,
                                HAS_NORM=has_norm, WRITE_KV=kv is not None, num_warps=4)
    return q_out, k_out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] -> silu(gate) * up [N, I]."""
    N, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(N, inter, dtype=gate_up.dtype, device=gate_up.device)
    if N:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(N, triton.cdiv(inter, block))](gate_up, gate_up.stride(0), out, out.stride(0), inter,
                                                         BLOCK=block, num_warps=_warps(block))
    return out
