"""Fused ops of the inference path (no autograd): add+RMSNorm, rotary on q and k, silu*mul.

Each op has a pure-torch reference with the same signature (what runs on the CPU, and the test
oracle) whose math is that of the unfused autograd code in ``norm_rope`` (bit-equal), and a
Triton kernel (``fused_triton``) for CUDA tensors. Dispatch is explicit and logged once per op
(``record_backend``): the kernel runs on CUDA tensors when Triton is importable; ``backend=``
(or env ``OPPO_OP_BACKEND``) 'reference' forces the reference, 'triton' (or 'cuda') forces the
kernel and raises if it cannot run (on CPU tensors it runs only under ``TRITON_INTERPRET=1``);
``OPPO_REQUIRE_KERNELS=1`` turns a missing kernel on a CUDA device into an error.

    fused_add_rms_norm(x, residual, weight, eps) -> (normed, x + residual)
    rotary_cos_sin_cache(inv_freq, max_positions, device) -> [max_positions, D] float32 (cos | sin)
    rotary_qk(q, k, cos_sin_cache, positions, q_norm_weight=None, k_norm_weight=None, eps=1e-6) -> (q, k)
    silu_mul(gate_up) -> silu(gate) * up
    gate_up_silu(x, w_gate_up) -> silu(x w_gate^T) * (x w_up^T): the GEMM and silu*mul as one CUDA
        kernel (sm_90a, batches of <= 256 rows; opt-in for decode steps: ``OPPO_DECODE_GATE_UP_SILU=1``)
    linear_ksplit(x, w) -> x w^T: clusters of 8 CTAs splitting K (sm_90a, <= 256 rows; opt-in for the
        decode steps' o_proj and down_proj: ``OPPO_DECODE_LINEAR_KSPLIT=1``)

Decode-layer GEMM fusion (opt-in: ``OPPO_DECODE_GEMM_FUSION=1``; see ``decode_gemm_fusion``): the
add+RMSNorm becomes the prologue of the projection that follows it, and the projection's epilogue
does what the next kernel did, so a decode layer is 5 launches instead of 9:

    norm_qkv_rotary(x, residual, norm_w, eps, w_qkv, b_qkv, Hq, Hkv, cos_sin_cache, positions,
                    k_cache, v_cache, slot_mapping) -> (q rotated, new residual); k, v to the pages
    norm_gate_up_silu(x, residual, norm_w, eps, w_gate_up, b_gate_up) -> (silu(gate) * up, new residual)

Decode-layer norm fold (opt-in: ``OPPO_DECODE_NORM_FOLD=1``; see ``decode_norm_fold``): each RMSNorm's
weight goes into the projection after it (``fold_norm_weight``), the projection reads the residual
stream itself, and the kernel after it applies each row's RMSNorm scale (and the bias):

    folded_qkv_rotary(raw, stream, eps, b_qkv, Hq, Hkv, cos_sin_cache, positions, k_cache, v_cache,
                      slot_mapping) -> q rotated; k, v to the pages
    folded_silu_mul(raw, stream, eps, b_gate_up) -> silu(gate) * up
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from ._backend import MissingKernelError, choose_backend, record_backend, sm90a_kernels
from .attention import kv_append, kv_append_ref
from .norm_rope import apply_rotary, rms_norm

__all__ = ["fused_add_rms_norm", "fused_add_rms_norm_ref", "rotary_cos_sin_cache", "rotary_qk", "rotary_qk_ref",
           "silu_mul", "silu_mul_ref", "gate_up_silu", "gate_up_silu_ref", "gate_up_silu_refuses",
           "decode_gate_up_silu", "linear_ksplit", "linear_ksplit_ref", "linear_ksplit_refuses",
           "decode_linear_ksplit", "decode_linear", "decode_gemm_fusion", "norm_qkv_rotary", "norm_qkv_rotary_ref",
           "qkv_kernel_refuses", "kv_append_refuses",
           "norm_gate_up_silu", "norm_gate_up_silu_ref", "decode_norm_fold", "fold_norm_weight",
           "folded_qkv_rotary", "folded_qkv_rotary_ref", "folded_silu_mul", "folded_silu_mul_ref"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # float64 keeps the reference


def _choose(op: str, tensors, backend: str | None) -> str:
    """'triton' or 'reference' for an op on ``tensors`` (the first one's device decides)."""
    requested = backend or os.environ.get("OPPO_OP_BACKEND") or "auto"
    if requested not in ("auto", "triton", "cuda", "reference"):
        raise ValueError(f"op {op}: unknown backend {requested!r} (auto|triton|cuda|reference)")
    device = tensors[0].device
    on_cuda = device.type == "cuda"
    wants_kernel = requested in ("triton", "cuda")
    if requested == "reference":
        chosen = "reference"
    elif any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        if wants_kernel:
            raise ValueError(f"op {op}: the Triton kernel takes float16/bfloat16/float32, got "
                             f"{sorted({str(t.dtype) for t in tensors})}")
        chosen = "reference"
    else:
        from . import fused_triton
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if fused_triton.available() and (on_cuda or (wants_kernel and interpreted)):
            chosen = "triton"
        elif wants_kernel or (on_cuda and os.environ.get("OPPO_REQUIRE_KERNELS") == "1"):
            why = ("triton is not importable" if not fused_triton.available()
                   else f"its inputs are on {device}, not on a CUDA device (set TRITON_INTERPRET=1 to interpret)")
            raise MissingKernelError(f"op {op}: Triton kernel requested but not available ({why})")
        else:
            chosen = "reference"
    record_backend(op, chosen)
    return chosen


# ----------------------------------------------------------------------------- a bench diagnostic
_SKIPPABLE = ("norm", "silu")


def diag_skip(op: str, tensor: torch.Tensor) -> bool:
    """``OPPO_DIAG_SKIP_ELEMENTWISE=norm,silu`` (or ``norm+silu``; a bench diagnostic for
    ``bench/engine.py --decode-env``): on CUDA tensors the named kernels are not launched and a
    stand-in costs nothing (add+RMSNorm returns its input, silu*mul the gate half as a view), so the
    engine's step says what the whole launch of each (its kernel and its gap in the graph) costs: the
    most that folding it into a GEMM could win (session 35, H100, B=256: -0.32 ms of 2.15).
    Every output is wrong; it warns once."""
    e = os.environ.get("OPPO_DIAG_SKIP_ELEMENTWISE", "")
    if not e or not tensor.is_cuda:
        return False
    names = {n.strip() for n in e.replace("+", ",").split(",") if n.strip()}
    if not names <= set(_SKIPPABLE):
        raise ValueError(f"OPPO_DIAG_SKIP_ELEMENTWISE takes a comma list of {_SKIPPABLE}, got {e!r}")
    _warn_diag_skip(e)
    return op in names


@functools.lru_cache(maxsize=None)
def _warn_diag_skip(value: str) -> None:
    warnings.warn(f"OPPO_DIAG_SKIP_ELEMENTWISE={value}: those kernels are skipped (a bench diagnostic); every "
                  "output is wrong", RuntimeWarning, stacklevel=4)
    record_backend("diag_skip_elementwise", value)


# ----------------------------------------------------------------------------- add + RMSNorm
def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual); the sum in the model dtype, as ``h = h + sublayer(h)``."""
    if residual is not None:
        x = residual + x
    return rms_norm(x, weight, eps), x


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       backend: str | None = None):
    """x, residual [..., H] -> (normed [..., H], new residual [..., H]).

    With ``residual=None`` it is plain ``rms_norm(x)`` and the new residual is ``x`` itself: the
    first layer starts the residual stream. One kernel, one row per program.
    """
    tensors = (x, weight) if residual is None else (x, residual, weight)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"fused_add_rms_norm: weight {tuple(weight.shape)} must be [{x.shape[-1]}]")
    if diag_skip("norm", x):
        return x, x if residual is None else residual
    if _choose("fused_add_rms_norm", tensors, backend) == "reference":
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    from . import fused_triton
    shape = x.shape
    rows = lambda t: t if t.dim() == 2 and t.stride(-1) == 1 else t.reshape(-1, shape[-1]).contiguous()  # noqa: E731
    normed, new_residual = fused_triton.add_rms_norm(rows(x), None if residual is None else rows(residual),
                                                     weight.contiguous(), eps)
    if residual is None:
        return normed.view(shape), x
    return normed.view(shape), new_residual.view(shape)


# ----------------------------------------------------------------------------- rotary
def rotary_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """[max_positions, D] float32: row p is cos(p * inv_freq) | sin(p * inv_freq).

    The same float32 math as ``rotary_cos_sin`` (positions.float() * inv_freq, then cos/sin), so
    gathering row p gives bit-for-bit the cos/sin that ``rotary_cos_sin`` computes for position p.
    """
    positions = torch.arange(max_positions, device=device)
    freqs = positions.float()[:, None] * inv_freq.to(device).float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def rotary_qk_ref(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                  q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6):
    """``apply_rotary`` of q and k (after Qwen3's per-head q_norm/k_norm, when given), cos/sin gathered."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions.long()]
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1)
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1)
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
              q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
              eps: float = 1e-6, backend: str | None = None, kv=None):
    """Half-split (NeoX / HF Llama) rotary of q [N, Hq, D] and k [N, Hkv, D] at ``positions`` [N].

    Returns new contiguous tensors (q and k may be strided views of a fused QKV output: each head
    row must be contiguous). ``cos_sin_cache`` from ``rotary_cos_sin_cache``; a position past its
    end gives NaN rows in the kernel (the reference raises). One kernel for q and k together.

    ``kv=(v, k_cache, v_cache, slot_mapping)``: also append the rotated k and v to the paged caches,
    exactly as ``attention.kv_append(k_rot, v, k_cache, v_cache, slot_mapping)`` (slot -1 skipped)
    -- in the same kernel on the Triton path (one launch per layer fewer in every decode step).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary_qk: q [N, Hq, D] and k [N, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if cos_sin_cache.shape[1] != q.shape[2] or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"rotary_qk: cos_sin_cache must be float32 [P, {q.shape[2]}], got "
                         f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rotary_qk: give both q_norm_weight and k_norm_weight, or neither")
    tensors = (q, k) if q_norm_weight is None else (q, k, q_norm_weight, k_norm_weight)
    if len({t.dtype for t in tensors}) > 1:
        if backend in ("triton", "cuda"):
            raise ValueError(f"rotary_qk: the Triton kernel takes one dtype, got {[str(t.dtype) for t in tensors]}")
        backend = "reference"     # mixed dtypes (autocast): the reference's promotion rules
    if kv is not None:
        v, k_cache, v_cache, slots = kv
        if v.shape != k.shape or slots.shape != (k.shape[0],) or k_cache.shape[2:] != k.shape[1:]:
            raise ValueError(f"rotary_qk: kv=(v {tuple(v.shape)}, k_cache {tuple(k_cache.shape)}, slots "
                             f"{tuple(slots.shape)}) does not match k {tuple(k.shape)}")
    if _choose("rotary_qk", tensors, backend) == "reference":
        q, k = rotary_qk_ref(q, k, cos_sin_cache, positions, q_norm_weight, k_norm_weight, eps)
        if kv is not None:
            kv_append(k, v, k_cache, v_cache, slots)
        return q, k
    from . import fused_triton
    q = q if q.stride(2) == 1 else q.contiguous()
    k = k if k.stride(2) == 1 else k.contiguous()
    # OPPO_FUSE_KV_APPEND=0: the separate kv_append kernel (A/B timing, triage)
    fuse = kv is not None and os.environ.get("OPPO_FUSE_KV_APPEND", "1") != "0" and _fusable_kv(k, v, k_cache, v_cache)
    if fuse:
        kv = (v if v.stride(2) == 1 else v.contiguous(), k_cache, v_cache, slots.contiguous())
    q, k = fused_triton.rotary_qk(q, k, cos_sin_cache.contiguous(), positions.contiguous(),
                                  q_norm_weight, k_norm_weight, eps, kv=kv if fuse else None)
    if kv is not None and not fuse:
        kv_append(k, v, k_cache, v_cache, slots)
    if kv is not None:
        record_backend("rotary_qk+kv_append", "one kernel" if fuse else "two kernels")
    return q, k


def _fusable_kv(k, v, k_cache, v_cache) -> bool:
    """The Triton rotary writes the caches itself when they share k's dtype and device and each page
    is one contiguous [block_size, Hkv, D] block at the same page stride for K and V."""
    D, Hkv = k.shape[2], k.shape[1]
    return (k_cache.dtype == v_cache.dtype == k.dtype and v.dtype == k.dtype and k_cache.device == k.device
            and k_cache.stride()[1:] == (Hkv * D, D, 1) and v_cache.stride() == k_cache.stride()
            and k_cache.shape == v_cache.shape)


# ----------------------------------------------------------------------------- silu * mul
def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate | up) -> silu(gate) * up [N, I], as ``F.silu(gate_proj(x)) * up_proj(x)``."""
    inter = gate_up.shape[-1] // 2
    # contiguous: the CPU's vectorised silu rounds a row's tail differently from its body, so the
    # gate must be laid out as gate_proj(x) is for bit-equal results
    return F.silu(gate_up[..., :inter].contiguous()) * gate_up[..., inter:]


def silu_mul(gate_up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """gate_up [..., 2I] -> [..., I]; one kernel."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dim must be even (gate | up), got {gate_up.shape[-1]}")
    if diag_skip("silu", gate_up):
        return gate_up[..., :gate_up.shape[-1] // 2]
    if _choose("silu_mul", (gate_up,), backend) == "reference":
        return silu_mul_ref(gate_up)
    from . import fused_triton
    shape = gate_up.shape
    rows = gate_up if gate_up.dim() == 2 and gate_up.stride(-1) == 1 else gate_up.reshape(-1, shape[-1]).contiguous()
    return fused_triton.silu_mul(rows).view(*shape[:-1], shape[-1] // 2)


# ----------------------------------------------------------------------------- gate_up GEMM + silu * mul
SMALL_M_MAX_ROWS = 256     # gate_up_silu and linear_ksplit hold the whole batch in each CTA


def decode_gate_up_silu() -> bool:
    """Whether decode steps run the MLP's gate_up GEMM and silu*mul as one kernel (``gate_up_silu``;
    env ``OPPO_DECODE_GATE_UP_SILU=1``, off by default until measured against cuBLAS + silu_mul).
    Read when a decode graph is captured (or per eager step)."""
    return os.environ.get("OPPO_DECODE_GATE_UP_SILU") == "1"


def _check_gate_up(op: str, x, weight) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] % 2:
        raise ValueError(f"{op}: x [M, K] and weight [2I, K] (gate | up), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")


def gate_up_silu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K], weight [2I, K] (gate rows, then up rows) -> silu(g) * u [M, I], g and u the float32
    products (not rounded to x's dtype in between, as the kernel's accumulators are not), rounded once."""
    _check_gate_up("gate_up_silu", x, weight)
    inter = weight.shape[0] // 2
    gu = F.linear(x.float(), weight.float())
    return (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)


def _small_m_refuses(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the sm_90a small-M GEMM kernels (gate_up_silu, linear_ksplit) cannot take x [M, K] and
    weight [*, K] (None: they can; on the CPU their references serve): at most 256 rows; on CUDA
    bf16/fp16, an sm_90a build and device, K a positive multiple of 8, 16-byte aligned contiguous rows."""
    if x.shape[0] > SMALL_M_MAX_ROWS:
        return f"{x.shape[0]} rows (at most {SMALL_M_MAX_ROWS})"
    if not x.is_cuda:
        return None
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return f"dtype {x.dtype} / {weight.dtype} (bf16 or fp16)"
    if not sm90a_kernels(x.device):
        return "no sm_90a kernels here (an sm_90 device and the extension built for 9.0a)"
    if (x.shape[1] % 8 or x.shape[1] == 0 or x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16
            or not weight.is_contiguous() or weight.data_ptr() % 16):
        return "operands not 16-byte aligned contiguous rows with K % 8 == 0"
    return None


def gate_up_silu_refuses(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """Why ``gate_up_silu`` cannot serve these operands on their device (None: it can; on the CPU its
    reference runs). The CUDA kernel: sm_90a, bf16/fp16, at most 256 rows, K a positive multiple of
    8, 16-byte aligned contiguous rows, no bias."""
    if bias is not None:
        return "a gate/up bias"
    return _small_m_refuses(x, weight)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) [M, I] for x [M, K] and the fused weight [2I, K] (gate | up):
    one CUDA kernel on CUDA tensors it can take (``gate_up_silu_refuses``; else the reference runs,
    logged with the reason, or with ``backend='cuda'`` a ValueError), the reference elsewhere.
    ``out``: [M, I] to write, else a new tensor."""
    _check_gate_up("gate_up_silu", x, weight)
    return _small_m_op("gate_up_silu", x, weight, out, weight.shape[0] // 2, gate_up_silu_refuses(x, weight),
                       gate_up_silu_ref, lambda o, a, b: torch.ops.oppo.gate_up_silu(o, a, b), backend)


def _small_m_op(op: str, x, weight, out, cols: int, why: str | None, ref, kernel, backend: str | None,
                out_align: int = 4) -> torch.Tensor:
    """The face the small-M GEMM ops share: ``out`` checked ([M, cols], x's dtype); on CUDA tensors
    the kernel (``kernel(out, x, weight)``) unless ``why`` (the operands it cannot take; an ``out``
    whose rows are not contiguous or ``out_align``-byte aligned is one), then the reference, logged
    with the reason, or with ``backend='cuda'`` a ValueError; the reference elsewhere."""
    if out is not None and (out.shape != (x.shape[0], cols) or out.dtype != x.dtype):
        raise ValueError(f"{op}: out must be [{x.shape[0]}, {cols}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if (why is None and out is not None and x.is_cuda
            and (out.stride(1) != 1 or (out.stride(0) * out.element_size()) % out_align or out.data_ptr() % out_align)):
        why = f"out's rows not contiguous and {out_align}-byte aligned"
    if why is not None and x.is_cuda and backend != "cuda":
        backend = "reference"
    if choose_backend(op, x.device, backend) == "reference":
        if why is not None and x.is_cuda:
            record_backend(op, f"reference ({why})")
        res = ref(x, weight)
        return res if out is None else out.copy_(res)
    if why is not None:
        raise ValueError(f"{op}: the CUDA kernel cannot take these operands ({why})")
    if out is None:
        out = torch.empty(x.shape[0], cols, dtype=x.dtype, device=x.device)
    kernel(out, x, weight)
    return out


# ----------------------------------------------------------------------------- linear, K split over a cluster
def decode_linear_ksplit() -> bool:
    """Whether decode steps run o_proj and down_proj through ``linear_ksplit`` (env
    ``OPPO_DECODE_LINEAR_KSPLIT=1``, off by default until measured against cuBLAS). Read when a decode
    graph is captured (or per eager step)."""
    return os.environ.get("OPPO_DECODE_LINEAR_KSPLIT") == "1"


def _check_linear(op: str, x, weight) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")


def linear_ksplit_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T with float32 sums, rounded once to x's dtype."""
    _check_linear("linear_ksplit", x, weight)
    return F.linear(x.float(), weight.float()).to(x.dtype)


def linear_ksplit_refuses(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """Why ``linear_ksplit`` cannot serve these operands on their device (None: it can; on the CPU its
    reference runs): ``gate_up_silu``'s conditions, N a multiple of 8, no bias."""
    if bias is not None:
        return "a bias"
    if x.is_cuda and weight.shape[0] % 8:
        return f"N = {weight.shape[0]} (a multiple of 8)"
    return _small_m_refuses(x, weight)


def linear_ksplit(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T for M <= 256 on the CUDA kernel (clusters of 8 CTAs split K, the
    partials summed through distributed shared memory: kernels/linear_ksplit.cuh) where it can take the
    operands (``linear_ksplit_refuses``; else the reference, logged with the reason, or with
    ``backend='cuda'`` a ValueError), the reference elsewhere. ``out``: [M, N] to write (16-byte
    aligned rows), else a new tensor."""
    _check_linear("linear_ksplit", x, weight)
    return _small_m_op("linear_ksplit", x, weight, out, weight.shape[0], linear_ksplit_refuses(x, weight),
                       linear_ksplit_ref, lambda o, a, b: torch.ops.oppo.linear_ksplit(o, a, b), backend,
                       out_align=16)


def decode_linear(lin, x: torch.Tensor, decode: bool) -> torch.Tensor:
    """``lin(x)`` (an nn.Linear), or in a decode step under ``OPPO_DECODE_LINEAR_KSPLIT=1`` the
    ``linear_ksplit`` kernel where it can take the operands (else logged why not)."""
    if decode and decode_linear_ksplit():
        why = linear_ksplit_refuses(x, lin.weight, lin.bias)
        if why is None:
            record_backend("decode_linear", "linear_ksplit")
            return linear_ksplit(x, lin.weight)
        record_backend("decode_linear", f"F.linear ({why})")
    return lin(x)


# ----------------------------------------------------------------------------- decode-layer GEMM fusion
def decode_gemm_fusion() -> bool:
    """Whether the model's decode steps run the fused norm+projection ops below (env
    ``OPPO_DECODE_GEMM_FUSION=1``; off by default until measured against cuBLAS + separate kernels).
    Read when a decode graph is captured (or per eager step)."""
    return os.environ.get("OPPO_DECODE_GEMM_FUSION") == "1"


def _check_norm_linear(op: str, x, residual, norm_weight, weight, bias) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: x [M, H] and weight [N, H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if norm_weight.shape != x.shape[1:]:
        raise ValueError(f"{op}: norm weight {tuple(norm_weight.shape)} must be [{x.shape[1]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must be [{weight.shape[0]}]")


def _kernel_takes(x, residual, weight, bias) -> str | None:
    """Why the dual-GEMM kernel cannot take these operands (None: it can)."""
    if len({t.dtype for t in (x, weight) + (() if residual is None else (residual,))}) > 1:
        return "mixed dtypes"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype}"
    if any(t is not None and t.stride(-1) != 1 for t in (x, residual, weight, bias)):
        return "an operand's rows are not contiguous"
    return None


def _use_kernel(op: str, x, weight, why: str | None, backend: str | None) -> bool:
    """Whether ``op`` runs its Triton kernel (else its reference). ``why``: the reason the kernel
    cannot take the operands, if any: then the reference runs (logged with the reason on CUDA), or,
    when the kernel was asked for by name, a ValueError says why."""
    if why is not None and backend not in ("triton", "cuda"):
        backend = "reference"
    if _choose(op, (x, weight), backend) == "reference":
        if why is not None and x.is_cuda:
            record_backend(op, f"reference ({why})")
        return False
    if why is not None:
        raise ValueError(f"{op}: the Triton kernel cannot take these operands ({why})")
    return True


def norm_gate_up_silu_ref(x, residual, norm_weight, eps, weight, bias=None):
    """(silu_mul(F.linear(rms_norm(x + residual), weight, bias)), x + residual): the unfused ops."""
    normed, res = fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    return silu_mul_ref(F.linear(normed, weight, bias)), res


def norm_gate_up_silu(x, residual, norm_weight, eps, weight, bias=None, backend: str | None = None):
    """x, residual [M, H] (residual None: x starts the stream), weight [2I, H] (gate | up) ->
    (silu(gate) * up [M, I], new residual [M, H]); one kernel on the Triton path."""
    _check_norm_linear("norm_gate_up_silu", x, residual, norm_weight, weight, bias)
    if weight.shape[0] % 2:
        raise ValueError(f"norm_gate_up_silu: weight rows must be even (gate | up), got {weight.shape[0]}")
    if not _use_kernel("norm_gate_up_silu", x, weight, _kernel_takes(x, residual, weight, bias), backend):
        return norm_gate_up_silu_ref(x, residual, norm_weight, eps, weight, bias)
    from . import fused_triton
    return fused_triton.norm_gate_up_silu(x, residual, norm_weight, eps, weight, bias)


def qkv_kernel_refuses(dtype: torch.dtype, head_dim: int, num_kv_heads: int, k_cache, v_cache) -> str | None:
    """Why the fused QKV kernel cannot serve this attention layer (None: it can): the head dim (a
    power of two from 32: a rotary half is one dot tile) and the caches (the model's dtype, each
    page one contiguous [block_size, Hkv, D] block)."""
    D = head_dim
    if D < 32 or D & (D - 1):
        return f"head_dim {D} (the kernel takes powers of two from 32: a rotary half is one dot tile)"
    return kv_append_refuses(dtype, num_kv_heads, D, k_cache, v_cache)


def kv_append_refuses(dtype: torch.dtype, num_kv_heads: int, head_dim: int, k_cache, v_cache) -> str | None:
    """Why a kernel that appends k and v of ``dtype`` cannot write these caches itself (None: it can):
    they must be of that dtype, each page one contiguous [block_size, Hkv, D] block (``_fusable_kv``)."""
    k = torch.empty(0, num_kv_heads, head_dim, dtype=dtype, device=k_cache.device)
    if k_cache.dtype != dtype or not _fusable_kv(k, k, k_cache, v_cache):
        return "the caches' layout or dtype"
    return None


def _check_qkv_rotary(op: str, what: str, width: int, M: int, num_heads: int, num_kv_heads: int, cos_sin_cache,
                      positions, k_cache, slot_mapping, q_norm_weight, k_norm_weight) -> int:
    """The QKV-then-rotary ops' shared checks (``what``: the weight's rows or the projection's
    columns, ``width`` of them, q | k | v, for M tokens); returns the head dim."""
    D = cos_sin_cache.shape[1]
    if width != (num_heads + 2 * num_kv_heads) * D or D % 2:
        raise ValueError(f"{op}: {what} must hold {(num_heads + 2 * num_kv_heads) * D} (q | k | v) for {num_heads} "
                         f"q and {num_kv_heads} kv heads of dim {D}, got {width}")
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"{op}: cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    if (q_norm_weight is None) != (k_norm_weight is None) or \
            any(w is not None and w.shape != (D,) for w in (q_norm_weight, k_norm_weight)):
        raise ValueError(f"{op}: q_norm_weight and k_norm_weight [{D}] together, or neither")
    if k_cache.shape[2:] != (num_kv_heads, D) or slot_mapping.shape != (M,) or positions.shape != (M,):
        raise ValueError(f"{op}: caches [pages, block_size, {num_kv_heads}, {D}] and positions / slot_mapping "
                         f"[{M}], got {tuple(k_cache.shape)}, {tuple(positions.shape)}, {tuple(slot_mapping.shape)}")
    return D


def norm_qkv_rotary_ref(x, residual, norm_weight, eps, weight, bias, num_heads, num_kv_heads, cos_sin_cache,
                        positions, k_cache, v_cache, slot_mapping, q_norm_weight=None, k_norm_weight=None,
                        qk_eps: float = 1e-6):
    """The unfused ops: add+RMSNorm, the QKV projection, (q/k norm and) rotary of q and k, K/V
    appended to the pages."""
    normed, res = fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    n, D = x.shape[0], cos_sin_cache.shape[1]
    q, k, v = F.linear(normed, weight, bias).split([num_heads * D, num_kv_heads * D, num_kv_heads * D], -1)
    q, k = rotary_qk_ref(q.view(n, num_heads, D), k.view(n, num_kv_heads, D), cos_sin_cache, positions,
                         q_norm_weight, k_norm_weight, qk_eps)
    kv_append_ref(k, v.reshape(n, num_kv_heads, D), k_cache, v_cache, slot_mapping)
    return q, res


def norm_qkv_rotary(x, residual, norm_weight, eps, weight, bias, num_heads, num_kv_heads, cos_sin_cache,
                    positions, k_cache, v_cache, slot_mapping, q_norm_weight=None, k_norm_weight=None,
                    qk_eps: float = 1e-6, backend: str | None = None):
    """x, residual [M, H], weight [(Hq + 2 Hkv) D, H] (q | k | v rows), bias or None, cos_sin_cache
    [P, D] float32, positions [M], caches [pages, block_size, Hkv, D], slot_mapping [M] ->
    (q [M, Hq, D] rotated, new residual [M, H]); the rotated k and v are written to the pages
    (slot -1 skipped). q_norm_weight / k_norm_weight [D] (Qwen3): each q / k head RMS-normed (qk_eps)
    before the rotation. One kernel on the Triton path (the add+RMSNorm, QKV GEMM and rotary+append
    kernels of the unfused decode layer)."""
    _check_norm_linear("norm_qkv_rotary", x, residual, norm_weight, weight, bias)
    D = _check_qkv_rotary("norm_qkv_rotary", "weight", weight.shape[0], x.shape[0], num_heads, num_kv_heads,
                          cos_sin_cache, positions, k_cache, slot_mapping, q_norm_weight, k_norm_weight)
    why = _kernel_takes(x, residual, weight, bias) or qkv_kernel_refuses(x.dtype, D, num_kv_heads, k_cache, v_cache)
    if not _use_kernel("norm_qkv_rotary", x, weight, why, backend):
        return norm_qkv_rotary_ref(x, residual, norm_weight, eps, weight, bias, num_heads, num_kv_heads,
                                   cos_sin_cache, positions, k_cache, v_cache, slot_mapping, q_norm_weight,
                                   k_norm_weight, qk_eps)
    from . import fused_triton
    return fused_triton.norm_qkv_rotary(x, residual, norm_weight, eps, weight, bias, num_heads, num_kv_heads,
                                        cos_sin_cache.contiguous(), positions.contiguous(), k_cache, v_cache,
                                        slot_mapping.contiguous(), q_norm_weight, k_norm_weight, qk_eps)


# ----------------------------------------------------------------------------- the norm fold
def decode_norm_fold() -> bool:
    """Whether the model's decode steps fold each RMSNorm into the projection after it (env
    ``OPPO_DECODE_NORM_FOLD=1``; opt-in: session 36, H100, -4.8% per decode step at 0.5B B=256 and
    -3.3% at 1.5B, for a second copy of the qkv and gate_up weights). RMSNorm(s) @ W^T = r * (s @ (W * w)^T) with
    r = rsqrt(mean(s^2) + eps) per row and w the norm's weight, so the layer keeps a copy of its
    qkv and gate_up weights times w (``models.transformer._NormFold``), projects the residual
    stream itself, and the rotary and silu*mul kernels that follow apply r (and the bias); the
    residual adds go into o_proj and down_proj (cuBLAS's beta = 1). A decode layer is then 7
    launches instead of 9, and neither add+RMSNorm is launched."""
    return os.environ.get("OPPO_DECODE_NORM_FOLD") == "1"


def fold_norm_weight(weight: torch.Tensor, norm_weight: torch.Tensor, out: torch.Tensor | None = None):
    """weight [N, H] times norm_weight [H] along H (each column scaled), rounded to weight's dtype."""
    if weight.dim() != 2 or norm_weight.shape != weight.shape[1:]:
        raise ValueError(f"fold_norm_weight: weight [N, H] and norm weight [H], got {tuple(weight.shape)} and "
                         f"{tuple(norm_weight.shape)}")
    if out is None:
        return (weight * norm_weight).to(weight.dtype)
    return torch.mul(weight, norm_weight, out=out)


def _row_scaled(raw: torch.Tensor, stream: torch.Tensor, eps: float, bias: torch.Tensor | None) -> torch.Tensor:
    """rsqrt(mean(stream^2) + eps) * raw (+ bias), per row, in float32, rounded to raw's dtype."""
    acc = torch.float64 if raw.dtype == torch.float64 else torch.float32
    s = stream.to(acc)
    x = raw.to(acc) * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if bias is not None:
        x = x + bias.to(acc)
    return x.to(raw.dtype)


def _check_fold(op: str, raw, stream, bias) -> None:
    if raw.dim() != 2 or stream.dim() != 2 or raw.shape[0] != stream.shape[0]:
        raise ValueError(f"{op}: raw [M, N] and stream [M, H], got {tuple(raw.shape)} and {tuple(stream.shape)}")
    if bias is not None and bias.shape != raw.shape[1:]:
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must be [{raw.shape[1]}]")


def _fold_kernel_takes(raw, stream, bias) -> str | None:
    if raw.dtype not in _KERNEL_DTYPES or stream.dtype not in _KERNEL_DTYPES:
        return f"dtypes {raw.dtype}, {stream.dtype}"
    if any(t is not None and t.stride(-1) != 1 for t in (raw, stream, bias)):
        return "an operand's rows are not contiguous"
    return None


def folded_qkv_rotary_ref(raw, stream, eps, bias, num_heads, num_kv_heads, cos_sin_cache, positions, k_cache,
                          v_cache, slot_mapping, q_norm_weight=None, k_norm_weight=None, qk_eps: float = 1e-6):
    """The row scale and the bias, then what ``rotary_qk`` with ``kv=`` does: (q/k norm and) rotary
    of q and k, the rotated k and v appended to the pages."""
    n, D = raw.shape[0], cos_sin_cache.shape[1]
    q, k, v = _row_scaled(raw, stream, eps, bias).split([num_heads * D, num_kv_heads * D, num_kv_heads * D], -1)
    q, k = rotary_qk_ref(q.reshape(n, num_heads, D), k.reshape(n, num_kv_heads, D), cos_sin_cache, positions,
                         q_norm_weight, k_norm_weight, qk_eps)
    kv_append_ref(k, v.reshape(n, num_kv_heads, D), k_cache, v_cache, slot_mapping)
    return q


def folded_qkv_rotary(raw, stream, eps, bias, num_heads, num_kv_heads, cos_sin_cache, positions, k_cache,
                      v_cache, slot_mapping, q_norm_weight=None, k_norm_weight=None, qk_eps: float = 1e-6,
                      backend: str | None = None):
    """raw [M, (Hq + 2 Hkv) D] = stream @ (W_qkv * input_layernorm.weight)^T (no bias), stream [M, H]
    the residual stream it projects -> q [M, Hq, D] rotated; k and v to the pages (slot -1 skipped).
    q, k, v are first rsqrt(mean(stream^2) + eps) * raw + bias per row (what RMSNorm then the QKV
    projection give), then as ``rotary_qk(..., kv=)``. One kernel on the Triton path."""
    _check_fold("folded_qkv_rotary", raw, stream, bias)
    D = _check_qkv_rotary("folded_qkv_rotary", "raw", raw.shape[1], raw.shape[0], num_heads, num_kv_heads,
                          cos_sin_cache, positions, k_cache, slot_mapping, q_norm_weight, k_norm_weight)
    M = raw.shape[0]
    why = _fold_kernel_takes(raw, stream, bias) or kv_append_refuses(raw.dtype, num_kv_heads, D, k_cache, v_cache)
    if not _use_kernel("folded_qkv_rotary", raw, stream, why, backend):
        return folded_qkv_rotary_ref(raw, stream, eps, bias, num_heads, num_kv_heads, cos_sin_cache, positions,
                                     k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight, qk_eps)
    from . import fused_triton
    q, k, v = raw.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], -1)
    q, _ = fused_triton.rotary_qk(q.view(M, num_heads, D), k.view(M, num_kv_heads, D), cos_sin_cache.contiguous(),
                                  positions.contiguous(), q_norm_weight, k_norm_weight, qk_eps,
                                  kv=(v.view(M, num_kv_heads, D), k_cache, v_cache, slot_mapping.contiguous()),
                                  fold=(stream, eps, None if bias is None else bias.contiguous()))
    return q


def folded_silu_mul_ref(raw, stream, eps, bias=None):
    """silu_mul of the row-scaled raw gate | up (plus the bias)."""
    return silu_mul_ref(_row_scaled(raw, stream, eps, bias))


def folded_silu_mul(raw, stream, eps, bias=None, backend: str | None = None):
    """raw [M, 2I] = stream @ (W_gate_up * post_attention_layernorm.weight)^T (no bias), stream [M, H]
    -> silu(gate) * up [M, I] of rsqrt(mean(stream^2) + eps) * raw + bias per row (what RMSNorm then
    the gate_up projection give). One kernel on the Triton path."""
    _check_fold("folded_silu_mul", raw, stream, bias)
    if raw.shape[1] % 2:
        raise ValueError(f"folded_silu_mul: the last dim must be even (gate | up), got {raw.shape[1]}")
    if not _use_kernel("folded_silu_mul", raw, stream, _fold_kernel_takes(raw, stream, bias), backend):
        return folded_silu_mul_ref(raw, stream, eps, bias)
    from . import fused_triton
    return fused_triton.silu_mul(raw, fold=(stream, eps, None if bias is None else bias.contiguous()))
