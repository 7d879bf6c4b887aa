"""Triton kernel of the decode projections (``ops.gemm`` is its Python face and reference).

    _splitk_linear_kernel  (output tile, K split) per program: out = x @ W^T (+ bias) (+ residual);
                           DUAL (gate_up): two accumulators, W's rows n and DUAL_OFF + n, and the
                           epilogue silu(gate) * up (the silu*mul kernel folded in)

Why: at a decode batch of M = 256 rows the projections of a small model (Qwen2.5-0.5B: qkv 896 ->
1152, o_proj 896 -> 896, down 4864 -> 896) give cuBLAS 14-36 output tiles of 128 x 128 on 132 SMs:
each CTA streams its whole K alone and the call takes 4.5-11 us for 1-4 us of bytes, warm or cold
(bench/results/linear_probe*_h100.json). Splitting K gives every SM a share of the weights. The
partial sums of a tile's splits meet in a float32 workspace: each split stores its partial, draws a
ticket from the tile's counter, and the split that draws the last ticket adds the partials in split
order (0, 1, ..): the result does not depend on which split finished last (deterministic), the
counter is set back to zero by that split, and nothing else is launched (capturable in a CUDA graph
with the workspace given by the caller).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

__all__ = ["available", "splitk_linear_launch"]


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _splitk_linear_kernel(a_ptr, a_stride, w_ptr, w_stride, b_ptr, r_ptr, r_stride, out_ptr, out_stride,
                              part_ptr, cnt_ptr, M, N, K, K_SPLIT, DUAL_OFF,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              SPLIT: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              HAS_RES: tl.constexpr, DUAL: tl.constexpr, DOT_F32: tl.constexpr):
        # a [M, K] (row stride a_stride), w [N, K] (row stride w_stride), out / r [M, N]; part float32
        # [SPLIT, M, N] (contiguous), cnt int32 [tiles] (zero on entry, zero again on exit).
        # Program (tile, split): tile = pn * tiles_m + pm, so the row blocks that read the same weight
        # columns run side by side (the second read of a weight tile finds it in L2); split s covers
        # K columns [s * K_SPLIT, min((s + 1) * K_SPLIT, K)), K_SPLIT a multiple of BLOCK_K.
        # DUAL: w [2 N, K] (gate | up, DUAL_OFF = N), part [SPLIT, 2, M, N], out = silu(gate) * up [M, N]
        # rounded as the silu*mul kernel does (gate, up, then silu, to the dtype first).
        tile = tl.program_id(0)
        split = tl.program_id(1)
        tiles_m = tl.cdiv(M, BLOCK_M)
        pm = tile % tiles_m
        pn = tile // tiles_m
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        k0 = split * K_SPLIT
        k_end = tl.minimum(k0 + K_SPLIT, K)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * a_stride + (k0 + rk)[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * w_stride + (k0 + rk)[None, :]
        w2_ptrs = w_ptrs + DUAL_OFF * w_stride
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M if DUAL else 1, BLOCK_N if DUAL else 1], dtype=tl.float32)
        for k in range(k0, k_end, BLOCK_K):
            if EVEN_K:
                a_ok = m_ok[:, None]
                w_ok = n_ok[:, None]
            else:
                k_ok = (k + rk) < k_end
                a_ok = m_ok[:, None] & k_ok[None, :]
                w_ok = n_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptrs, mask=a_ok, other=0.0)
            w = tl.load(w_ptrs, mask=w_ok, other=0.0)
            if DOT_F32:       # the interpreter's dot on bfloat16 (numpy has none): the same products in float32
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc)
            if DUAL:
                w2 = tl.load(w2_ptrs, mask=w_ok, other=0.0)
                if DOT_F32:
                    w2 = w2.to(tl.float32)
                acc2 = tl.dot(a, tl.trans(w2), acc2)
                w2_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        mask = m_ok[:, None] & n_ok[None, :]
        last = True
        if SPLIT > 1:
            mn = rm.to(tl.int64)[:, None] * N + rn[None, :]
            parts = 2 if DUAL else 1
            tl.store(part_ptr + split * parts * M * N + mn, acc, mask=mask)
            if DUAL:
                tl.store(part_ptr + (split * 2 + 1) * M * N + mn, acc2, mask=mask)
            tl.debug_barrier()                    # every thread's partial stored before the ticket's release
            ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            last = ticket == SPLIT - 1
            if last:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in tl.static_range(SPLIT):  # split order, whichever split is last: deterministic
                    acc += tl.load(part_ptr + s * parts * M * N + mn, mask=mask, other=0.0, cache_modifier=".cg")
                if DUAL:
                    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    for s in tl.static_range(SPLIT):
                        acc2 += tl.load(part_ptr + (s * 2 + 1) * M * N + mn, mask=mask, other=0.0,
                                        cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + tile, 0)  # the counter back at zero for the next call
        if last:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                if DUAL:
                    acc2 += tl.load(b_ptr + DUAL_OFF + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if DUAL:
                dt = out_ptr.dtype.element_ty
                g = acc.to(dt).to(tl.float32)
                u = acc2.to(dt).to(tl.float32)
                acc = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
            if HAS_RES:
                acc += tl.load(r_ptr + rm.to(tl.int64)[:, None] * r_stride + rn[None, :], mask=mask,
                               other=0.0).to(tl.float32)
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * out_stride + rn[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_linear_launch(x: torch.Tensor, weight: torch.Tensor, bias, residual, out: torch.Tensor,
                         part: torch.Tensor, counters: torch.Tensor, config: tuple[int, int, int, int, int, int],
                         dot_f32: bool, dual: bool = False) -> None:
    """Launch the kernel: x [M, K] and weight [N, K] (unit stride along K), out [M, N] (unit column
    stride; may be ``residual`` itself); part float32 (>= splits * M * N), counters int32 zeros
    (>= tiles); config (BLOCK_M, BLOCK_N, BLOCK_K, K_SPLIT, num_warps, num_stages). ``dual``: weight
    [2N, K] (gate | up), out = silu(gate) * up [M, N], part >= 2 * splits * M * N."""
    M, K = x.shape
    N = weight.shape[0] // 2 if dual else weight.shape[0]
    bm, bn, bk, k_split, warps, stages = config
    splits = triton.cdiv(K, k_split)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    r = out if residual is None else residual
    _splitk_linear_kernel[(tiles, splits)](
        x, x.stride(0), weight, weight.stride(0), weight if bias is None else bias, r, r.stride(0),
        out, out.stride(0), part, counters, M, N, K, k_split, N if dual else 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=splits, EVEN_K=K % bk == 0 and k_split % bk == 0,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, DUAL=dual, DOT_F32=dot_f32,
        num_warps=warps, num_stages=stages)
