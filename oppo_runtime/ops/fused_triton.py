"""Triton kernels of the fused inference ops (``ops.fused`` is their Python face and reference).

Each kernel reproduces the rounding of the unfused torch code it replaces: every intermediate
that torch stores in the model dtype is rounded to that dtype here too (``.to(dt).to(f32)``), so
rotary and silu*mul are bit-equal to the reference on bf16/fp16 and RMSNorm differs only by the
order of its float32 sum of squares.

    _add_rms_norm_kernel   one row per program: residual add, sum of squares, scale, weight
    _rotary_qk_kernel      one token per program: all q and k heads, optional per-head RMSNorm first
                           (and, for the norm fold, the row's RMSNorm scale and the bias first)
    _silu_mul_kernel       (row, column block) per program (the norm fold: the row scale first)
    _norm_dual_gemm_kernel (row block, column tile) per program: add+RMSNorm as the prologue of a
                           GEMM with two accumulators, whose epilogue is silu(gate) * up, or rotary
                           of one q/k head (and the K/V append) -- a decode layer in 5 launches
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

__all__ = ["available", "add_rms_norm", "rotary_qk", "silu_mul", "norm_gate_up_silu", "norm_qkv_rotary"]


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
    def _row_rstd(s_ptr, HS, eps, BLOCK_S: tl.constexpr):
        # rsqrt(mean(s^2) + eps) of one row s [HS] (the RMSNorm scale of the residual stream's row)
        cols = tl.arange(0, BLOCK_S)
        x = tl.load(s_ptr + cols, mask=cols < HS, other=0.0).to(tl.float32)
        return tl.math.rsqrt(tl.sum(x * x, 0) / HS + eps)

    @triton.jit
    def _rope_pair(x1, x2, c, s):
        """The rotation of a half-split pair, float32 in and out: x1, x2 and cos / sin hold values of
        the model dtype (bf16 / fp16), so each product is exact in float32 and x1 c - x2 s, x2 c + x1 s
        are the exact sums rounded once to float32 (fused or not), then once to the dtype by the
        caller's store. Written so on purpose: `(x1 * c).to(dt).to(f32) + ...`, torch's rounding of
        each product, was narrowed by the compiler to `fma.rn.bf16(x1, c, -(x2 s))` (the first
        product unrounded, an order the compiler chose; session 40 read it from the sm_90 PTX), and
        the decode attention's rotary prologue (kernels/paged_decode_attention.cuh rope_rotate8)
        computes this same form so that both paths write the same bits."""
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def _rotate_heads(x_ptr, head_stride, out_ptr, w_ptr, eps, H, c, s, out2_ptr, out2_ok, scale, b_ptr,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
                      HAS_OUT2: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
        # x: [H, 2*HALF] of one token (heads strided, each head contiguous); out: contiguous [H, 2*HALF];
        # HAS_OUT2: the result also to out2 (the token's row of the K cache), where out2_ok;
        # SCALED: x is first scale * x (+ bias [H, 2*HALF] when HAS_BIAS), rounded to the dtype (the
        # norm fold: x is the projection of the unnormalised stream, scale its row's RMSNorm scale)
        dt = out_ptr.dtype.element_ty
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        ok = (h < H) & (d < HALF)
        x1 = tl.load(x_ptr + h * head_stride + d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + h * head_stride + HALF + d, mask=ok, other=0.0).to(tl.float32)
        if SCALED:
            x1 = x1 * scale
            x2 = x2 * scale
            if HAS_BIAS:
                x1 += tl.load(b_ptr + h * (2 * HALF) + d, mask=ok, other=0.0).to(tl.float32)
                x2 += tl.load(b_ptr + h * (2 * HALF) + HALF + d, mask=ok, other=0.0).to(tl.float32)
            x1 = x1.to(dt).to(tl.float32)
            x2 = x2.to(dt).to(tl.float32)
        if HAS_NORM:   # Qwen3's q_norm / k_norm over each head, before the rotation
            var = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF)
            rstd = tl.math.rsqrt(var + eps)[:, None]
            w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        # x * cos + rotate_half(x) * sin in float32, rounded once to the dtype (_rope_pair)
        o1, o2 = _rope_pair(x1, x2, c, s)
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
                          s_ptr, s_stride, HS, row_eps, b_ptr,
                          HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                          BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr, WRITE_KV: tl.constexpr,
                          ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr):
        # q [N, HQ, D], k [N, HKV, D]; cos_sin_cache [max_pos, D] float32 (cos | sin); positions [N].
        # WRITE_KV: also the rotated k and v [N, HKV, D] into the paged caches [blocks, block_size,
        # HKV, D] (page stride page_stride, each page contiguous) at slot_mapping[tok] (-1: skip),
        # which the kv_append kernel otherwise does as one more launch per layer.
        # ROW_SCALE (the norm fold; needs WRITE_KV): q, k, v are projections of the residual stream
        # s [N, HS] (row stride s_stride) by RMSNorm-weighted weights, so each is first
        # rsqrt(mean(s^2) + row_eps) * x (+ the bias [(HQ + 2 HKV) D] when HAS_BIAS), rounded
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        inside = (pos >= 0) & (pos < max_pos)          # a position past the cache gives NaN, not garbage
        c = tl.load(cache_ptr + pos * cache_stride + d, mask=(d < HALF) & inside, other=float("nan"))
        s = tl.load(cache_ptr + pos * cache_stride + HALF + d, mask=(d < HALF) & inside, other=float("nan"))
        dt = q_out_ptr.dtype.element_ty
        c = c.to(dt).to(tl.float32)                    # cos.to(x.dtype)
        s = s.to(dt).to(tl.float32)
        r = 1.0
        if ROW_SCALE:
            r = _row_rstd(s_ptr + tok * s_stride, HS, row_eps, BLOCK_S)
        _rotate_heads(q_ptr + tok * q_stride0, q_stride1, q_out_ptr + tok * HQ * 2 * HALF, qw_ptr, eps, HQ, c, s,
                      q_out_ptr, False, r, b_ptr, HALF, BLOCK_HQ, BLOCK_D, HAS_NORM, False, ROW_SCALE, HAS_BIAS)
        if WRITE_KV:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            keep = slot >= 0
            slot = tl.maximum(slot, 0)
            row = (slot // block_size) * page_stride + (slot % block_size) * (HKV * 2 * HALF)
            _rotate_heads(k_ptr + tok * k_stride0, k_stride1, k_out_ptr + tok * HKV * 2 * HALF, kw_ptr, eps, HKV,
                          c, s, kc_ptr + row, keep, r, b_ptr + HQ * 2 * HALF, HALF, BLOCK_HKV, BLOCK_D, HAS_NORM,
                          True, ROW_SCALE, HAS_BIAS)
            h = tl.arange(0, BLOCK_HKV)[:, None]
            dd = tl.arange(0, 2 * BLOCK_D)[None, :]
            okv = (h < HKV) & (dd < 2 * HALF)
            v = tl.load(v_ptr + tok * v_stride0 + h * v_stride1 + dd, mask=okv, other=0.0)
            if ROW_SCALE:
                v = v.to(tl.float32) * r
                if HAS_BIAS:
                    v += tl.load(b_ptr + (HQ + HKV) * 2 * HALF + h * (2 * HALF) + dd, mask=okv,
                                 other=0.0).to(tl.float32)
                v = v.to(dt)
            tl.store(vc_ptr + row + h * (2 * HALF) + dd, v.to(vc_ptr.dtype.element_ty), mask=okv & keep)
        else:
            _rotate_heads(k_ptr + tok * k_stride0, k_stride1, k_out_ptr + tok * HKV * 2 * HALF, kw_ptr, eps, HKV,
                          c, s, k_out_ptr, False, r, b_ptr, HALF, BLOCK_HKV, BLOCK_D, HAS_NORM, False, False, False)

    @triton.jit
    def _silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, INTER, s_ptr, s_stride, HS, row_eps, b_ptr,
                         BLOCK: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
        # x [N, 2*INTER] (gate | up), rows strided; out [N, INTER]. ROW_SCALE (the norm fold): x is
        # the projection of the residual stream s [N, HS] by RMSNorm-weighted weights, so gate and
        # up are first rsqrt(mean(s^2) + row_eps) * x (+ the bias [2*INTER] when HAS_BIAS), rounded
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < INTER
        dt = out_ptr.dtype.element_ty
        g = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * x_stride + INTER + cols, mask=ok, other=0.0).to(tl.float32)
        if ROW_SCALE:
            r = _row_rstd(s_ptr + row * s_stride, HS, row_eps, BLOCK_S)
            g = g * r
            u = u * r
            if HAS_BIAS:
                g += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
                u += tl.load(b_ptr + INTER + cols, mask=ok, other=0.0).to(tl.float32)
            g = g.to(dt).to(tl.float32)
            u = u.to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)      # F.silu rounds to the dtype
        tl.store(out_ptr + row * out_stride + cols, (a * u).to(dt), mask=ok)


    @triton.jit
    def _sum_rows(x_ptr, x_stride, res_ptr, res_stride, res_out_ptr, res_out_stride, rows, rmask, k0, K, write,
                  HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr):
        # columns k0.. of x + residual for rows [BLOCK_M] -> float32 [BLOCK_M, BLOCK_K] (the sum rounded to
        # the model dtype, as ``h = h + sublayer(h)``), stored to res_out where ``write``; and the columns
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * res_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
            s = (x + r).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + rows[:, None] * res_out_stride + cols[None, :], s, mask=m & write)
            x = s.to(tl.float32)
        return x, cols

    @triton.jit
    def _norm_dual_gemm_kernel(x_ptr, x_stride, res_ptr, res_stride, res_out_ptr, res_out_stride, nw_ptr, eps,
                               w_ptr, w_stride, b_ptr, M, K, LIMIT_A, OFFSET_B, LIMIT_B, out_ptr, out_stride,
                               cache_ptr, cache_stride, max_pos, pos_ptr, kc_ptr, vc_ptr, page_stride, block_size,
                               slot_ptr, HQ, HKV, qnw_ptr, knw_ptr, qk_eps,
                               EPI_QKV: tl.constexpr, HAS_QK_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                               HAS_BIAS: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               HALF: tl.constexpr, SPLIT: tl.constexpr,
                               DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        # x, residual [M, K] (rows strided); norm weight [K]; W [rows, K] (row stride w_stride), bias [rows].
        # Prologue: s = x + residual (stored to res_out by column tile 0), y = RMSNorm(s). Two
        # accumulators over weight rows A = j*BLOCK_N + n (< LIMIT_A) and B = A + OFFSET_B (< LIMIT_B):
        #   EPI_QKV=False (gate_up, W = gate | up): out[M, INTER] = silu(y @ Wa^T) * (y @ Wb^T);
        #   EPI_QKV=True  (W = q | k | v, HALF = head_dim / 2 = SPLIT * BLOCK_N, program j = columns
        #     [s, s + BLOCK_N) of both halves of head j // SPLIT, s = (j % SPLIT) * BLOCK_N): the head,
        #     rotated at positions[M] (cos_sin_cache [max_pos, D] float32) unless a v head; q heads to
        #     out [M, HQ * D], k and v heads into the paged caches [pages, block_size, HKV, D] (page stride
        #     page_stride) at slot_mapping[M] (-1: skipped), as rotary_qk(kv=...) writes them;
        #     HAS_QK_NORM: RMSNorm of each q / k head first (weights [D], qk_eps).
        pid_m = tl.program_id(0)
        j = tl.program_id(1)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        dt = res_out_ptr.dtype.element_ty
        n = tl.arange(0, BLOCK_N)
        row_a = j * BLOCK_N + n
        head = j // SPLIT                   # QKV: program j is column slice j % SPLIT of head j // SPLIT
        sl = (j % SPLIT) * BLOCK_N + n      # (the slice's columns within each rotary half)
        if EPI_QKV:
            row_a = head * (2 * HALF) + sl
        row_b = row_a + OFFSET_B
        ok_a = row_a < LIMIT_A
        ok_b = row_b < LIMIT_B
        # One pass over K: x + residual is read once per program. The RMS scale is one number per row,
        # so it is applied to the accumulators at the end: (w * s) @ W^T * rstd == (w * s * rstd) @ W^T
        # (the rounding of the GEMM's input differs from fused_add_rms_norm's by where it happens)
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, cols = _sum_rows(x_ptr, x_stride, res_ptr, res_stride, res_out_ptr, res_out_stride, rows, rmask,
                                k0, K, j == 0, HAS_RESIDUAL, BLOCK_K)
            sumsq += tl.sum(x * x, 1)
            kmask = cols < K
            nw = tl.load(nw_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
            a = (nw[None, :] * x).to(w_ptr.dtype.element_ty)
            wa = tl.load(w_ptr + row_a[:, None].to(tl.int64) * w_stride + cols[None, :],
                         mask=ok_a[:, None] & kmask[None, :], other=0.0)
            wb = tl.load(w_ptr + row_b[:, None].to(tl.int64) * w_stride + cols[None, :],
                         mask=ok_b[:, None] & kmask[None, :], other=0.0)
            if DOT_F32:   # the interpreter's dot multiplies bf16 bit patterns: operands in fp32
                a = a.to(tl.float32)
                wa = wa.to(tl.float32)
                wb = wb.to(tl.float32)
            if IEEE:      # float32 models: full-precision products, as torch's float32 matmul (not tf32)
                acc_a = tl.dot(a, tl.trans(wa), acc_a, input_precision="ieee")
                acc_b = tl.dot(a, tl.trans(wb), acc_b, input_precision="ieee")
            else:
                acc_a = tl.dot(a, tl.trans(wa), acc_a)
                acc_b = tl.dot(a, tl.trans(wb), acc_b)
        rstd = tl.math.rsqrt(sumsq / K + eps)
        acc_a = acc_a * rstd[:, None]
        acc_b = acc_b * rstd[:, None]
        if HAS_BIAS:
            acc_a += tl.load(b_ptr + row_a, mask=ok_a, other=0.0).to(tl.float32)[None, :]
            acc_b += tl.load(b_ptr + row_b, mask=ok_b, other=0.0).to(tl.float32)[None, :]
        odt = out_ptr.dtype.element_ty
        ga = acc_a.to(odt).to(tl.float32)                 # the projection's output, in the model dtype
        gb = acc_b.to(odt).to(tl.float32)
        if EPI_QKV:
            D = 2 * HALF
            if head < HQ + HKV:                           # q or k head: rotate (as _rotate_heads)
                if HAS_QK_NORM:   # Qwen3's q_norm / k_norm over the head (both halves: SPLIT == 1)
                    hw = qnw_ptr
                    if head >= HQ:
                        hw = knw_ptr
                    rs = tl.math.rsqrt((tl.sum(ga * ga, 1) + tl.sum(gb * gb, 1)) / D + qk_eps)[:, None]
                    w1 = tl.load(hw + n).to(tl.float32)[None, :]
                    w2 = tl.load(hw + BLOCK_N + n).to(tl.float32)[None, :]
                    ga = (w1 * (ga * rs).to(odt).to(tl.float32)).to(odt).to(tl.float32)
                    gb = (w2 * (gb * rs).to(odt).to(tl.float32)).to(odt).to(tl.float32)
                pos = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.int64)
                inside = (pos >= 0) & (pos < max_pos)
                cm = inside[:, None] & (sl[None, :] < HALF)
                c = tl.load(cache_ptr + pos[:, None] * cache_stride + sl[None, :], mask=cm, other=float("nan"))
                s = tl.load(cache_ptr + pos[:, None] * cache_stride + HALF + sl[None, :], mask=cm,
                            other=float("nan"))
                c = c.to(odt).to(tl.float32)
                s = s.to(odt).to(tl.float32)
                o1, o2 = _rope_pair(ga, gb, c, s)
            else:
                o1 = ga
                o2 = gb
            if head < HQ:
                base = out_ptr + rows[:, None] * out_stride + head * D + sl[None, :]
                tl.store(base, o1.to(odt), mask=rmask[:, None])
                tl.store(base + HALF, o2.to(odt), mask=rmask[:, None])
            else:
                slot = tl.load(slot_ptr + rows, mask=rmask, other=-1).to(tl.int64)
                keep = (slot >= 0)[:, None]
                slot = tl.maximum(slot, 0)
                h = head - HQ
                cache = kc_ptr
                if head >= HQ + HKV:
                    h = head - HQ - HKV
                    cache = vc_ptr
                base = cache + ((slot // block_size) * page_stride + (slot % block_size) * (HKV * D) + h * D)[:, None] \
                    + sl[None, :]
                tl.store(base, o1.to(cache.dtype.element_ty), mask=keep)
                tl.store(base + HALF, o2.to(cache.dtype.element_ty), mask=keep)
        else:
            act = (ga / (1.0 + tl.exp(-ga))).to(odt).to(tl.float32)          # F.silu rounds to the dtype
            tl.store(out_ptr + rows[:, None] * out_stride + row_a[None, :], (act * gb).to(odt),
                     mask=rmask[:, None] & ok_a[None, :])


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


def _fold_args(fold, placeholder):
    """The kernels' (s, s_stride, HS, row_eps, bias) for ``fold=(stream [N, HS], row_eps, bias or
    None)``, then (ROW_SCALE, HAS_BIAS, BLOCK_S); placeholders when there is no fold."""
    if fold is None:
        return (placeholder, 0, 1, 0.0, placeholder), dict(ROW_SCALE=False, HAS_BIAS=False, BLOCK_S=1)
    stream, row_eps, bias = fold
    return ((stream, stream.stride(0), stream.shape[1], row_eps, placeholder if bias is None else bias),
            dict(ROW_SCALE=True, HAS_BIAS=bias is not None, BLOCK_S=triton.next_power_of_2(stream.shape[1])))


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
              q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float, kv=None,
              fold=None):
    """q [N, Hq, D], k [N, Hkv, D] (heads may be strided) -> new contiguous (q, k); with
    ``kv=(v, k_cache, v_cache, slot_mapping)`` the rotated k and v also go to the caches; with
    ``fold=(stream [N, H], eps, bias [(Hq + 2 Hkv) D] or None)`` (needs kv) q, k and v are first
    each row's rsqrt(mean(stream^2) + eps) times themselves, plus the bias."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(N, Hkv, D, dtype=k.dtype, device=k.device)
    if fold is not None and kv is None:
        raise ValueError("rotary_qk: the folded row scale needs kv (v is scaled on its way to the cache)")
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
        fold_args, fold_flags = _fold_args(fold, cos_sin_cache)
        _rotary_qk_kernel[(N,)](q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), q_out, k_out,
                                cos_sin_cache, cos_sin_cache.stride(0), cos_sin_cache.shape[0], positions,
                                qw, kw, eps, Hq, Hkv, *kv_args, *fold_args, HALF=half,
                                BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
                                BLOCK_D=block_d, HAS_NORM=has_norm, WRITE_KV=kv is not None, **fold_flags,
                                num_warps=4)
    return q_out, k_out


def silu_mul(gate_up: torch.Tensor, fold=None) -> torch.Tensor:
    """gate_up [N, 2I] -> silu(gate) * up [N, I]; with ``fold=(stream [N, H], eps, bias [2I] or
    None)`` gate and up are first each row's rsqrt(mean(stream^2) + eps) times themselves, plus the bias."""
    N, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(N, inter, dtype=gate_up.dtype, device=gate_up.device)
    if N:
        block = min(1024, triton.next_power_of_2(inter))
        fold_args, fold_flags = _fold_args(fold, gate_up)
        _silu_mul_kernel[(N, triton.cdiv(inter, block))](gate_up, gate_up.stride(0), out, out.stride(0), inter,
                                                         *fold_args, BLOCK=block, **fold_flags,
                                                         num_warps=_warps(block))
    return out


def _dual_gemm_blocks(M: int, K: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K): row blocks of 16 up to 64 rows (tl.dot's smallest M is 16; a decode batch
    of B <= 64 is one row block, so each weight tile is read from DRAM once), K in chunks of 64."""
    return min(64, max(16, triton.next_power_of_2(M))), 64 if K >= 64 else max(16, triton.next_power_of_2(K))


# (BLOCK_M, BLOCK_K, num_stages, num_warps) forced for every launch (bench/decode_layer.py's sweep), or None
CONFIG_OVERRIDE: tuple[int, int, int, int] | None = None


def _norm_dual_gemm(x, residual, norm_weight, eps, weight, bias, out, grid_n, limits, block_n, rotary=None,
                    half: int = 0):
    """Launch ``_norm_dual_gemm_kernel``; returns the new residual (x itself when residual is None).
    limits = (LIMIT_A, OFFSET_B, LIMIT_B); rotary = (cos_sin_cache, positions, k_cache, v_cache,
    slot_mapping, HQ, HKV, q_norm_weight, k_norm_weight, qk_eps) for the QKV epilogue (norm weights
    None: no q/k norm), None for silu*mul."""
    M, K = x.shape
    res_out = x if residual is None else torch.empty(M, K, dtype=x.dtype, device=x.device)
    if M:
        bm, bk = _dual_gemm_blocks(M, K)
        stages, warps = 3, 4
        if CONFIG_OVERRIDE is not None:
            bm, bk, stages, warps = CONFIG_OVERRIDE
        r = x if residual is None else residual
        b = weight if bias is None else bias              # an unread placeholder without a bias
        qk_norm = rotary is not None and rotary[7] is not None
        if rotary is None:                                # unread placeholders of the rotary epilogue
            rot = (norm_weight, 0, 0, x, out, out, 0, 1, x, 0, 0, norm_weight, norm_weight, eps)
        else:
            cache, pos, kc, vc, slots, hq, hkv, qnw, knw, qk_eps = rotary
            if qnw is None:
                qnw = knw = norm_weight                   # unread placeholders
            rot = (cache, cache.stride(0), cache.shape[0], pos, kc, vc, kc.stride(0), kc.shape[1], slots, hq, hkv,
                   qnw, knw, qk_eps)
        _norm_dual_gemm_kernel[(triton.cdiv(M, bm), grid_n)](
            x, x.stride(0), r, r.stride(0), res_out, res_out.stride(0), norm_weight, eps,
            weight, weight.stride(0), b, M, K, *limits, out, out.stride(0), *rot,
            EPI_QKV=rotary is not None, HAS_QK_NORM=qk_norm, HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=bk, HALF=half or block_n, SPLIT=max(1, half // block_n),
            num_warps=warps, num_stages=stages,
            DOT_F32=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and weight.dtype == torch.bfloat16,
            IEEE=weight.dtype == torch.float32)
    return res_out


def norm_gate_up_silu(x, residual, norm_weight, eps, weight, bias):
    """x, residual [M, H]; weight [2I, H] (gate | up), bias [2I] or None -> (silu(gate) * up [M, I],
    new residual), the normed rows never stored."""
    M = x.shape[0]
    inter = weight.shape[0] // 2
    out = torch.empty(M, inter, dtype=weight.dtype, device=x.device)
    # every column tile reads all of x and residual (from L2): 32 columns (x2) while one row block
    # leaves the grid small (B <= 64: 152 programs for Qwen2.5-0.5B), 64 beyond (half the rereads)
    block_n = 32 if M <= 64 else 64
    res = _norm_dual_gemm(x, residual, norm_weight, eps, weight, bias, out, triton.cdiv(inter, block_n),
                          (inter, inter, 2 * inter), block_n)
    return out, res


def norm_qkv_rotary(x, residual, norm_weight, eps, weight, bias, num_heads, num_kv_heads, cos_sin_cache,
                    positions, k_cache, v_cache, slot_mapping, q_norm_weight=None, k_norm_weight=None,
                    qk_eps=1e-6):
    """x, residual [M, H]; weight [(Hq + 2 Hkv) D, H] (q | k | v) -> (q [M, Hq, D] rotated, new residual);
    k (rotated) and v go into the paged caches at slot_mapping (-1 skipped)."""
    M = x.shape[0]
    D = cos_sin_cache.shape[1]
    q = torch.empty(M, num_heads, D, dtype=weight.dtype, device=x.device)
    n_out = (num_heads + 2 * num_kv_heads) * D
    # a program per head while the grid has enough of them; for one row block (B <= 64: the weights'
    # bandwidth is the cost) heads split into 16-column slices of both halves, so that the 2 MB of
    # Qwen2.5-0.5B's QKV weights are read by 36 programs instead of 18 (not with a q/k norm, which
    # needs the whole head's sum of squares)
    block_n = D // 2
    if M <= 64 and q_norm_weight is None and block_n % 16 == 0:
        block_n = 16
    res = _norm_dual_gemm(x, residual, norm_weight, eps, weight, bias, q.view(M, num_heads * D),
                          (num_heads + 2 * num_kv_heads) * (D // 2 // block_n), (n_out, D // 2, n_out), block_n,
                          half=D // 2,
                          rotary=(cos_sin_cache, positions, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                                  q_norm_weight, k_norm_weight, qk_eps))
    return q, res
