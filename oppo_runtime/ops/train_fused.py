"""Fused ops of the training path (autograd): RMSNorm and silu(gate) * up, forward and backward.

The training forward ran these as chains of torch ops (RMSNorm: upcast, square, mean, rsqrt,
multiply, cast, scale; about twice as many kernels in backward), each a full pass over the
activations: memory-bound work that on the PPO-step workloads rivals the GEMMs. Here each is one
Triton kernel forward and one backward (plus a column sum for the norm's weight gradient).

    rms_norm_train(x, weight, eps)   == norm_rope.rms_norm (the reference, and the CPU path)
    silu_mul_train(gate, up)         == F.silu(gate) * up

Same dispatch as ``fused`` (``fused._choose``: Triton on CUDA tensors, the reference elsewhere,
``backend=`` / ``OPPO_OP_BACKEND`` to force, logged once per op). The forward rounds where the
reference rounds (the normalised row is cast to x's dtype before the weight multiplies it; silu is
rounded before the product), so forward results equal the reference's up to the last bit of the
fp32 arithmetic; gradients are computed in fp32 and rounded once.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._backend import sm_count
from .fused import _choose
from .norm_rope import rms_norm

__all__ = ["rms_norm_train", "silu_mul_train", "silu_mul_ref"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
        c = (xf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (w * c).to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, N, H, rows_per_prog, BLOCK: tl.constexpr):
        """Rows [pid*rows_per_prog, ...): dx per row; this program's share of dw to dw_ptr[pid]."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_prog
        for r in range(0, rows_per_prog):
            row = start + r
            if row < N:
                x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)
                xf = x.to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                xhat = xf * rstd
                c = xhat.to(x.dtype).to(tl.float32)
                dy = tl.load(dy_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
                dw += dy * c
                g = dy * w
                dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / H))
                tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=ok)

    @triton.jit
    def _silu_mul_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(g_ptr + offs, mask=ok, other=0.0)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(y_ptr + offs, (s * u).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gf = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gf))
        tl.store(du_ptr + offs, (dy * gf * sig).to(du_ptr.dtype.element_ty), mask=ok)
        tl.store(dg_ptr + offs, (dy * u * sig * (1.0 + gf * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _programs(device: torch.device) -> int:
    return 4 * sm_count(device) if device.type == "cuda" else 4


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        shape, H = x.shape, x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()
        N = x2.shape[0]
        y = torch.empty(N, H, dtype=torch.result_type(weight, x), device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(H)
        if N:
            _rms_fwd[(N,)](x2, weight.contiguous(), y, rstd, H, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, H = x2.shape
        dy2 = dy.reshape(N, H).contiguous()
        dx = torch.empty_like(x2)
        P = max(1, min(_programs(x2.device), N))
        rows = -(-N // P) if N else 1
        P = -(-N // rows) if N else 1
        dw_part = torch.zeros(P, H, dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(H)
        if N:
            _rms_bwd[(P,)](dy2, x2, weight.contiguous(), rstd, dx, dw_part, N, H, rows, BLOCK=block,
                           num_warps=_warps(block))
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=torch.result_type(g, u), device=g.device)
        n = g.numel()
        if n:
            _silu_mul_fwd[(triton.cdiv(n, 2048),)](g, u, y, n, BLOCK=2048, num_warps=8)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _silu_mul_bwd[(triton.cdiv(n, 2048),)](dy, g, u, dg, du, n, BLOCK=2048, num_warps=8)
        return dg, du


def _off() -> bool:
    """OPPO_TRAIN_FUSED=0: the torch references on CUDA too (A/B timing, triage)."""
    return os.environ.get("OPPO_TRAIN_FUSED", "1") == "0"


def rms_norm_train(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm with autograd: one Triton kernel each way on CUDA, ``norm_rope.rms_norm`` elsewhere."""
    if triton is None or _off() or _choose("rms_norm_train", (x, weight), backend) == "reference":
        return rms_norm(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps))


def silu_mul_train(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up with autograd: one Triton kernel each way on CUDA, the torch ops elsewhere."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul_train: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if triton is None or _off() or _choose("silu_mul_train", (gate, up), backend) == "reference":
        return silu_mul_ref(gate, up)
    return _SiluMul.apply(gate, up)
