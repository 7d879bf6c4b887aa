"""Attention ops of the engine and of training, each beside its pure-torch reference.

Layout of a model's KV cache (one layer, K or V; a strided view of the shared page pool):
    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (inner 3 dims contiguous,
             stride(0) = the pool's page stride, often larger than block_size*Hkv*D)
A slot is ``block * block_size + offset``; ``slot_mapping`` value -1 means "skip this row".

Ops (the CUDA kernel and the reference share a signature; ``backend`` forces one; chunk prefill
also has a Triton kernel, ``prefill_triton.py``, the default on sm_90):
    kv_append(key, value, k_cache, v_cache, slot_mapping)
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
    varlen_causal_attention(q, k, v, cu_seqlens, scale)      (training, autograd, dense)
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from ._backend import MissingKernelError, choose_backend, has_cuda_kernels, record_backend, sm90a_kernels

__all__ = [
    "kv_append", "kv_append_ref",
    "paged_decode_attention", "paged_decode_attention_ref", "paged_decode_plan", "paged_decode_resident_ctas",
    "paged_decode_workspace", "decode_cta_stamps", "decode_tile_stamps", "prefill_item_stamps", "prefill_turn_stamps",
    "paged_prefill_attention", "paged_prefill_attention_ref", "prefill_wgmma_available",
    "varlen_causal_attention", "gather_paged_kv", "acc_dtype", "attention_kernels_support",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the references: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_cache(name: str, k_cache: torch.Tensor, v_cache: torch.Tensor, head_major_ok: bool = False) -> None:
    """The pool's layout: pages [block_size, Hkv, D] contiguous. ``head_major_ok`` (decode) also
    accepts head-major pages [Hkv, block_size, D] viewed as [block_size, Hkv, D] (rows contiguous,
    K and V with equal strides)."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: k_cache/v_cache must both be [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{name}: k_cache and v_cache dtypes differ ({k_cache.dtype}, {v_cache.dtype})")
    if head_major_ok and k_cache.stride() == v_cache.stride() and \
            k_cache[0].stride() == (k_cache.shape[3], k_cache.shape[1] * k_cache.shape[3], 1):
        return
    for c in (k_cache, v_cache):
        if c[0].stride() != (c.shape[2] * c.shape[3], c.shape[3], 1):
            raise ValueError(f"{name}: each page of the cache must be contiguous [block_size, Hkv, D]")


# The CUDA attention kernels cover bf16/fp16 and head dims 64/128 (out may also be float32);
# anything else (fp32 inputs, the CPU-parity path) runs the reference.
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_KERNEL_HEAD_DIMS = (64, 128)


def attention_kernels_support(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the CUDA attention kernels are built and cover this dtype and head dim."""
    return has_cuda_kernels() and dtype in _KERNEL_DTYPES and head_dim in _KERNEL_HEAD_DIMS


def _kernel_backend(op: str, q: torch.Tensor, backend: str | None) -> str | None:
    if q.dtype in _KERNEL_DTYPES and q.shape[-1] in _KERNEL_HEAD_DIMS:
        return backend
    if backend == "cuda":
        raise ValueError(f"{op}: the CUDA kernel takes bf16/fp16 with head_dim 64 or 128, "
                         f"got {q.dtype} and head_dim {q.shape[-1]}")
    return "reference"


def _i32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 else x.to(torch.int32)


# ----------------------------------------------------------------------------- KV append
def kv_append_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key/value [N, Hkv, D] -> rows ``slot_mapping[i]`` of the caches; slot -1 is skipped."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.to(torch.long)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, offsets] = value.to(v_cache.dtype)


def kv_append(key, value, k_cache, v_cache, slot_mapping, backend: str | None = None) -> None:
    """Write new K/V rows into the pages named by ``slot_mapping`` (in place)."""
    _check_cache("kv_append", k_cache, v_cache)
    if key.shape != value.shape or key.dim() != 3 or key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"kv_append: key/value must be [N, {k_cache.shape[2]}, {k_cache.shape[3]}], "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"kv_append: slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if choose_backend("kv_append", k_cache.device, backend) == "cuda":
        torch.ops.oppo.kv_append(key, value, k_cache, v_cache, slot_mapping)
    else:
        kv_append_ref(key, value, k_cache, v_cache, slot_mapping)


# ----------------------------------------------------------------------------- paged gather
def gather_paged_kv(cache, block_tables, length: int):
    """Rows 0..length-1 of every sequence's pages: [B, length, Hkv, D] (reference helper)."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    nblk = (length + block_size - 1) // block_size
    tables = block_tables[:, :nblk].to(torch.long).clamp_min(0)
    blocks = tables[:, pos // block_size]                       # [B, length]
    return cache[blocks, (pos % block_size).expand_as(blocks)]


# ----------------------------------------------------------------------------- decode
def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                               out: torch.Tensor | None = None, workspace: torch.Tensor | None = None):
    """One query per sequence over its paged context. q [B, Hq, D] -> [B, Hq, D].

    Computed in float32. A sequence with context_len 0 gets zeros. ``workspace`` (the kernel's
    split-KV scratch) is accepted for the kernel's signature and not needed here.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    max_len = int(context_lens.max()) if B else 0
    acc = acc_dtype(q.dtype)
    res = torch.zeros(B, Hq, D, dtype=acc, device=q.device)
    if B and max_len:
        k = gather_paged_kv(k_cache, block_tables, max_len).to(acc)    # [B, L, Hkv, D]
        v = gather_paged_kv(v_cache, block_tables, max_len).to(acc)
        qf = q.to(acc).view(B, Hkv, G, D)
        s = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale
        valid = torch.arange(max_len, device=q.device)[None, :] < context_lens.to(q.device)[:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        v = v.masked_fill(~valid[:, :, None, None], 0.0)     # pages past the context hold garbage (NaN)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        res = torch.einsum("bhgl,blhd->bhgd", p, v).reshape(B, Hq, D)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out


# Mirror of the CUDA launcher's split plan (plan_decode in csrc/paged_decode_attention.cu), for
# tests and benchmarks only: the kernel does not read it. Resident CTAs per SM are estimated from
# the kernel's shared memory (and the registers ptxas reported); the launcher asks the CUDA
# occupancy API instead, so on an unusual card the two may differ.
_DECODE_TILE = 64
_DECODE_MIN_PARTITION = 256
_DECODE_STAGES = {64: 3, 128: 3}
_DECODE_V4_STAGES = {64: 4, 128: 3}
_DECODE_CTAS_BY_REGS = {64: 4, 128: 2}     # v3: <= 128 (launch bounds) and 174-178 registers x 128 threads
_DECODE_V4_CTAS_BY_REGS = {64: 3, 128: 2}  # v4: 128-132 and 188 registers x 128 threads
_DECODE_V4_EXTRA_SMEM = 8 * 16 + 32        # v4/v5: ring of 8 tile records + the ticket flag + the claim slot
_DECODE_V5_ITEMS = 4                       # v5: work items per resident slot, at least (OPPO_DECODE_V5_ITEMS)
_DECODE_V5_MAX_PART = 512                  # v5: tokens per item, at most (OPPO_DECODE_V5_MAX_PART)
_DECODE_V6_STAGES = {64: 3, 128: 2}       # v6: the v3 kernel, lean at D=128 (2 stages ...)
_DECODE_V6_CTAS_BY_REGS = {64: 4, 128: 3}  # ... and launch bounds of 3 CTAs per SM)
_DECODE_PLANS = ("v2", "v3", "v4", "v5", "v6", "v7")


def _decode_plan_name(plan: str | None) -> str:
    plan = plan or os.environ.get("OPPO_DECODE_PLAN") or "v7"
    if plan not in _DECODE_PLANS:
        raise ValueError(f"plan must be one of {_DECODE_PLANS}, got {plan!r}")
    return plan


def paged_decode_resident_ctas(head_dim: int, device=None, plan: str | None = None) -> int:
    """Estimated CTAs per SM of the decode kernel of ``plan`` (default: ``OPPO_DECODE_PLAN`` or
    v3; v2, v3, v6 and v7 share a kernel, v6 with 2 stages at D=128; v4 and v5 another) for this
    head dim (smem and register bound)."""
    plan = _decode_plan_name(plan)
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    row = (head_dim + 8) * 2
    stages, regs, extra = ((_DECODE_V4_STAGES, _DECODE_V4_CTAS_BY_REGS, _DECODE_V4_EXTRA_SMEM) if plan in ("v4", "v5")
                           else (_DECODE_V6_STAGES, _DECODE_V6_CTAS_BY_REGS, 0) if plan == "v6"
                           else (_DECODE_STAGES, _DECODE_CTAS_BY_REGS, 0))
    smem = stages[head_dim] * (2 * _DECODE_TILE * row + _DECODE_TILE * 8) + extra
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    return max(1, min(regs[head_dim], per_sm // (smem + 1024)))


def _env_int_in(name: str, default: int, lo: int, hi: int) -> int:
    """An integer switch as the launcher reads it (csrc env_int): ``default`` when unset or empty,
    else an integer in lo..hi, or a ValueError naming the switch."""
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {raw!r}")
    return value


def paged_decode_plan(B: int, Hq: int, Hkv: int, head_dim: int, table_tokens: int, sm_count: int,
                      resident: int, plan: str | None = None, max_partition: int = 0) -> tuple[int, int]:
    """(num_splits, partition in tokens) of the CUDA decode launcher; partition 1 << 30 = no split.

    ``table_tokens`` = block_tables.shape[1] * block_size; ``resident`` = CTAs per SM of the
    plan's kernel (``paged_decode_resident_ctas(D, plan=plan)``). ``plan`` "v7" (default, or the
    ``OPPO_DECODE_PLAN`` environment variable), "v3", "v2", "v4" (v3's rule on the v4 kernel), "v5"
    (the v4 kernel with at least ``OPPO_DECODE_V5_ITEMS`` (4) work items per resident slot of at
    most ``OPPO_DECODE_V5_MAX_PART`` (512) tokens, claimed dynamically) or "v6" (v3's rule on the
    v3 kernel lean at D=128: 2 stages, 3 CTAs per SM); "v7" is v3's rule and kernel with the splits
    merged by the last CTA of each group instead of a reduction kernel (the default since session
    19: equal to v3 on issue 7's shapes or faster, -5% on the engine's decode step at B=256). ``max_partition``
    (v2/v3/v6/v7; v4 and v5
    ignore it): at most that many tokens per split, rounded up to the 64-token tile (0: no cap);
    see ``paged_decode_attention``."""
    plan = _decode_plan_name(plan)
    if max_partition < 0:
        raise ValueError(f"max_partition must be >= 0 (0: no cap), got {max_partition}")
    base = B * Hkv * ((Hq // Hkv + 15) // 16)
    splits = 1
    max_ctx = min(table_tokens, 2**31 - 1)
    if plan == "v5":
        items = _env_int_in("OPPO_DECODE_V5_ITEMS", _DECODE_V5_ITEMS, 1, 64)             # the launcher's bounds
        max_part = _env_int_in("OPPO_DECODE_V5_MAX_PART", _DECODE_V5_MAX_PART, _DECODE_MIN_PARTITION, 1 << 30)
        splits = max(-(-items * sm_count * max(1, resident) // base), -(-max_ctx // max_part))
    elif plan == "v2":
        target = 8 * sm_count
        if base < target:
            splits = -(-target // base)
    else:   # v3, v4, v6, v7 (OPPO_DECODE_SPLIT_SLOTS=N: as if N CTAs per SM were resident)
        slots = sm_count * (_env_int_in("OPPO_DECODE_SPLIT_SLOTS", 0, 0, 16) or max(1, resident))
        if base < slots:
            splits = slots // base
    splits = min(splits, max(1, -(-max_ctx // _DECODE_MIN_PARTITION)))
    if max_partition > 0 and plan not in ("v4", "v5"):
        cap = -(-max_partition // _DECODE_TILE) * _DECODE_TILE
        splits = max(splits, -(-max_ctx // cap))
    if splits > 1:
        part = -(-max_ctx // splits)
        part = -(-part // _DECODE_TILE) * _DECODE_TILE
        splits = -(-max_ctx // part)
        if splits > 1:
            return splits, part
    return 1, 1 << 30


def paged_decode_grid(B: int, Hq: int, Hkv: int, head_dim: int, table_tokens: int, sm_count: int,
                      resident: int, plan: str | None = None, max_partition: int = 0) -> tuple[int, int]:
    """(CTAs launched, most work items one CTA takes) of the CUDA decode launcher (mirror).

    v2/v3/v6/v7: one CTA per (split, sequence, kv head, head chunk), one item each (plus, but for
    v7, the reduction kernel when split). v4: one CTA per item when split; without split a persistent grid of
    min(groups, sm_count * resident) CTAs, CTA c taking the groups c, c + grid, ... v5: a
    persistent grid of min(items, sm_count * resident) CTAs claiming items from a counter (the
    second value is then the items per CTA on average, rounded up)."""
    plan = _decode_plan_name(plan)
    groups = B * Hkv * ((Hq // Hkv + 15) // 16)
    splits, _ = paged_decode_plan(B, Hq, Hkv, head_dim, table_tokens, sm_count, resident, plan, max_partition)
    items = splits * groups
    if plan not in ("v4", "v5") or (plan == "v4" and splits > 1):
        return items, 1
    ctas = min(items, sm_count * max(1, resident))
    return ctas, -(-items // ctas)


def paged_decode_workspace(q, k_cache, block_tables, backend: str | None = None,
                           max_partition: int = 0) -> torch.Tensor | None:
    """The float32 scratch ``paged_decode_attention(..., workspace=)`` needs for this shape (split-KV
    partials), or None where it needs none (no split, or the reference runs). The split plan depends
    on shapes only (q's B, Hq, D and dtype, the cache's Hkv and page size, block_tables' width) and
    on ``OPPO_DECODE_PLAN`` and ``max_partition`` (pass the calls' own), so one workspace serves every
    call of that shape, e.g. all layers of a captured decode graph; a call whose plan needs more
    raises instead of overrunning it."""
    backend = _kernel_backend("paged_decode_attention", q, backend)
    if choose_backend("paged_decode_attention", q.device, backend) != "cuda":
        return None
    n = int(torch.ops.oppo.paged_decode_workspace_size(q, k_cache, block_tables, max_partition))
    return torch.empty(n, dtype=torch.float32, device=q.device) if n else None


@functools.lru_cache(maxsize=1)
def _warn_loads_only() -> None:
    """Once per process: OPPO_DECODE_DIAG_LOADS_ONLY=1 makes the decode kernel skip its arithmetic
    (a bench diagnostic of its loads alone, csrc/paged_decode_attention.cu): every output is wrong."""
    warnings.warn("OPPO_DECODE_DIAG_LOADS_ONLY=1: the CUDA decode attention skips its arithmetic (a bench "
                  "diagnostic); its outputs are wrong", RuntimeWarning, stacklevel=3)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           out: torch.Tensor | None = None, backend: str | None = None,
                           workspace: torch.Tensor | None = None, max_partition: int = 0):
    """CUDA kernel (bf16/fp16, head_dim 64/128) or the reference. Split plan: see
    ``paged_decode_plan``; ``OPPO_DECODE_PLAN=v2`` selects the previous plan (A/B timing),
    ``OPPO_DECODE_PLAN=v4`` the one-launch kernel (last-CTA merge, persistent grid), ``v5`` that
    kernel with ~4 work items per CTA slot claimed from a counter (dynamic balance), ``v6`` v3's
    kernel with 2 stages and 3 CTAs per SM at head dim 128.

    ``max_partition`` (tokens, 0: none): a cap on the tokens one CTA reads, for batches of ragged
    contexts. The plan sees shapes only (the table's width, not the lengths), so without a cap a
    batch of many short contexts and a few long ones gets few splits, and the long ones' CTAs
    set the time while the rest of the GPU idles. The engine passes ``EngineConfig.
    decode_max_partition``. The reference ignores it (same result). v4 and v5 ignore it.

    ``workspace``: the split-KV scratch from ``paged_decode_workspace`` (float32); with it and
    ``out`` given the call allocates nothing. Without it the kernel takes one from PyTorch's
    caching allocator (graph-safe too: the graph's private pool under capture)."""
    _check_cache("paged_decode_attention", k_cache, v_cache, head_major_ok=True)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_decode_attention: q must be [B, Hq, {k_cache.shape[3]}] with Hq a "
                         f"multiple of Hkv={k_cache.shape[2]}, got {tuple(q.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError("paged_decode_attention: block_tables must be [B, max_blocks] and context_lens [B]")
    if workspace is not None and (workspace.device != q.device or workspace.dtype != torch.float32
                                  or not workspace.is_contiguous()):
        raise ValueError(f"paged_decode_attention: workspace must be a contiguous float32 tensor on {q.device} "
                         f"(from paged_decode_workspace), got {workspace.dtype} on {workspace.device}")
    backend = _kernel_backend("paged_decode_attention", q, backend)
    if choose_backend("paged_decode_attention", q.device, backend) == "cuda":
        if out is None:
            out = torch.empty_like(q)
        if workspace is not None:    # checked here too, as a ValueError like the other argument errors
            need = int(torch.ops.oppo.paged_decode_workspace_size(q, k_cache, block_tables, max_partition))
            if workspace.numel() < need:
                raise ValueError(f"paged_decode_attention: workspace holds {workspace.numel()} floats, this "
                                 f"call's split plan needs {need} (size it with paged_decode_workspace)")
        if os.environ.get("OPPO_DECODE_DIAG_LOADS_ONLY", "0") not in ("", "0"):
            _warn_loads_only()
        torch.ops.oppo.paged_decode_attention(out, q, k_cache, v_cache, _i32(block_tables),
                                              _i32(context_lens), scale, workspace, max_partition)
        return out
    if max_partition < 0:
        raise ValueError(f"paged_decode_attention: max_partition must be >= 0 (0: no cap), got {max_partition}")
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out)


def decode_rope_in() -> bool:
    """``OPPO_DECODE_ROPE_IN`` (1 default; read when a decode graph is captured, or per eager step):
    the decode layers take ``paged_decode_attention_rope`` (the rotary and the K/V append as the
    attention kernel's prologue: one launch a layer fewer) where it serves them; 0: the rotary
    kernel, then the attention. Session 40 measured -55 to -65 us of kernel time a step (0.5B,
    B=256, H100); session 41 found its pages and outputs bit-equal to the rotary kernel's on an
    H100 (both compute fused_triton._rope_pair's one rotary form) and made it the default."""
    return _env_int_in("OPPO_DECODE_ROPE_IN", 1, 0, 1) == 1


def paged_decode_attention_rope_refuses(num_heads: int, qkv: torch.Tensor, k_cache: torch.Tensor,
                                        v_cache: torch.Tensor) -> str | None:
    """Why the CUDA kernel's rotary prologue cannot serve this decode layer (None: it can): it runs
    the heads-as-N kernel (groups of 1-8 query heads per kv head, plans v2/v3/v7) on token-major
    pages in qkv's dtype (bf16/fp16, head_dim 64/128), the fused QKV output rows contiguous."""
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    G = num_heads // Hkv if Hkv else 0
    if qkv.dtype not in _KERNEL_DTYPES or D not in _KERNEL_HEAD_DIMS:
        return f"{qkv.dtype} with head_dim {D}"
    if not 1 <= G <= 8 or num_heads % Hkv:
        return f"{num_heads} query heads over {Hkv} kv heads (groups of 1-8)"
    if _decode_plan_name(None) not in ("v2", "v3", "v7"):
        return f"plan {_decode_plan_name(None)}"
    for name in ("OPPO_DECODE_REG_STAGE", "OPPO_DECODE_REFILL"):
        if os.environ.get(name, "0") not in ("", "0"):
            return name
    if os.environ.get("OPPO_DECODE_HEADS_AS_N", "") == "0":
        return "OPPO_DECODE_HEADS_AS_N=0"
    from .fused import kv_append_refuses      # (fused imports this module)
    if kv_append_refuses(qkv.dtype, Hkv, D, k_cache, v_cache) is not None:
        return "caches that are not token-major pages in the model's dtype"
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.stride(0) % 8:
        return "a QKV output whose rows are not contiguous"
    return None


def paged_decode_attention_rope(qkv, num_heads: int, k_cache, v_cache, block_tables, context_lens, scale: float,
                                cos_sin_cache, positions, slot_mapping, out: torch.Tensor | None = None,
                                backend: str | None = None, workspace: torch.Tensor | None = None,
                                max_partition: int = 0):
    """A decode layer's rotary, K/V append and attention in one kernel: ``qkv`` [B, (Hq + 2 Hkv) D] is
    the QKV projection's output (bias included); q and k are rotated (half-split) at ``positions``
    by ``cos_sin_cache`` (``rotary_cos_sin_cache``), k and v written to the caches at
    ``slot_mapping`` (-1: not written), and the attention of q over the pages (the new row included)
    returned [B, Hq, D]: exactly ``rotary_qk`` with ``kv=`` followed by ``paged_decode_attention``,
    which is the reference. No q_norm / k_norm (Qwen3: the model keeps the two kernels). The CUDA
    kernel: ``paged_decode_attention_rope_refuses`` says what it serves."""
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    B = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * Hkv) * D or num_heads % max(Hkv, 1):
        raise ValueError(f"paged_decode_attention_rope: qkv must be [B, (Hq + 2 Hkv) * D] = [B, "
                         f"{(num_heads + 2 * Hkv) * D}] with Hq={num_heads} a multiple of Hkv={Hkv}, got {tuple(qkv.shape)}")
    if positions.shape != (B,) or slot_mapping.shape != (B,):
        raise ValueError("paged_decode_attention_rope: positions and slot_mapping must be [B]")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D:
        raise ValueError(f"paged_decode_attention_rope: cos_sin_cache must be float32 [P, {D}], got "
                         f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    q3 = qkv.view(B, num_heads + 2 * Hkv, D)
    backend = _kernel_backend("paged_decode_attention_rope", qkv.view(B, -1, D), backend)
    why = paged_decode_attention_rope_refuses(num_heads, qkv, k_cache, v_cache)
    if why is not None and backend != "reference" and (qkv.is_cuda or backend == "cuda"):
        raise ValueError(f"paged_decode_attention_rope: the CUDA kernel does not serve {why} (the model takes "
                         "rotary_qk and paged_decode_attention there)")
    if choose_backend("paged_decode_attention_rope", qkv.device, backend) == "cuda":
        _check_cache("paged_decode_attention_rope", k_cache, v_cache)
        if out is None:
            out = torch.empty(B, num_heads, D, dtype=qkv.dtype, device=qkv.device)
        if workspace is not None:
            need = int(torch.ops.oppo.paged_decode_workspace_size(q3[:, :num_heads], k_cache, block_tables,
                                                                  max_partition))
            if workspace.numel() < need:
                raise ValueError(f"paged_decode_attention_rope: workspace holds {workspace.numel()} floats, this "
                                 f"call's split plan needs {need} (size it with paged_decode_workspace)")
        torch.ops.oppo.paged_decode_attention_rope(out, q3[:, :num_heads], k_cache, v_cache, _i32(block_tables),
                                                   _i32(context_lens), scale, cos_sin_cache,
                                                   positions.to(torch.int64), slot_mapping.to(torch.int64),
                                                   workspace, max_partition)
        return out
    from .fused import rotary_qk_ref
    q, k, v = q3.split([num_heads, Hkv, Hkv], dim=1)
    q, k = rotary_qk_ref(q, k, cos_sin_cache, positions)
    kv_append_ref(k, v, k_cache, v_cache, slot_mapping)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out)


@contextlib.contextmanager
def _stamps(op: str, capacity: int, device):
    """Point a kernel's timestamp buffer (torch.ops.oppo.<op>) at fresh zeros inside the block."""
    if capacity < 1:
        raise ValueError(f"{op}: capacity must be >= 1, got {capacity}")
    if not (has_cuda_kernels() and torch.cuda.is_available()):
        raise MissingKernelError(f"{op}: needs the CUDA kernels (oppo_runtime._C built with CUDA) and a GPU")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"{op}: device must be a CUDA device, got {dev}")
    switch = getattr(torch.ops.oppo, op)
    stamps = torch.zeros(capacity, 3, dtype=torch.int64, device=dev)
    switch(stamps)
    try:
        yield stamps
    finally:
        switch(torch.empty(0, 3, dtype=torch.int64, device=dev))


def decode_cta_stamps(capacity: int, device=None):
    """Per-CTA timestamps of the CUDA decode kernel inside the block (a profiling aid:
    ``bench/decode_stamps.py``); a context manager. Yields an int64 [capacity, 3] tensor of zeros on
    ``device`` (default: the current CUDA device); each launch of the split kernel (plans v2, v3, v6, v7;
    not v4/v5, not the split reduction) inside the block writes row c = the CTA's linear id
    (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)): start ns, end ns
    (%globaltimer) and SM id | the CTA's SM cycles (%clock64, start to end) << 32, so cycles / ns is
    the SM clock it ran at; CTAs past ``capacity`` write nothing. Later launches overwrite
    earlier ones' rows. The switch is ordered on the current stream; not under CUDA-graph capture,
    but graphs replayed inside the block stamp too. Raises where the CUDA kernels are not built or
    no GPU is present."""
    return _stamps("decode_cta_stamps", capacity, device)


TILE_STAMP_ROWS = 128   # decode_tile_stamps' rows per CTA (kernels/paged_decode_attention.cuh kTileStampRows)


def decode_tile_stamps(capacity: int, device=None):
    """Per-tile stamps of the CUDA decode kernel (plans v2, v3, v7 with the heads as the mma's N, bf16;
    ``bench/decode_tiles.py``), as ``decode_cta_stamps``: while on, those launches run a kernel
    instantiated with them. Thread 0 of CTA c (linear id) writes rows c * R .. c * R + R - 1
    (R = TILE_STAMP_ROWS), one per event in order: %globaltimer ns, event | tile << 8, SM id; events
    (kernels/paged_decode_attention.cuh kTsd*): 0 start, 1 start-up's loads issued, 2 tile t landed
    (one row per tile), 3 every tile done, 4 its partial or output written, 5 its end (tile 1: it
    merged its group's splits). A CTA with more than R - 5 tiles drops the later landings (its end's
    three rows stay); rows past ``capacity`` are not written; a split past its context writes its
    start only."""
    return _stamps("decode_tile_stamps", capacity, device)


def prefill_item_stamps(capacity: int, device=None):
    """Per-item timestamps of the sm_90a wgmma prefill kernel (``bench/prefill_stamps.py``), as
    ``decode_cta_stamps``: row w = work item w (row tile, kv head, sequence; in the kernel's order,
    which for the key-split plans _ks takes every (sequence, kv head)'s last row tile first)
    gets start ns, end ns (consumer warpgroup 0's start of the item and end of its epilogue) and
    SM id | key tiles << 32 (| 1 << 52: an item whose key tiles were split, plans _ks). Only the
    wgmma plans write (not mma, not Triton)."""
    return _stamps("prefill_item_stamps", capacity, device)


def prefill_turn_stamps(capacity: int, device=None):
    """Per-turn stamps of the sm_90a three-warpgroup wgmma prefill (plans wgmma3 without _mi and
    _ks; ``bench/prefill_turns.py``), as ``decode_cta_stamps``: while on, those plans run a kernel
    instantiated with them. Thread 0 of each consumer warpgroup k of CTAs c = 0 and 1 writes its
    events into rows [(3c + k) S, (3c + k + 1) S), S = capacity // 6: SM cycles (%clock64), the
    event | tile << 8 (events: kernels/paged_prefill_wgmma.cuh kTs*), the work item. Rows past a
    slice's end are not written."""
    return _stamps("prefill_turn_stamps", capacity, device)


# ----------------------------------------------------------------------------- chunk prefill
def paged_prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                scale: float, out: torch.Tensor | None = None):
    """A chunk of new queries per sequence over its paged context, bottom-right causal.

    q [Nq, Hq, D] packed by ``cu_seqlens_q`` [B+1]; ``context_lens`` [B] counts the prefix plus
    the chunk (the chunk's K/V are already in the pages). Query i of sequence b sits at position
    ``context_lens[b] - n_b + i`` and sees keys 0..that position. Computed in float32.
    """
    Nq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    acc = acc_dtype(q.dtype)
    res = torch.empty(Nq, Hq, D, dtype=acc, device=q.device)
    cu = cu_seqlens_q.tolist()
    ctx = context_lens.tolist()
    for b in range(len(ctx)):
        s, e = cu[b], cu[b + 1]
        n, L = e - s, ctx[b]
        if n == 0:
            continue
        k = gather_paged_kv(k_cache, block_tables[b:b + 1], L)[0].to(acc)   # [L, Hkv, D]
        v = gather_paged_kv(v_cache, block_tables[b:b + 1], L)[0].to(acc)
        qb = q[s:e].to(acc).transpose(0, 1)                                 # [Hq, n, D]
        kb = k.transpose(0, 1).repeat_interleave(Hq // Hkv, 0)             # [Hq, L, D]
        vb = v.transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
        qpos = torch.arange(L - n, L, device=q.device)[:, None]
        mask = torch.arange(L, device=q.device)[None, :] <= qpos            # [n, L]
        res[s:e] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale).transpose(0, 1)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out


def _prefill_backend(q: torch.Tensor, backend: str | None) -> str:
    """Which implementation runs ``paged_prefill_attention``: 'cuda', 'triton' or 'reference'.

    Asked for by, in order: the ``backend`` argument, env ``OPPO_PREFILL_BACKEND``
    (cuda|triton|reference), env ``OPPO_OP_BACKEND``; none of them (or 'auto') means auto.
    Auto rule, on a CUDA device for bf16/fp16 and head dim 64/128: on sm_90 (Hopper) with sm_90a
    code, for head dim 128 and for head dim 64 in bf16, the CUDA kernel, whose default plans there
    are wgmma_pp_ov_qp_xc_ps and wgmma3_pp_ov_qp_xc_ps (``_cuda_prefill_plan``); else the Triton kernel
    on sm_90 when triton imports (there tl.dot lowers to wgmma, which the CUDA kernel's mma plan, 0.55-0.63x FlexAttention on an H100,
    bench/NOTES.md "Prefill v2", does not use); on other cards the CUDA kernel, or Triton when the
    extension lacks it; else the reference. Inputs no kernel
    covers (fp32, other head dims) take the reference unless the ``backend`` argument names a
    kernel (ValueError). A kernel asked for that cannot run raises MissingKernelError: no silent
    fallback.
    """
    op = "paged_prefill_attention"
    requested = (backend or os.environ.get("OPPO_PREFILL_BACKEND") or os.environ.get("OPPO_OP_BACKEND")
                 or "auto")
    if requested not in ("auto", "cuda", "triton", "reference"):
        raise ValueError(f"op {op}: unknown backend {requested!r} (auto|cuda|triton|reference)")
    covered = q.dtype in _KERNEL_DTYPES and q.shape[-1] in _KERNEL_HEAD_DIMS
    if not covered:
        if backend in ("cuda", "triton"):
            raise ValueError(f"{op}: the {backend} kernel takes bf16/fp16 with head_dim 64 or 128, "
                             f"got {q.dtype} and head_dim {q.shape[-1]}")
        return choose_backend(op, q.device, "reference")
    on_cuda = q.device.type == "cuda"
    if requested == "auto" and on_cuda:
        from . import prefill_triton
        if os.environ.get("OPPO_PREFILL_PLAN", "auto") in ("", "auto") and _cuda_prefill_plan(q) != "mma":
            return choose_backend(op, q.device, "cuda")     # the launcher's default plan there: wgmma
        if prefill_triton.available() and (_is_sm90(q.device) or not has_cuda_kernels()):
            requested = "triton"
    if requested == "triton":
        from . import prefill_triton
        if not prefill_triton.available() or not on_cuda:
            why = ("triton is not installed" if not prefill_triton.available()
                   else f"its inputs are on {q.device}, not on a CUDA device")
            raise MissingKernelError(f"op {op}: Triton kernel requested but not available ({why})")
        record_backend(op, "triton")
        return "triton"
    return choose_backend(op, q.device, requested)


def _cuda_prefill_plan(q: torch.Tensor) -> str:
    """The plan the CUDA launcher runs for ``q`` (its ``prefill_plan``, mirrored for the log and
    the auto rule): OPPO_PREFILL_PLAN when it names one; else (unset or ``auto``), on sm_90 with
    sm_90a code and unless OPPO_PREFILL_WGMMA_OFF switches it off, wgmma_pp_ov_qp_xc_ps for head dim
    128 and wgmma3_pp_ov_qp_xc_ps for head dim 64 in bf16 (without the chained turns, _xc: session
    17, H100, issue 8's shapes, 1.29-1.36x and 1.13x FlexAttention; Triton 0.79-0.93x); else mma. Not wgmma for fp16 at D=64 (the
    three-warpgroup plan is built for bf16 only; two warpgroups equal Triton there, which the auto
    rule picks instead)."""
    plan = os.environ.get("OPPO_PREFILL_PLAN", "auto")
    if plan not in ("", "auto"):
        return plan
    default = {128: "wgmma_pp_ov_qp_xc_ps", 64: "wgmma3_pp_ov_qp_xc_ps"}.get(q.shape[-1])
    if default is None or q.device.type != "cuda" or (q.shape[-1] == 64 and q.dtype != torch.bfloat16):
        return "mma"
    key = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if key not in _WGMMA_HERE:     # asked once per device: this runs at every layer's prefill call
        _WGMMA_HERE[key] = _is_sm90(q.device) and prefill_wgmma_available(q.device)
    return default if _WGMMA_HERE[key] and not _wgmma_switched_off(default) else "mma"


_WGMMA_HERE: dict[int, bool] = {}


def _wgmma_switched_off(plan: str) -> bool:
    """Whether OPPO_PREFILL_WGMMA_OFF (read at every call: tests and the smoke set it) names ``plan``."""
    off = {p.strip() for p in os.environ.get("OPPO_PREFILL_WGMMA_OFF", "").split(",") if p.strip()}
    return plan in off or "all" in off


def _is_sm90(device: torch.device) -> bool:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _TRITON_PREFERRED:
        _TRITON_PREFERRED[key] = torch.cuda.get_device_capability(device)[0] == 9
    return _TRITON_PREFERRED[key]


_TRITON_PREFERRED: dict[int, bool] = {}


def prefill_plan_head_dims(plan: str) -> tuple[int, ...]:
    """The head dims a CUDA prefill wgmma plan is built for (the launcher refuses the others): the
    three-warpgroup plans (``wgmma3...``, bf16 only) 64; the other ``_mi`` plans 128 (bf16
    only); the rest 64 and 128, bf16 and fp16."""
    if plan.startswith("wgmma3"):
        return (64,)
    if "_mi" in plan.split("_ps")[0]:
        return (128,)
    return (64, 128)


def prefill_wgmma_available(device: torch.device | None = None, plan: str | None = None) -> bool:
    """Whether the CUDA prefill's wgmma plans (OPPO_PREFILL_PLAN=wgmma[3][_pp][_ov][_kv][_qp][_xc][_mi][_ks][_ps]) can run
    here: an sm_90 device and an extension built with sm_90a code (TORCH_CUDA_ARCH_LIST with
    9.0a). With ``plan``, also that this plan is not switched off by OPPO_PREFILL_WGMMA_OFF (a
    comma list of plans, or ``all``: what ``bench/wgmma_smoke.py`` found failing or hanging)."""
    if plan is not None and _wgmma_switched_off(plan):
        return False
    return sm90a_kernels(device)


def paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                            scale: float, out: torch.Tensor | None = None,
                            max_seqlen_q: int | None = None, backend: str | None = None):
    """Chunk prefill over the paged context (see ``paged_prefill_attention_ref``).

    ``backend``: None/'auto', 'cuda', 'triton' or 'reference' (rule in ``_prefill_backend``).
    Pass ``max_seqlen_q`` (the longest chunk, or more) to avoid a host sync, e.g. under CUDA-graph
    capture; the Triton backend also needs one eager call per (G, head_dim, page size, dtype)
    before capture (its autotuner benchmarks on the first).
    """
    _check_cache("paged_prefill_attention", k_cache, v_cache)
    B = context_lens.shape[0]
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_prefill_attention: q must be [Nq, Hq, {k_cache.shape[3]}], got {tuple(q.shape)}")
    if cu_seqlens_q.shape != (B + 1,) or block_tables.shape[0] != B:
        raise ValueError("paged_prefill_attention: cu_seqlens_q must be [B+1] and block_tables [B, max_blocks]")
    which = _prefill_backend(q, backend)
    if which == "triton":
        from . import prefill_triton
        return prefill_triton.paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens,
                                                      block_tables, scale, out=out, max_seqlen_q=max_seqlen_q)
    if which == "cuda":
        # the launcher picks its plan from OPPO_PREFILL_PLAN (auto | mma | wgmma[3][_pp][_ov][_kv][_qp][_xc][_mi][_ks][_ps]) at every call
        record_backend("paged_prefill_attention/cuda_plan", _cuda_prefill_plan(q))
        if out is None:
            out = torch.empty_like(q)
        if max_seqlen_q is None:  # a host sync: callers that capture graphs pass it
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
        torch.ops.oppo.paged_prefill_attention(out, q, k_cache, v_cache, _i32(cu_seqlens_q),
                                               _i32(context_lens), _i32(block_tables), scale,
                                               max_seqlen_q)
        return out
    return paged_prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, out)


# ----------------------------------------------------------------------------- training
class _FlashVarlen(torch.autograd.Function):
    """Causal varlen attention on PyTorch's FlashAttention-2 (``aten._flash_attention_forward`` /
    ``_backward``, the kernels under SDPA's flash backend and ``torch.nn.attention.varlen``):
    packed tokens and cu_seqlens straight in, GQA native (Hkv divides Hq), no padding, no gather,
    no host sync. The same aten calls as ``torch.nn.attention.varlen.varlen_attn``, which not every
    supported torch version ships."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen: int, scale: float):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_seqlen, ctx.max_seqlen, 0.0, True,
            seed, offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def _training_attention_backend(q: torch.Tensor) -> str:
    """'flash' (CUDA sm_80+, bf16/fp16, head dim <= 256, env OPPO_TRAIN_ATTENTION unset or 'flash') or
    'padded_sdpa' (everything else, and OPPO_TRAIN_ATTENTION=sdpa)."""
    want = os.environ.get("OPPO_TRAIN_ATTENTION", "auto")
    if want not in ("auto", "flash", "sdpa"):
        raise ValueError(f"OPPO_TRAIN_ATTENTION={want!r}: expected auto, flash or sdpa")
    ok = (q.is_cuda and q.dtype in _KERNEL_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
          and hasattr(torch.ops.aten, "_flash_attention_forward")
          and torch.cuda.get_device_capability(q.device) >= (8, 0))     # FlashAttention-2: sm_80+
    if want == "flash" and not ok:
        raise ValueError(f"OPPO_TRAIN_ATTENTION=flash needs CUDA bf16/fp16 inputs with head_dim <= 256, "
                         f"got {q.dtype} head_dim {q.shape[-1]} on {q.device}")
    which = "flash" if ok and want != "sdpa" else "padded_sdpa"
    record_backend("varlen_causal_attention", which)
    return which


def varlen_causal_attention(q, k, v, cu_seqlens, scale: float, max_seqlen: int | None = None):
    """Causal attention within each packed sequence (autograd). q [N, Hq, D], k/v [N, Hkv, D].

    On CUDA in bf16/fp16: FlashAttention-2 varlen (``_FlashVarlen``). Otherwise (the CPU, fp32):
    packs to a right-padded batch and calls SDPA once: with right padding the causal mask alone
    keeps every real query away from the padding, so no key-padding mask is needed. Give
    ``max_seqlen`` (the longest sequence, known on the host) to avoid a device-to-host read.
    """
    N, Hq, D = q.shape
    if _training_attention_backend(q) == "flash":
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return _FlashVarlen.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                  cu_seqlens.to(device=q.device, dtype=torch.int32), int(max_seqlen), float(scale))
    Hkv = k.shape[1]
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    B = lens.shape[0]
    if B == 1:
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                             enable_gqa=Hq != Hkv)
        return out[0].transpose(0, 1)
    T = int(max_seqlen if max_seqlen is not None else lens.max())
    starts = cu_seqlens[:-1].to(q.device)
    idx = torch.arange(T, device=q.device)
    valid = idx[None, :] < lens.to(q.device)[:, None]                     # [B, T]
    gather = (starts[:, None] + idx[None, :]).clamp_max(N - 1)            # [B, T]

    def pad(x):
        return x[gather].transpose(1, 2)                                  # [B, H, T, D]

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, scale=scale,
                                         enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)[valid]                                     # [N, Hq, D]
