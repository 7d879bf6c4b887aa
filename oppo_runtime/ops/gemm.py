"""The decode step's projections: a split-K GEMM of our own beside cuBLAS (opt-in).

    linear(x, weight, bias=None, residual=None, out=None, workspace=None, backend=None, config=None)
        -> x @ weight^T (+ bias) (+ residual) [M, N], rounded once to the dtype
    linear_ref(...)                        the same through torch (F.linear / addmm): the reference
    gate_up_silu(x, weight, bias=None, out=None, workspace=None, backend=None, config=None)
        -> silu(x @ gate^T) * (x @ up^T) [M, I] for weight [2I, K] (gate | up): one kernel, two
           accumulators, the silu*mul kernel as its epilogue
    gate_up_silu_ref(...)                  silu_mul_ref(F.linear(x, weight, bias))
    splitk_config(M, N, K, sm_count)       (BLOCK_M, BLOCK_N, BLOCK_K, K_SPLIT, warps, stages)
    SplitKWorkspace(device)                the partial sums and tile counters a caller keeps
    decode_gemm()                          which GEMM the decode layers use (``OPPO_DECODE_GEMM``)

``OPPO_DECODE_GEMM=splitk`` makes the decode layers' projections (qkv, o_proj, gate_up, down, and
the norm fold's) run ``linear`` on the Triton kernel of ``gemm_triton`` instead of cuBLAS, and the
unfolded layer's gate_up with silu*mul as ``gate_up_silu`` (``splitk-silu-apart``: gate_up and
silu*mul as two kernels, an A/B switch); unset or ``cublas``: cuBLAS (the default until the kernel is
measured faster on the engine's step). The
kernel runs on CUDA tensors of float16/bfloat16 with unit stride along K (``backend='triton'`` forces
it, and runs it on CPU tensors under ``TRITON_INTERPRET=1``); otherwise the reference runs, and
``record_backend`` logs which, once per op.

``residual`` (o_proj and down in the norm-folded layer): out = residual + x @ W^T in float32,
rounded once (what cuBLAS's addmm with beta = 1 computes); ``out`` may be ``residual`` itself.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._backend import MissingKernelError, record_backend, sm_count

__all__ = ["linear", "linear_ref", "gate_up_silu", "gate_up_silu_ref", "splitk_config", "SplitKWorkspace",
           "decode_gemm"]

_DECODE_GEMMS = ("cublas", "splitk", "splitk-silu-apart")


def decode_gemm() -> str:
    """'cublas' (default), 'splitk' or 'splitk-silu-apart': the GEMM of the decode layers'
    projections (``OPPO_DECODE_GEMM``)."""
    v = os.environ.get("OPPO_DECODE_GEMM", "") or "cublas"
    if v not in _DECODE_GEMMS:
        raise ValueError(f"OPPO_DECODE_GEMM must be one of {_DECODE_GEMMS}, got {v!r}")
    return v


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) (+ residual [M, N]) through torch."""
    if residual is None:
        y = F.linear(x, weight, bias)
    else:
        y = torch.addmm(residual if bias is None else residual + bias, x, weight.t())
    if out is None:
        return y
    return out.copy_(y)


def splitk_config(M: int, N: int, K: int, sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, K_SPLIT, num_warps, num_stages) for an [M, K] x [K, N] product.

    Row blocks of 128 (64 below 128 rows, and at least 16: tl.dot's smallest); columns in blocks of
    128 when that alone gives every SM a tile (Qwen2.5-0.5B's gate_up at M = 256: 152 tiles), else
    64 and K split so that tiles x splits is about one CTA per SM, with at least 4 K steps of 64 a
    split (the pipeline's depth). K_SPLIT is a multiple of BLOCK_K."""
    bm = 128 if M >= 128 else max(16, min(64, 1 << max(0, (M - 1).bit_length())))
    bk = 64
    tiles_m = -(-M // bm)
    bn = 128 if tiles_m * -(-N // 128) >= sms else 64
    tiles = tiles_m * -(-N // bn)
    splits = max(1, min(sms // tiles, K // (4 * bk)))
    k_split = -(-K // splits)
    k_split = -(-k_split // bk) * bk
    return bm, bn, bk, k_split, 4, 3


class SplitKWorkspace:
    """The float32 partial sums and int32 tile counters of split-K calls on one stream (a runner's
    decode graphs share one: they never run at once). The counters are zero between calls (each
    call's last split resets its own), so the buffers are allocated here, zeroed, and grown only
    outside a CUDA graph capture (a capture that needs more raises: call ``reserve`` first). Buffers
    outgrown are kept, not freed: a graph captured on them still reads and writes them.
    ``silu_in_gate_up``: the decode layers run gate_up and silu*mul as one ``gate_up_silu`` launch
    (``OPPO_DECODE_GEMM=splitk``) rather than two (``splitk-silu-apart``)."""

    def __init__(self, device, part_floats: int = 0, tiles: int = 0, silu_in_gate_up: bool = True):
        self.device = torch.device(device)
        self.silu_in_gate_up = silu_in_gate_up
        self._outgrown: list[torch.Tensor] = []
        self.part = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.reserve(part_floats, tiles)

    def reserve(self, part_floats: int, tiles: int) -> None:
        grow_part, grow_cnt = part_floats > self.part.numel(), tiles > self.counters.numel()
        if not (grow_part or grow_cnt):
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"split-K workspace: a call under CUDA graph capture needs {part_floats} partial "
                               f"floats and {tiles} counters, the workspace holds {self.part.numel()} and "
                               f"{self.counters.numel()} (run the step once eagerly before capturing)")
        if grow_part:
            self._outgrown.append(self.part)
            self.part = torch.zeros(part_floats, dtype=torch.float32, device=self.device)
        if grow_cnt:
            self._outgrown.append(self.counters)
            self.counters = torch.zeros(tiles, dtype=torch.int32, device=self.device)


def _choose(x: torch.Tensor, weight: torch.Tensor, backend: str | None) -> str:
    requested = backend or os.environ.get("OPPO_OP_BACKEND") or "auto"
    if requested not in ("auto", "triton", "cuda", "reference"):
        raise ValueError(f"op linear: unknown backend {requested!r} (auto|triton|cuda|reference)")
    wants = requested in ("triton", "cuda")
    if requested == "reference":
        return "reference"
    why = None
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        why = f"the kernel takes float16/bfloat16 x and weight of one dtype, got {x.dtype} and {weight.dtype}"
    elif x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        why = f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
    elif x.stride(1) != 1 or weight.stride(1) != 1:
        why = "x and weight need unit stride along K"
    else:
        from . import gemm_triton
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if not gemm_triton.available():
            why = "triton is not importable"
        elif not (x.is_cuda or (wants and interpreted)):
            why = f"its inputs are on {x.device}, not on a CUDA device"
    if why is None:
        return "triton"
    if wants or (x.is_cuda and os.environ.get("OPPO_REQUIRE_KERNELS") == "1"):
        raise MissingKernelError(f"op linear: the split-K kernel cannot run ({why})")
    return "reference"


def gate_up_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of x [M, K] @ weight [2I, K]^T (+ bias [2I]) through torch and silu_mul_ref."""
    from .fused import silu_mul_ref
    y = silu_mul_ref(F.linear(x, weight, bias))
    return y if out is None else out.copy_(y)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, workspace: SplitKWorkspace | None = None,
                 backend: str | None = None, config: tuple[int, int, int, int, int, int] | None = None
                 ) -> torch.Tensor:
    """silu(x @ gate^T (+ b_gate)) * (x @ up^T (+ b_up)) -> [M, I] for weight [2I, K] = gate | up, in
    one split-K launch (the config's BLOCK_N columns of gate and of up per tile), or the reference.
    Rounds as gate_up then silu*mul do: gate and up to the dtype, silu to the dtype, the product."""
    M, I2 = x.shape[0], weight.shape[0]
    if I2 % 2:
        raise ValueError(f"gate_up_silu: weight must have 2I rows (gate | up), got {I2}")
    if bias is not None and tuple(bias.shape) != (I2,):
        raise ValueError(f"gate_up_silu: bias must be [{I2}], got {list(bias.shape)}")
    if out is not None and tuple(out.shape) != (M, I2 // 2):
        raise ValueError(f"gate_up_silu: out must be [{M}, {I2 // 2}], got {list(out.shape)}")
    chosen = _choose(x, weight, backend)
    record_backend("gate_up_silu", chosen)
    if chosen == "reference":
        return gate_up_silu_ref(x, weight, bias, out)
    return _launch(x, weight, bias, None, out, workspace, config, dual=True)


def _launch(x, weight, bias, residual, out, workspace, config, dual: bool = False) -> torch.Tensor:
    from . import gemm_triton
    M, K = x.shape
    N = weight.shape[0] // 2 if dual else weight.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    elif out.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("linear: out and residual need unit column stride")
    if M == 0 or N == 0:
        return out
    if config is None:
        config = splitk_config(M, N, K, sm_count(x.device) if x.is_cuda else 132)
    bm, bn, _, k_split, _, _ = config
    splits = -(-K // k_split)
    tiles = -(-M // bm) * -(-N // bn)
    if splits > 1:
        if workspace is None:
            workspace = SplitKWorkspace(x.device)
        workspace.reserve(splits * M * N * (2 if dual else 1), tiles)
        part, counters = workspace.part, workspace.counters
    else:
        part = counters = out                      # unread placeholders
    dot_f32 = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and x.dtype == torch.bfloat16
    gemm_triton.splitk_linear_launch(x, weight, bias, residual, out, part, counters, config, dot_f32, dual)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
           workspace: SplitKWorkspace | None = None, backend: str | None = None,
           config: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) (+ residual [M, N]) -> out [M, N] (allocated when None;
    may be ``residual``). The split-K kernel (see the module doc) or the reference. ``workspace``:
    the caller's (a decode graph's); without it a call that splits K allocates one (not under
    capture). ``config``: force (BLOCK_M, BLOCK_N, BLOCK_K, K_SPLIT, warps, stages) (the bench's sweep)."""
    M, N = x.shape[0], weight.shape[0]
    for name, t in (("bias", bias), ("residual", residual), ("out", out)):
        want = (N,) if name == "bias" else (M, N)
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"linear: {name} must be {list(want)}, got {list(t.shape)}")
    chosen = _choose(x, weight, backend)
    record_backend("linear", chosen)
    if chosen == "reference":
        return linear_ref(x, weight, bias, residual, out)
    return _launch(x, weight, bias, residual, out, workspace, config)
