"""Paged chunk-prefill attention in Triton (the second GPU backend of ``paged_prefill_attention``).

Same semantics as ``attention.paged_prefill_attention_ref``: q [Nq, Hq, D] packed by
``cu_seqlens_q`` [B+1]; ``context_lens`` [B] counts prefix + chunk (the chunk's K/V already in the
pages); query i of sequence b sits at position ``context_lens[b] - n_b + i`` and sees keys
0..that position (bottom-right causal); GQA with G = Hq / Hkv.

Design (for sm_90, where ``tl.dot`` lowers to wgmma):
- program = (a BLOCK_M tile of rows of one sequence, one KV head); a row is (query, head of the
  GQA group), query-major, so the G heads sharing a KV head share every K/V tile it loads and a
  128-row tile spans only 128 / G queries (a narrow causal diagonal);
- K/V tiles of BLOCK_N tokens gathered through the block table: when BLOCK_N divides the page
  size a tile lies inside one page (one scalar block-table load per tile); otherwise each token's
  page comes from its own (L1-cached) block-table entry. Offsets in int64 (pools > 2^31 elements).
  The K/V loads depend on a block-table load ("indirect" loads): Triton pipelines those only with
  num_stages >= 3, so every config has at least 3 stages;
- online softmax in fp32 with exp2, the scale folded into log2(e); fp32 accumulation; P cast to
  the input dtype for P@V (FlashAttention's numerics);
- the key range is split into the part every row of the tile sees in full (no mask at all) and
  the diagonal tail (causal mask and load masks), so only the last 1-3 tiles pay for masking;
- grid (row tiles from max_seqlen_q, B, Hkv) with early exit of tiles past a sequence's chunk;
  the row-tile index runs backwards so the heaviest tiles (most keys) start first. No host sync
  when ``max_seqlen_q`` is given: CUDA-graph capturable once the autotuner has picked its config
  (call it once, eagerly, before capturing; the first call per key benchmarks the configs).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

__all__ = ["paged_prefill_attention", "available", "supports", "best_config"]

LOG2E = 1.4426950408889634
_DTYPES = (torch.bfloat16, torch.float16)


def available() -> bool:
    return triton is not None


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Input dtypes and head dims this kernel covers (tested: D 64 and 128)."""
    return dtype in _DTYPES and head_dim in (64, 128)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:
    @triton.jit
    def _attn_tiles(acc, l_i, m_i, q, k_head, v_head, bt_row, stride_kp, stride_kt, stride_vp, stride_vt,
                    qk_scale, qpos, lo, hi,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    DOT_F32: tl.constexpr):
        """Keys [lo, hi) in tiles of BLOCK_N (lo a multiple of BLOCK_N). MASKED: the diagonal tail."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for start in range(lo, hi, BLOCK_N):
            kpos = start + offs_n
            if PAGE % BLOCK_N == 0:      # the whole tile inside one page: one block-table entry
                page = tl.load(bt_row + start // PAGE).to(tl.int64)
                tok = start % PAGE + offs_n
            else:                        # a tile over several pages: each token's own entry
                if MASKED:
                    page = tl.load(bt_row + kpos // PAGE, mask=kpos < hi, other=0).to(tl.int64)
                else:
                    page = tl.load(bt_row + kpos // PAGE).to(tl.int64)
                tok = kpos % PAGE
            k_off = page * stride_kp + tok * stride_kt                       # [BLOCK_N] int64
            v_off = page * stride_vp + tok * stride_vt
            k_ptrs = k_head + k_off[:, None] + offs_d[None, :]
            v_ptrs = v_head + v_off[:, None] + offs_d[None, :]
            if MASKED:
                k = tl.load(k_ptrs, mask=(kpos < hi)[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
            if DOT_F32:   # the interpreter's dot multiplies bf16 bit patterns: operands in fp32
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k))                                       # [BLOCK_M, BLOCK_N] fp32
            if MASKED:
                s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if MASKED:   # pages past the context may hold NaN: P = 0 there must not meet them
                v = tl.load(v_ptrs, mask=(kpos < hi)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs)
            if DOT_F32:
                acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _prefill_kernel(Q, K, V, O, CU, CTX, BT,
                        stride_qn, stride_qh, stride_kp, stride_kt, stride_vp, stride_vt,
                        stride_on, stride_oh, stride_bt, qk_scale,
                        G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr = False):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)      # heaviest tiles (most keys) first
        b = tl.program_id(1)
        kvh = tl.program_id(2)
        q_start = tl.load(CU + b)
        n = tl.load(CU + b + 1) - q_start
        row0 = pid_m * BLOCK_M
        if row0 >= n * G:
            return
        L = tl.load(CTX + b)

        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_loc = offs_m // G                                     # rows = (query, head of the group)
        head = kvh * G + offs_m % G
        row_ok = offs_m < n * G
        qpos = L - n + q_loc
        q_row = (q_start + q_loc).to(tl.int64)
        q = tl.load(Q + q_row[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        first = L - n + row0 // G                               # position of the tile's first query
        last = L - n + (tl.minimum(row0 + BLOCK_M, n * G) - 1) // G
        full_end = ((first + 1) // BLOCK_N) * BLOCK_N           # keys every row of the tile sees
        hi = last + 1

        bt_row = BT + b.to(tl.int64) * stride_bt
        k_head = K + kvh * HEAD_DIM                             # a page is contiguous [PAGE, Hkv, D]
        v_head = V + kvh * HEAD_DIM
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_head, v_head, bt_row, stride_kp, stride_kt,
                                    stride_vp, stride_vt, qk_scale, qpos, 0, full_end,
                                    HEAD_DIM, PAGE, BLOCK_N, False, DOT_F32)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_head, v_head, bt_row, stride_kp, stride_kt,
                                    stride_vp, stride_vt, qk_scale, qpos, full_end, hi,
                                    HEAD_DIM, PAGE, BLOCK_N, True, DOT_F32)
        o = acc / l_i[:, None]
        tl.store(O + q_row[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok[:, None])

    def _prune(configs, named_args, **kwargs):
        D = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs["HEAD_DIM"]
        keep = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            smem = 3 * bn * D * 2 * 2 + bm * D * 2                     # K and V buffers + Q (bytes)
            if smem > 200 * 1024:
                continue
            if D >= 128 and c.num_warps < 8:   # 128 rows x D=128 on one warpgroup spills (ptxas, sm_90a)
                continue
            keep.append(c)
        return keep or configs[:1]

    # Short on purpose (each config compiles once per key). ptxas for sm_90a (Triton 3.8, no GPU
    # needed): D=128 BN=64 w8 181 regs, BN=128 w8 254 regs, w4 spills; D=64 BN=64 w8 128 regs
    # (2 CTAs/SM), BN=64 w4 238, BN=128 w8 227; none spill. >= 3 stages (module docstring).
    _CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    ]
    _prefill_kernel_tuned = triton.autotune(configs=_CONFIGS, key=["G", "HEAD_DIM", "PAGE"],
                                            prune_configs_by={"early_config_prune": _prune})(_prefill_kernel)


def best_config() -> dict:
    """The autotuner's choice per key so far (for the benchmark's record)."""
    if triton is None:
        return {}
    cache = getattr(_prefill_kernel_tuned, "cache", {}) or {}
    return {str(k): str(v) for k, v in cache.items()}


def _i32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 else x.to(torch.int32)


def paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale: float,
                            out: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                            config: tuple[int, int] | None = None, num_warps: int = 4, num_stages: int = 3):
    """Triton paged chunk prefill; shapes as ``attention.paged_prefill_attention``. Writes ``out``
    (any float dtype, e.g. float32 for bf16 inputs) and returns it.

    ``config`` = (BLOCK_M, BLOCK_N) bypasses the autotuner (tests; always used by the interpreter).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    Nq, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    if Dk != D or Hq % Hkv or D & (D - 1):
        raise ValueError(f"prefill_triton: q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)} "
                         "(head dims equal, Hq a multiple of Hkv, head_dim a power of two)")
    for c in (k_cache, v_cache):
        if c.stride()[1:] != (Hkv * D, D, 1):
            raise ValueError("prefill_triton: each page of the cache must be contiguous [block_size, Hkv, D]")
    G = Hq // Hkv
    B = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if q.stride(-1) != 1:
        q = q.contiguous()
    dst = out if out.stride(-1) == 1 else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if max_seqlen_q is None:  # a host sync: callers that capture graphs pass it
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
    if B == 0 or Nq == 0 or max_seqlen_q <= 0:
        return out
    cu = _i32(cu_seqlens_q).contiguous()
    ctx = _i32(context_lens).contiguous()
    bt = _i32(block_tables)
    if bt.stride(-1) != 1:
        bt = bt.contiguous()
    args = (q, k_cache, v_cache, dst, cu, ctx, bt,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            dst.stride(0), dst.stride(1), bt.stride(0), float(scale) * LOG2E)
    if config is None and _interpreting():
        config = (128, 64)
    if config is None and os.environ.get("OPPO_TRITON_AUTOTUNE", "1") == "0":
        # no autotuning (tests: each key would compile every config): the config ptxas likes best
        config, num_warps, num_stages = (128, 64), (8 if D >= 128 else 4), 3
    if config is not None:
        bm, bn = config
        grid = (triton.cdiv(max_seqlen_q * G, bm), B, Hkv)
        _prefill_kernel[grid](*args, G=G, HEAD_DIM=D, PAGE=page, BLOCK_M=bm, BLOCK_N=bn,
                              DOT_F32=_interpreting() and q.dtype == torch.bfloat16,
                              num_warps=num_warps, num_stages=num_stages)
    else:
        def grid(meta):
            return (triton.cdiv(max_seqlen_q * G, meta["BLOCK_M"]), B, Hkv)
        _prefill_kernel_tuned[grid](*args, G=G, HEAD_DIM=D, PAGE=page)
    if dst is not out:
        out.copy_(dst)
    return out

