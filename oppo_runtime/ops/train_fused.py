"""Fused ops of the training path (autograd): RMSNorm, silu(gate) * up and rotary, forward and backward.

The training forward ran these as chains of torch ops (RMSNorm: upcast, square, mean, rsqrt,
multiply, cast, scale; about twice as many kernels in backward), each a full pass over the
activations: memory-bound work that on the PPO-step workloads rivals the GEMMs. Here each is one
Triton kernel forward and one backward (plus a column sum for the norm's weight gradient).

    rms_norm_train(x, weight, eps)   == norm_rope.rms_norm (the reference, and the CPU path)
    silu_mul_train(gate, up)         == F.silu(gate) * up
    rotary_train(q, k, cos, sin)     == (norm_rope.apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))

rotary_train replaces ~7 torch kernels per tensor each way (a cast of cos and of sin, a negation, a
concatenation, two products and a sum) by one launch for q and k together; it computes in float32
and rounds once (the reference rounds cos/sin and each product to the input dtype: results agree
to about one unit in the last place of bf16). Its backward is the same kernel with sin negated.

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
from .norm_rope import apply_rotary, rms_norm

__all__ = ["rms_norm_train", "silu_mul_train", "silu_mul_ref", "rotary_train", "rotary_train_ref"]

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

    @triton.jit
    def _rope_rows(src, dst, n, s_n, s_h, H, c, s, SIGN: tl.constexpr, HALF: tl.constexpr,
                   BH: tl.constexpr, BD: tl.constexpr):
        """Rotate the H heads of token n of src [N, H, 2*HALF] (strides s_n, s_h, 1) into dst
        (contiguous): y1 = x1 c - SIGN x2 s, y2 = x2 c + SIGN x1 s, in float32."""
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BD)[None, :]
        ok = (h < H) & (d < HALF)
        a = src + n * s_n + h * s_h + d
        x1 = tl.load(a, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(a + HALF, mask=ok, other=0.0).to(tl.float32)
        o = dst + n * (H * 2 * HALF) + h * (2 * HALF) + d
        tl.store(o, (x1 * c - SIGN * x2 * s).to(dst.dtype.element_ty), mask=ok)
        tl.store(o + HALF, (x2 * c + SIGN * x1 * s).to(dst.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_qk(q, k, cos, sin, qo, ko, q_sn, q_sh, k_sn, k_sh, cs_sn, HQ, HK, SIGN: tl.constexpr,
                 HALF: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BD)[None, :]
        c = tl.load(cos + n * cs_sn + d, mask=d < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin + n * cs_sn + d, mask=d < HALF, other=0.0).to(tl.float32)
        _rope_rows(q, qo, n, q_sn, q_sh, HQ, c, s, SIGN, HALF, BHQ, BD)
        _rope_rows(k, ko, n, k_sn, k_sh, HK, c, s, SIGN, HALF, BHK, BD)


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


def _rope_launch(q, k, cos, sin, sign: int):
    N, HQ, D = q.shape
    HK = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if N:
        half = D // 2
        _rope_qk[(N,)](q, k, cos, sin, qo, ko, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
                       HQ, HK, SIGN=sign, HALF=half, BHQ=triton.next_power_of_2(HQ), BHK=triton.next_power_of_2(HK),
                       BD=triton.next_power_of_2(half), num_warps=4)
    return qo, ko


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, 1)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # the rotation's transpose is the rotation by -angle (autograd materializes an unused
        # output's gradient as zeros: the default set_materialize_grads(True))
        dq, dk = _rope_launch(_unit_last(dq), _unit_last(dk), cos, sin, -1)
        return dq, dk, None, None


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary_train_ref(q, k, cos, sin):
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


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


def rotary_train(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (half-split layout) of q [N, Hq, D] and k [N, Hk, D] with cos/sin [N, D] (float32, the
    two halves equal, as ``rotary_cos_sin`` gives them), with autograd to q and k: one Triton kernel
    each way on CUDA, ``apply_rotary`` elsewhere."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(f"rotary_train: need q [N, Hq, D] and k [N, Hk, D] with D even, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if cos.shape != (q.shape[0], q.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"rotary_train: need cos/sin [{q.shape[0]}, {q.shape[2]}], got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if triton is None or _off() or _choose("rotary_train", (q, k), backend) == "reference":
        return rotary_train_ref(q, k, cos, sin)
    return _Rotary.apply(_unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin))
