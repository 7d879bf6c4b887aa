"""Triton kernels of ``ops.logprobs``: one pass over a row's logits instead of ~6-10 torch passes.

The torch path (``logprobs.py``, the reference and what the CPU runs) upcasts each row chunk of
logits to float32 and runs log-sum-exp, gather, exp, multiply and sum as separate kernels, each a
full read (and often a write) of a float32 [rows, V] tensor; on the PPO update of workload T that
was ~100 ms of elementwise work beside ~20 ms of LM-head GEMMs (session 12's trace). Here:

    row_stats(z, tokens, T, with_entropy) -> (logprobs, lse, entropy or None)    [N] float32 each
        one read of z [N, V] (any float dtype, rows may be strided): online max / sum-exp (and the
        sum of p * x for the entropy) per lane, combined at the end; x = z / T in float32.
    grad_logits_(z, tokens, lse, entropy, g_lp, g_ent, T)                         in place
        z <- dL/dz rounded to z's dtype, from the saved per-row lse (and entropy):
        -p * ((logp + H) * g_ent + g_lp) / T, plus g_lp / T at the token: one read, one write.

A token outside [0, V) gives a NaN log-prob (the trainer's finiteness checks name it) rather than
an out-of-bounds read.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["row_stats", "grad_logits_", "available"]

_BLOCK = 2048


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _row_stats_kernel(z_ptr, stride, tok_ptr, lp_ptr, lse_ptr, ent_ptr, V, temp,
                          HAS_TOK: tl.constexpr, WITH_ENT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        ninf = float("-inf")
        m = tl.full([BLOCK], ninf, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            ok = c < V
            x = tl.load(base + c, mask=ok, other=ninf).to(tl.float32) / temp
            m_new = tl.maximum(m, x)
            safe = tl.where(m_new == ninf, 0.0, m_new)
            a = tl.exp(m - safe)
            e = tl.exp(x - safe)
            s = s * a + e
            if WITH_ENT:
                t = t * a + tl.where(e > 0, e * x, 0.0)
            m = m_new
        mx = tl.max(m, 0)
        w = tl.exp(m - mx)
        S = tl.sum(s * w, 0)
        lse = mx + tl.log(S)
        tl.store(lse_ptr + row, lse)
        if HAS_TOK:
            tok = tl.load(tok_ptr + row).to(tl.int64)
            tok_ok = (tok >= 0) & (tok < V)
            xt = tl.load(base + tl.where(tok_ok, tok, 0)).to(tl.float32) / temp
            tl.store(lp_ptr + row, tl.where(tok_ok, xt - lse, float("nan")))
        if WITH_ENT:
            tl.store(ent_ptr + row, lse - tl.sum(t * w, 0) / S)

    @triton.jit
    def _grad_logits_kernel(z_ptr, stride, tok_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, V, temp,
                            HAS_LP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        lse = tl.load(lse_ptr + row)
        tok = tl.load(tok_ptr + row).to(tl.int64)
        glp = 0.0
        if HAS_LP:
            glp = tl.load(glp_ptr + row) / temp
        gent = 0.0
        h = 0.0
        if HAS_ENT:
            gent = tl.load(gent_ptr + row) / temp
            h = tl.load(ent_ptr + row)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            ok = c < V
            x = tl.load(base + c, mask=ok, other=0.0).to(tl.float32) / temp
            logp = x - lse
            p = tl.exp(logp)
            if HAS_ENT:
                gz = -(p * ((logp + h) * gent + glp))
            else:
                gz = -(p * glp)
            if HAS_LP:
                gz = tl.where(c == tok, gz + glp, gz)
            tl.store(base + c, gz.to(z_ptr.dtype.element_ty), mask=ok)


def _check(z: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("logprobs_triton: triton is not importable")
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with unit column stride, got shape {tuple(z.shape)} "
                         f"strides {z.stride()}")


def row_stats(z: torch.Tensor, tokens: torch.Tensor | None, temperature: float, with_entropy: bool,
              out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None):
    """(log p(tokens) or None, lse, entropy or None), float32 [N], of softmax(z / temperature).

    ``out`` = (lp, lse, ent) float32 [N] tensors (contiguous, e.g. slices of larger ones) to fill."""
    _check(z)
    N, V = z.shape
    if out is None:
        f32 = dict(dtype=torch.float32, device=z.device)
        out = (torch.empty(N, **f32) if tokens is not None else None, torch.empty(N, **f32),
               torch.empty(N, **f32) if with_entropy else None)
    lp, lse, ent = out
    if N:
        dummy = lse
        _row_stats_kernel[(N,)](z, z.stride(0), tokens if tokens is not None else dummy,
                                lp if lp is not None else dummy, lse, ent if ent is not None else dummy,
                                V, float(temperature), HAS_TOK=tokens is not None, WITH_ENT=bool(with_entropy),
                                BLOCK=_BLOCK, num_warps=8)
    return lp, lse, ent


def grad_logits_(z: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor | None,
                 g_lp: torch.Tensor | None, g_ent: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """z [N, V] (the recomputed logits, unscaled) overwritten by the gradient of
    sum(g_lp * logprobs + g_ent * entropy) w.r.t. z, in z's dtype; returns z."""
    _check(z)
    if g_ent is not None and ent is None:
        raise ValueError("grad_logits_: the entropy's gradient needs the saved entropy")
    N, V = z.shape
    if N:
        dummy = lse
        _grad_logits_kernel[(N,)](z, z.stride(0), tokens, lse, ent if ent is not None else dummy,
                                  g_lp if g_lp is not None else dummy, g_ent if g_ent is not None else dummy,
                                  V, float(temperature), HAS_LP=g_lp is not None, HAS_ENT=g_ent is not None,
                                  BLOCK=_BLOCK, num_warps=8)
    return z
