"""CUDA attention kernels (kv_append, paged decode, paged chunk prefill) against the references.

Every check draws fresh random inputs, scatters sequences over shuffled pages of a pool whose
page stride is larger than one page of one layer (the shared pool interleaves layers and K/V),
fills the unused slots with large garbage and the unused block-table entries with -1, poisons the
output with NaN, and compares with the float32 reference by ||out - ref|| / ||ref||.

The kernels accept a float32 ``out`` for bf16/fp16 inputs: that measures the kernel's own
arithmetic (the issue's 2e-3 for bf16). In the native dtype the output's rounding alone costs
~1.7e-3 for bf16, so that check allows the reference's own rounding error on top.
"""
from __future__ import annotations

import math

import pytest
import torch

from oppo_runtime.ops import attention as A
from _scripts import prefill_item_coords

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL_F32_OUT = {torch.bfloat16: 2e-3, torch.float16: 1e-3}
GARBAGE = 50.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class PagedKV:
    """K/V caches of one layer as strided views of a pool page [layers, 2, block_size, Hkv, D]."""

    def __init__(self, num_blocks, block_size, Hkv, D, dtype, layers=2, layer=1, seed=None, head_major=False):
        g = torch.Generator(device="cuda")
        g.manual_seed(seed if seed is not None else torch.seed() % (2**31))
        page_elems = layers * 2 * block_size * Hkv * D
        self.pool = (torch.rand(num_blocks, page_elems, device="cuda", generator=g) * 2 - 1).mul_(GARBAGE).to(dtype)
        one = block_size * Hkv * D
        shape, stride = (num_blocks, block_size, Hkv, D), (page_elems, Hkv * D, D, 1)
        if head_major:   # pages [Hkv, block_size, D] viewed as [block_size, Hkv, D] (decode only)
            stride = (page_elems, D, block_size * D, 1)
        self.k = self.pool.as_strided(shape, stride, (2 * layer) * one)
        self.v = self.pool.as_strided(shape, stride, (2 * layer + 1) * one)
        self.block_size, self.num_blocks, self.g = block_size, num_blocks, g

    def tables(self, lens, extra_blocks=1):
        """Shuffled pages for sequences of the given lengths; unused entries -1."""
        bs = self.block_size
        need = [math.ceil(n / bs) for n in lens]
        width = max(need + [1]) + extra_blocks
        assert sum(need) <= self.num_blocks
        perm = torch.randperm(self.num_blocks, device="cuda", generator=self.g)
        bt = torch.full((len(lens), width), -1, dtype=torch.int32, device="cuda")
        at = 0
        for b, k in enumerate(need):
            bt[b, :k] = perm[at:at + k].to(torch.int32)
            at += k
        return bt

    def fill(self, bt, lens, scale=1.0):
        """Random values in the used slots of every sequence (garbage stays elsewhere)."""
        bs = self.block_size
        for b, n in enumerate(lens):
            if n == 0:
                continue
            pos = torch.arange(n, device="cuda")
            blocks = bt[b, pos // bs].long()
            for c in (self.k, self.v):
                c[blocks, pos % bs] = (torch.randn(n, *c.shape[2:], device="cuda", generator=self.g) * scale).to(c.dtype)


def _ref_tables(bt):
    return bt.clamp_min(0)   # the reference gathers every row up to max_len; -1 entries are never used


# ----------------------------------------------------------------------------- kv_append
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size,Hkv,D", [(16, 8, 128), (8, 2, 64), (48, 3, 40)])
def test_kv_append_matches_reference(dtype, idx_dtype, block_size, Hkv, D):
    kv = PagedKV(num_blocks=37, block_size=block_size, Hkv=Hkv, D=D, dtype=dtype)
    N = min(301, 37 * block_size)
    slots = torch.randperm(37 * block_size, device="cuda")[:N]
    slots[torch.rand(N, device="cuda") < 0.2] = -1
    slots = slots.to(idx_dtype)
    key = torch.randn(N, Hkv, D, device="cuda").to(dtype)
    value = torch.randn(N, Hkv, D, device="cuda").to(dtype)
    pool_ref = kv.pool.clone()
    k_ref = pool_ref.as_strided(kv.k.shape, kv.k.stride(), kv.k.storage_offset())
    v_ref = pool_ref.as_strided(kv.v.shape, kv.v.stride(), kv.v.storage_offset())
    A.kv_append_ref(key, value, k_ref, v_ref, slots)
    A.kv_append(key, value, kv.k, kv.v, slots, backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(kv.pool, pool_ref)


def test_kv_append_strided_rows():
    kv = PagedKV(num_blocks=9, block_size=16, Hkv=4, D=64, dtype=torch.bfloat16)
    big = torch.randn(50, 3, 4, 64, device="cuda").bfloat16()
    key, value = big[:, 0], big[:, 2]                       # row stride 3*4*64
    slots = torch.randperm(9 * 16, device="cuda")[:50].to(torch.int32)
    pool_ref = kv.pool.clone()
    k_ref = pool_ref.as_strided(kv.k.shape, kv.k.stride(), kv.k.storage_offset())
    v_ref = pool_ref.as_strided(kv.v.shape, kv.v.stride(), kv.v.storage_offset())
    A.kv_append_ref(key, value, k_ref, v_ref, slots)
    A.kv_append(key, value, kv.k, kv.v, slots, backend="cuda")
    assert torch.equal(kv.pool, pool_ref)


# ----------------------------------------------------------------------------- decode
def _decode_run(B, Hq, Hkv, D, block_size, lens, dtype, out_dtype, extra_blocks=1, scale=None, head_major=False,
                max_partition=0):
    """Kernel vs reference on fresh pages; also the bytes of workspace the call allocated (0: no split)."""
    kv = PagedKV(num_blocks=sum(math.ceil(n / block_size) for n in lens) + 7, block_size=block_size,
                 Hkv=Hkv, D=D, dtype=dtype, head_major=head_major)
    bt = kv.tables(lens, extra_blocks=extra_blocks)
    kv.fill(bt, lens)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda").to(dtype)
    scale = D ** -0.5 if scale is None else scale
    out = torch.full((B, Hq, D), float("nan"), device="cuda", dtype=out_dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["requested_bytes.all.current"]
    torch.cuda.reset_peak_memory_stats()
    A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, scale, out=out, backend="cuda", max_partition=max_partition)
    torch.cuda.synchronize()
    ws = torch.cuda.memory_stats()["requested_bytes.all.peak"] - before   # bytes requested, unrounded
    ref = A.paged_decode_attention_ref(q, kv.k, kv.v, _ref_tables(bt), ctx, scale,
                                       out=torch.empty(B, Hq, D, device="cuda"))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    return out, ref, ws


def _decode_case(B, Hq, Hkv, D, block_size, lens, dtype, out_dtype):
    out, ref, _ = _decode_run(B, Hq, Hkv, D, block_size, lens, dtype, out_dtype)
    return out, ref


def _plan(B, Hq, Hkv, D, table_tokens, plan=None):
    """The launcher's (num_splits, partition), from the Python mirror (used to place contexts)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return A.paged_decode_plan(B, Hq, Hkv, D, table_tokens, sms, A.paged_decode_resident_ctas(D, plan=plan), plan)


def _ws_expected(B, Hq, D, splits, counters=0):
    """Workspace bytes the launcher requests for a plan: float o [B, Hq, S, D] + lse [B, Hq, S]
    when split, + the uint32 counters of v4/v5 where they live in the workspace (``_counters``)."""
    return ((B * Hq * splits * (D + 1) if splits > 1 else 0) + counters) * 4


def _counters(plan, groups, splits):
    """Counters of a v4/v5/v7 launch: one ticket per group when split, + (v5) claim and exit."""
    if plan not in ("v4", "v5", "v7"):
        return 0
    return (groups if splits > 1 else 0) + (2 if plan == "v5" else 0)


def _use_plan(monkeypatch, plan, tickets=None):
    """Select the launcher's plan (read at every call) and, for v4, where its ticket counters live."""
    monkeypatch.setenv("OPPO_DECODE_PLAN", plan)
    if tickets is None:
        monkeypatch.delenv("OPPO_DECODE_TICKETS", raising=False)
    else:
        monkeypatch.setenv("OPPO_DECODE_TICKETS", tickets)


PLANS = ["v3", "v4", "v5", "v6", "v7"]


DECODE_SHAPES = [  # B, Hq, Hkv, D, block_size, max_len
    (5, 32, 8, 128, 16, 700),
    (7, 14, 2, 64, 16, 300),
    (3, 28, 4, 128, 8, 1000),     # G = 7
    (4, 8, 8, 64, 64, 513),       # G = 1
    (2, 64, 8, 128, 256, 2100),   # G = 8, big pages
    (3, 40, 2, 64, 48, 400),      # G = 20 (> 16: two head chunks), page size not a power of two
    (33, 16, 4, 128, 32, 90),
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_kernel_error_in_float32_out(monkeypatch, plan, dtype, shape):
    _use_plan(monkeypatch, plan)
    B, Hq, Hkv, D, bs, max_len = shape
    lens = torch.randint(1, max_len + 1, (B,)).tolist()
    lens[0] = max_len
    out, ref = _decode_case(B, Hq, Hkv, D, bs, lens, dtype, torch.float32)
    assert rel_err(out, ref) < TOL_F32_OUT[dtype]


@pytest.mark.parametrize("cap", [64, 200, 512])
@pytest.mark.parametrize("shape", [DECODE_SHAPES[i] for i in (0, 1, 2, 4, 5)])
def test_decode_max_partition_on_ragged_contexts(monkeypatch, cap, shape):
    """The engine's cap on tokens per split (max_partition; 200 rounds up to 256): one long context
    among short ones gets many splits, most of them past a short context's end (those CTAs exit at
    once and the reduction skips them). Float32 out against the reference; the workspace the call
    took is the mirror's plan with the cap (more splits than without it)."""
    _use_plan(monkeypatch, "v3")
    B, Hq, Hkv, D, bs, max_len = shape
    lens = torch.randint(1, max(2, max_len // 6), (B,)).tolist()
    lens[0] = max_len
    out, ref, ws = _decode_run(B, Hq, Hkv, D, bs, lens, torch.bfloat16, torch.float32, max_partition=cap)
    assert rel_err(out, ref) < TOL_F32_OUT[torch.bfloat16]
    table = (math.ceil(max_len / bs) + 1) * bs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits, part = A.paged_decode_plan(B, Hq, Hkv, D, table, sms, A.paged_decode_resident_ctas(D, plan="v3"), "v3",
                                       max_partition=cap)
    assert splits == max(_plan(B, Hq, Hkv, D, table, "v3")[0], math.ceil(table / (math.ceil(cap / 64) * 64)))
    assert part <= math.ceil(cap / 64) * 64 or splits == 1
    assert ws == _ws_expected(B, Hq, D, splits)


def test_decode_max_partition_graph_replay_with_caller_workspace(monkeypatch):
    """As the engine runs it: captured with the cap and a workspace sized for it, replayed on new
    context lengths (poisoned output each time)."""
    _use_plan(monkeypatch, "v3")
    B, Hq, Hkv, D, bs, max_len = 6, 14, 2, 64, 16, 1500
    kv = PagedKV(num_blocks=B * math.ceil(max_len / bs) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    full = [max_len] * B
    bt = kv.tables(full)
    kv.fill(bt, full)
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    out = torch.empty(B, Hq, D, device="cuda")
    ctx = torch.tensor([1500, 3, 200, 1, 64, 700], dtype=torch.int32, device="cuda")
    ws = A.paged_decode_workspace(q, kv.k, bt, backend="cuda", max_partition=256)
    assert ws is not None and ws.numel() >= B * Hq * 6 * (D + 1)       # >= 6 splits of 256 tokens
    A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, 0.125, out=out, backend="cuda", workspace=ws,
                             max_partition=256)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, 0.125, out=out, backend="cuda", workspace=ws,
                                 max_partition=256)
    for new in ([1, 1500, 257, 256, 255, 9], [700, 700, 1499, 2, 513, 1024]):
        ctx.copy_(torch.tensor(new, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        ref = A.paged_decode_attention_ref(q, kv.k, kv.v, bt, ctx, 0.125, out=torch.empty_like(out))
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("shape", [DECODE_SHAPES[i] for i in (0, 1, 2, 4, 5)])
def test_decode_head_major_pages(monkeypatch, plan, shape):
    """Pages laid out [Hkv, block_size, D] (viewed [block_size, Hkv, D]): the kernels take the token
    and head strides from the cache, so the layout A/B of bench/decode_attention.py --head-major
    times a correct kernel. Splits included (the 2100-token case)."""
    _use_plan(monkeypatch, plan)
    B, Hq, Hkv, D, bs, max_len = shape
    lens = torch.randint(1, max_len + 1, (B,)).tolist()
    lens[0] = max_len
    out, ref, _ = _decode_run(B, Hq, Hkv, D, bs, lens, torch.bfloat16, torch.float32, head_major=True)
    assert rel_err(out, ref) < TOL_F32_OUT[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", DECODE_SHAPES[:4])
def test_decode_native_dtype_output(dtype, shape):
    B, Hq, Hkv, D, bs, max_len = shape
    lens = torch.randint(1, max_len + 1, (B,)).tolist()
    out, ref = _decode_case(B, Hq, Hkv, D, bs, lens, dtype, dtype)
    rounding = rel_err(ref.to(dtype), ref)
    assert rel_err(out, ref) < rounding + TOL_F32_OUT[dtype]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("D", [64, 128])
def test_decode_long_context_splits(monkeypatch, plan, D):
    """B=1, 32k: the most splits (v4: 32-way last-CTA merge on an H100)."""
    _use_plan(monkeypatch, plan)
    assert _plan(1, 32, 8, D, 32768, plan)[0] > 1
    out, ref = _decode_case(1, 32, 8, D, 16, [32768 - 5], torch.bfloat16, torch.float32)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("plan", PLANS)
def test_decode_many_short_and_empty_contexts(monkeypatch, plan):
    _use_plan(monkeypatch, plan)
    lens = [0, 1, 2, 15, 16, 17, 0, 64, 65, 1]
    out, ref = _decode_case(len(lens), 16, 2, 128, 16, lens, torch.bfloat16, torch.float32)
    assert rel_err(out, ref) < 2e-3
    assert (out[0] == 0).all() and (out[6] == 0).all()


@pytest.mark.parametrize("plan", PLANS)
def test_decode_table_wider_than_contexts(monkeypatch, plan):
    """A wide (padded) block table plans many splits; most are empty for short contexts (v4, v7:
    their CTAs take no ticket; a context within split 0 is written by that CTA directly; a context
    of 0 has no split with keys: its output is zeros)."""
    _use_plan(monkeypatch, plan)
    B, Hq, Hkv, D, bs = 4, 8, 2, 128, 16
    lens = [5, 300, 77, 0]
    kv = PagedKV(num_blocks=300, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables(lens, extra_blocks=250)
    kv.fill(bt, lens)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    out = torch.full((B, Hq, D), float("nan"), device="cuda")
    A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, 0.1, out=out, backend="cuda")
    ref = A.paged_decode_attention_ref(q, kv.k, kv.v, _ref_tables(bt), ctx, 0.1, out=torch.empty_like(out))
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3
    assert (out[3] == 0).all()


def _check_decode_graph_replay(kv, bt, ctx, Hq, scale, min_ctx, max_len, caller_workspace=False):
    """Capture the decode op once (after an eager warm-up), then replay it three times on new
    queries and context lengths in [min_ctx, max_len], each against the fp32 reference.
    ``caller_workspace``: the split-KV scratch from paged_decode_workspace, poisoned with NaN."""
    B, D = ctx.shape[0], kv.k.shape[-1]
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    out = torch.empty(B, Hq, D, device="cuda", dtype=torch.float32)
    ws = None
    if caller_workspace:
        ws = A.paged_decode_workspace(q, kv.k, bt, backend="cuda")
        assert ws is not None, "this shape is meant to split"
        ws.fill_(float("nan"))
    A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, scale, out=out, backend="cuda", workspace=ws)   # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, scale, out=out, backend="cuda", workspace=ws)
    for _ in range(3):
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        ctx.copy_(torch.randint(min_ctx, max_len + 1, (B,), dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        ref = A.paged_decode_attention_ref(q, kv.k, kv.v, bt, ctx, scale, out=torch.empty_like(out))
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("plan,tickets,caller_ws", [("v3", None, False), ("v3", None, True), ("v4", None, False),
                                                     ("v4", "memset", False), ("v4", "memset", True),
                                                     ("v5", None, False), ("v5", "memset", True),
                                                     ("v7", None, False), ("v7", None, True), ("v7", "memset", True)])
def test_decode_cuda_graph_replay(monkeypatch, plan, tickets, caller_ws):
    """Captured once, replayed on new queries and new context lengths (workspace inside, or the
    caller's). v4: the replays run back to back on the same ticket counters (each must leave them
    at 0), from the launcher's pool or (memset) in the workspace, zeroed by a captured memset."""
    _use_plan(monkeypatch, plan, tickets)
    B, Hq, Hkv, D, bs = 4, 32, 8, 128, 16
    max_len = 2000
    kv = PagedKV(num_blocks=B * math.ceil(max_len / bs) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    full = [max_len] * B
    bt = kv.tables(full)
    kv.fill(bt, full)
    ctx = torch.tensor([1000, 3, 1999, 640], dtype=torch.int32, device="cuda")
    _check_decode_graph_replay(kv, bt, ctx, Hq, 0.088, min_ctx=1, max_len=max_len, caller_workspace=caller_ws)


def _full_width_case(lens, Hkv, D, table, bs):
    """bf16 K/V of sequences of `lens` tokens on shuffled pages, block tables `table` tokens wide
    (the plan sees the width, not the lengths), and the context lengths on the device."""
    kv = PagedKV(num_blocks=sum(math.ceil(n / bs) for n in lens) + 7, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables(lens, extra_blocks=table // bs - max(math.ceil(n / bs) for n in lens))
    kv.fill(bt, lens)
    return kv, bt, torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [(1, 32, 8, 128, 32768), (3, 14, 2, 64, 2048)])
def test_decode_caller_workspace_allocates_nothing(monkeypatch, plan, B, Hq, Hkv, D, table):
    """With ``out`` and the caller's workspace the op allocates nothing (#7: workspace from the
    caller), reads none of the workspace's stale contents (poisoned), and gives bit for bit the
    result of the call that allocates its own. The size op agrees with the plan mirror."""
    _use_plan(monkeypatch, plan)
    bs = 16
    lens = [table - 5 - 333 * b for b in range(B)]
    kv, bt, ctx = _full_width_case(lens, Hkv, D, table, bs)
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    ws = A.paged_decode_workspace(q, kv.k, bt, backend="cuda")
    splits, _ = _plan(B, Hq, Hkv, D, bt.shape[1] * bs, plan)
    assert splits > 1 and ws is not None
    groups = B * Hkv * math.ceil(Hq // Hkv / 16)
    assert ws.numel() * 4 == _ws_expected(B, Hq, D, splits, _counters(plan, groups, splits))
    ws.fill_(float("nan"))
    own = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda")
    out = torch.full_like(q, float("nan"))
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, out=out, backend="cuda", workspace=ws)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, "the op allocated"
    assert torch.equal(out, own)
    ref = A.paged_decode_attention_ref(q, kv.k, kv.v, _ref_tables(bt), ctx, D ** -0.5,
                                       out=torch.empty(B, Hq, D, device="cuda"))
    assert rel_err(out.float(), ref) < 1e-2   # bf16 output: the reference's own rounding on top


@pytest.mark.parametrize("plan", ["v3", "v6"])
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [(1, 32, 8, 128, 32768), (3, 14, 2, 64, 2048)])
def test_decode_cta_stamps_cover_every_cta_and_change_nothing(monkeypatch, plan, B, Hq, Hkv, D, table):
    """decode_cta_stamps: every CTA of the split kernel's grid (the plan mirror's count) writes its
    row (start <= end, a real SM id, its SM cycles in the upper half) and no row past the grid, empty
    splits included; the output is bit for bit the unstamped call's, also replayed in a graph
    captured outside the block; after the block, launches write nothing; a capacity below the grid
    is not overrun (memcheck: bench/sanitize_attention.py's stamps case); the switch is refused
    under capture."""
    _use_plan(monkeypatch, plan)
    bs = 16
    lens = [table - 5 - 700 * b for b in range(B)]   # the last sequences' tail splits are empty
    kv, bt, ctx = _full_width_case(lens, Hkv, D, table, bs)
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    splits, _ = _plan(B, Hq, Hkv, D, bt.shape[1] * bs, plan)
    ctas = splits * Hkv * math.ceil(Hq // Hkv / 16) * B
    ws = A.paged_decode_workspace(q, kv.k, bt, backend="cuda")
    plain = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda", workspace=ws)
    out = torch.full_like(q, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, out=out, backend="cuda", workspace=ws)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with A.decode_cta_stamps(ctas + 5) as stamps:
        stamped = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda", workspace=ws)
        torch.cuda.synchronize()
        s = stamps.cpu()
        stamps.zero_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        s_graph = stamps.cpu()
    assert torch.equal(stamped, plain) and torch.equal(out, plain)
    for rows in (s, s_graph):
        ran = rows[:ctas]
        assert bool((ran[:, 0] > 0).all() and (ran[:, 1] >= ran[:, 0]).all()), ran
        sm, cycles = ran[:, 2] & 0xFFFFFFFF, ran[:, 2] >> 32             # SM id | SM cycles << 32
        assert bool(((sm >= 0) & (sm < sms)).all()), ran
        assert int((ran[:, 1] - ran[:, 0]).max()) < 10**9                   # ns, not garbage
        assert bool((cycles > 0).all()), ran
        ns = (ran[:, 1] - ran[:, 0]).double()
        mhz = (cycles.double() / ns * 1e3)[ns >= 2000]                     # units: cycles over ns, not garbage
        assert bool(((mhz > 50) & (mhz < 10000)).all()), mhz
        assert not rows[ctas:].any(), "a row past the grid was written"
    stamps.zero_()
    A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda", workspace=ws)
    torch.cuda.synchronize()
    assert not stamps.any(), "stamps written after the block"
    with A.decode_cta_stamps(2) as few:                               # capacity below the grid: no overrun
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda", workspace=ws)
        torch.cuda.synchronize()
        assert bool((few[:, 1] > 0).all())
        with pytest.raises(RuntimeError, match="capture"):      # the switch is refused under capture
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                torch.ops.oppo.decode_cta_stamps(few)


@pytest.mark.parametrize("plan", ["v7", "v3"])
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [(1, 32, 8, 128, 32768), (3, 14, 2, 64, 2048)])
def test_decode_tile_stamps_follow_each_cta_and_change_nothing(monkeypatch, plan, B, Hq, Hkv, D, table):
    """decode_tile_stamps (bench/decode_tiles.py): the kernel instantiated with them gives bit for
    bit the plain kernel's output; each CTA of the grid with part of a context writes its events in
    order (start, loads issued, tiles 0, 1, ... landed, loop end, stored, end), at non-decreasing
    times on one SM, one row per tile of its split (the plan mirror's partition; past its rows the
    landings dropped and the end kept); splits past a
    context write nothing; with plan v7 and a split group exactly one CTA per group merges (end's
    tile 1). fp16 is a clear error; after the block launches write nothing."""
    _use_plan(monkeypatch, plan)
    bs = 16
    lens = [table - 5 - 700 * b for b in range(B)]
    kv, bt, ctx = _full_width_case(lens, Hkv, D, table, bs)
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    splits, part = _plan(B, Hq, Hkv, D, bt.shape[1] * bs, plan)
    groups = Hkv * math.ceil(Hq // Hkv / 16)
    ws = A.paged_decode_workspace(q, kv.k, bt, backend="cuda")
    plain = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda", workspace=ws)
    rows_per = A.TILE_STAMP_ROWS
    with A.decode_tile_stamps(splits * groups * B * rows_per) as stamps:
        stamped = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda", workspace=ws)
        torch.cuda.synchronize()
        st = stamps.cpu().view(-1, rows_per, 3)
        with pytest.raises(RuntimeError, match="bf16 only"):
            A.paged_decode_attention(q.half(), kv.k.half(), kv.v.half(), bt, ctx, D ** -0.5, backend="cuda")
    assert torch.equal(stamped, plain)
    merges = {}
    for c in range(splits * groups * B):
        g, b, split = c % groups, (c // groups) % B, c // (groups * B)      # grid (groups, B, splits)
        start, end = split * part, min(lens[b], split * part + part) if splits > 1 else lens[b]
        cta = st[c]
        if splits > 1 and start >= lens[b]:   # a split past its context: its start only
            assert int(cta[0, 1]) == 0 and int(cta[0, 0]) > 0 and not cta[1:].any(), (c, cta[:3].tolist())
            continue
        n = min(math.ceil((end - start) / 64), rows_per - 5)     # later landings dropped, the end kept
        ev = [int(e) & 0xFF for e in cta[:, 1]]
        tiles = [int(e) >> 8 for e in cta[:, 1]]
        want = [0, 1] + [2] * n + [3, 4, 5]
        assert ev[:len(want)] == want and not cta[len(want):].any(), (c, ev[:len(want) + 2])
        assert tiles[2:2 + n] == list(range(n)), (c, tiles[:n + 2])
        t = cta[:len(want), 0]
        assert bool((t[1:] >= t[:-1]).all()) and int(t[0]) > 0, (c, t.tolist())
        assert len({int(x) for x in cta[:len(want), 2]}) == 1, f"CTA {c} on several SMs"
        merges[(b, g)] = merges.get((b, g), 0) + tiles[len(want) - 1]
    if plan == "v7" and splits > 1:
        assert all(m == 1 for (b, g), m in merges.items() if lens[b] > part), merges
    stamps.zero_()
    A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda", workspace=ws)
    torch.cuda.synchronize()
    assert not stamps.any(), "stamps written after the block"


def test_decode_loads_only_diagnostic_reaches_the_kernel_and_warns(monkeypatch):
    """OPPO_DECODE_DIAG_LOADS_ONLY=1 (bench/decode_attention.py's +lo: the split kernel's loads
    without its arithmetic) must reach the kernel, or an A/B of it times the default twice (the
    session-21 accident): its output differs from the default's, which matches the reference, and
    the Python face warns that the output is wrong."""
    _use_plan(monkeypatch, "v7")
    B, Hq, Hkv, D, bs = 2, 14, 2, 64, 16
    lens = [700, 129]
    kv, bt, ctx = _full_width_case(lens, Hkv, D, 1024, bs)
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    good = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda")
    ref = A.paged_decode_attention_ref(q.float(), kv.k.float(), kv.v.float(), bt, ctx, D ** -0.5)
    assert float((good.float() - ref).norm() / ref.norm()) < 2e-3
    monkeypatch.setenv("OPPO_DECODE_DIAG_LOADS_ONLY", "1")
    A._warn_loads_only.cache_clear()
    with pytest.warns(RuntimeWarning, match="outputs are wrong"):
        bad = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda")
    assert not torch.equal(bad, good)


def _switch_runs(monkeypatch, switch, mode, q, kv, bt, ctx, scale):
    """Decode attention (float32 out) with `switch`=0, and with `switch`=1 into NaN-poisoned outputs
    with the caller's workspace: once eagerly, or (mode "graph") captured and replayed twice on the
    state the first replay left. Returns (the switch-off output, [the switch-on outputs])."""
    monkeypatch.setenv(switch, "0")
    base = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, scale, out=torch.empty_like(q, dtype=torch.float32),
                                    backend="cuda")
    monkeypatch.setenv(switch, "1")
    ws = A.paged_decode_workspace(q, kv.k, bt, backend="cuda")
    out = torch.full_like(base, float("nan"))
    if mode == "eager":
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, scale, out=out, backend="cuda", workspace=ws)
        return base, [out.clone()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, scale, out=out, backend="cuda", workspace=ws)
    runs = []
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        runs.append(out.clone())
    return base, runs


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [(1, 32, 8, 128, 32768), (5, 32, 8, 128, 4096), (3, 14, 2, 64, 2048)])
def test_decode_fast_merge_keeps_the_error(monkeypatch, mode, B, Hq, Hkv, D, table):
    """OPPO_DECODE_FAST_MERGE=1 (the default; v7's split merge: the group's ticket by one
    atom.acq_rel.gpu, no __threadfence, and at D=128 the partials' loads in batches of 32) against
    OPPO_DECODE_FAST_MERGE=0 (two fences, batches of 16): on split shapes with ragged
    contexts (one within split 0), float32 out within 2e-3 of the fp32 reference and within 1e-5
    of the default merge (the batches reorder only the merge's sums), eagerly and from a graph
    replayed twice on the counters the first replay left."""
    _use_plan(monkeypatch, "v7")
    bs = 16
    lens = [max(1, table - 5 - 1500 * b) for b in range(B)]
    kv, bt, ctx = _full_width_case(lens, Hkv, D, table, bs)
    assert _plan(B, Hq, Hkv, D, bt.shape[1] * bs, "v7")[0] > 1
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    ref = A.paged_decode_attention_ref(q.float(), kv.k.float(), kv.v.float(), bt, ctx, D ** -0.5)
    base, runs = _switch_runs(monkeypatch, "OPPO_DECODE_FAST_MERGE", mode, q, kv, bt, ctx, D ** -0.5)
    for got in runs:
        assert torch.isfinite(got).all()
        assert float((got - ref).norm() / ref.norm()) < 2e-3
        assert float((got - base).norm() / base.norm()) < 1e-5


def _ragged_switch_case(B, Hq, Hkv, D, table, lens, dtype):
    """A decode case for the switch tests: `lens` (default: from table - 5 down by 1500 a sequence;
    0 = an empty context) on shuffled 16-token pages, tables `table` tokens wide; q, and the fp32
    reference. Returns (kv, block tables, context lens, q, reference)."""
    bs = 16
    lens = lens or [max(1, table - 5 - 1500 * b) for b in range(B)]
    kv = PagedKV(num_blocks=sum(math.ceil(max(n, 1) / bs) for n in lens) + 7, block_size=bs, Hkv=Hkv, D=D, dtype=dtype)
    bt = kv.tables([max(n, 1) for n in lens], extra_blocks=table // bs - max(math.ceil(max(n, 1) / bs) for n in lens))
    kv.fill(bt, [max(n, 1) for n in lens])
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda").to(dtype)
    ref = A.paged_decode_attention_ref(q.float(), kv.k.float(), kv.v.float(), _ref_tables(bt), ctx, D ** -0.5)
    return kv, bt, ctx, q, ref


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("plan", ["v3", "v7"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,table,lens", [
    (1, 32, 8, 32768, None),                                  # 32 splits, one group
    (5, 32, 8, 4096, None),                                   # ragged, one context within split 0
    (6, 28, 4, 1024, [1, 37, 64, 129, 191, 1000]),            # G=7; 1 to 4 tiles: shorter than the pipeline
    (4, 8, 8, 512, [0, 17, 300, 512]),                        # G=1, an empty context
])
def test_decode_reg_stage_is_the_default_bit_for_bit(monkeypatch, mode, plan, dtype, B, Hq, Hkv, table, lens):
    """OPPO_DECODE_REG_STAGE=1 (the split kernel's register-staged loader at head dim 128: tiles from
    the third on through registers and st.shared, Q's fragments read from shared memory at every
    tile) computes the same arithmetic on the same tiles as the cp.async loader: its output equals
    the default's bit for bit and is within 2e-3 of the fp32 reference, on shuffled pages, ragged
    contexts (empty, one token, shorter than the pipeline, not multiples of the page), split and
    not, bf16 and fp16, NaN-poisoned outputs, eagerly and from a graph replayed twice. At head dim
    64 it is a clear error, not a silent fallback."""
    _use_plan(monkeypatch, plan)
    monkeypatch.setenv("OPPO_DECODE_HEADS_AS_N", "0")   # the 16-row form on both sides (reg staging's)
    D, bs = 128, 16
    kv, bt, ctx, q, ref = _ragged_switch_case(B, Hq, Hkv, D, table, lens, dtype)
    base, runs = _switch_runs(monkeypatch, "OPPO_DECODE_REG_STAGE", mode, q, kv, bt, ctx, D ** -0.5)
    for got in runs:
        assert torch.equal(got, base)
        assert float((got - ref).norm() / ref.norm()) < 2e-3
    q64 = torch.randn(B, Hq, 64, device="cuda").to(dtype)
    kv64 = PagedKV(num_blocks=4, block_size=bs, Hkv=Hkv, D=64, dtype=dtype)
    with pytest.raises(RuntimeError, match="head dim 128 only"):
        A.paged_decode_attention(q64, kv64.k, kv64.v, torch.zeros_like(bt), ctx.clamp_max(bs), 0.125, backend="cuda")


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("plan", ["v3", "v7"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,D,table,lens", [
    (1, 32, 8, 128, 32768, None),                             # G=4, 32 splits, one group
    (5, 32, 8, 128, 4096, None),                              # ragged, one context within split 0
    (6, 28, 4, 64, 1024, [1, 37, 64, 129, 191, 1000]),        # G=7; 1 to 4 tiles: shorter than the pipeline
    (3, 14, 2, 64, 2048, [2048, 1999, 1]),                    # G=7 at head dim 64, split
    (4, 8, 8, 128, 512, [0, 17, 300, 512]),                   # G=1, an empty context
    (5, 16, 16, 64, 1024, [1, 63, 64, 555, 1024]),            # G=1 at head dim 64 (default since session 28)
    (2, 16, 2, 64, 704, [700, 333]),                          # G=8 (a context not a multiple of the page)
])
def test_decode_heads_as_n_keeps_the_error(monkeypatch, mode, plan, dtype, B, Hq, Hkv, D, table, lens):
    """OPPO_DECODE_HEADS_AS_N=1 (the split kernel's tiles with the heads as the mma's N: S^T = K Q^T,
    O^T += V^T P^T, P^T by movmatrix; groups of <= 8 query heads) against the default 16-row form on
    the same pages: float32 out within 2e-3 of the fp32 reference and within 1e-3 of the default (the
    same products, summed in another order), on shuffled pages, ragged contexts (empty, one token,
    shorter than the pipeline, not multiples of the page), G = 1, 4, 7 and 8, split and not, bf16 and
    fp16, NaN-poisoned outputs, eagerly and from a graph replayed twice. A group of more than 8 heads
    is a clear error, not a silent fallback."""
    _use_plan(monkeypatch, plan)
    kv, bt, ctx, q, ref = _ragged_switch_case(B, Hq, Hkv, D, table, lens, dtype)
    base, runs = _switch_runs(monkeypatch, "OPPO_DECODE_HEADS_AS_N", mode, q, kv, bt, ctx, D ** -0.5)
    for got in runs:
        assert torch.isfinite(got).all()
        assert float((got - ref).norm() / ref.norm()) < 2e-3
        assert float((got - base).norm() / base.norm()) < 1e-3
    q16 = torch.randn(B, 16 * Hkv, D, device="cuda").to(dtype)
    with pytest.raises(RuntimeError, match="at most 8 query heads"):
        A.paged_decode_attention(q16, kv.k, kv.v, bt, ctx, D ** -0.5, backend="cuda")


@pytest.mark.parametrize("plan", ["v3", "v7", "v6"])
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [
    (3, 8, 8, 128, 4096),      # G=1 (the N form since session 28)
    (4, 16, 16, 64, 1024),     # G=1 at head dim 64
    (3, 16, 8, 128, 4096),     # G=2
    (1, 32, 8, 128, 32768),    # G=4, split
    (6, 14, 2, 64, 2048),      # G=7 (Qwen2.5)
    (4, 16, 2, 64, 1024),      # G=8
    (2, 32, 2, 64, 1024),      # G=16: the 16-row form, no error
])
def test_decode_heads_as_n_is_the_default_for_groups_of_1_to_8(monkeypatch, plan, B, Hq, Hkv, D, table):
    """OPPO_DECODE_HEADS_AS_N unset (the runtime's default: groups of 2..8 since session 27, G = 1 since
    session 28) runs the heads-as-N tiles for groups of 1..8 query heads with plans v3 and v7: bit for
    bit the output of =1, and not that of =0; with G = 16 or plan v6 it runs the 16-row form (bit for
    bit =0's), without an error."""
    _use_plan(monkeypatch, plan)
    kv, bt, ctx, q, ref = _ragged_switch_case(B, Hq, Hkv, D, table, None, torch.bfloat16)

    def run(value):
        if value is None:
            monkeypatch.delenv("OPPO_DECODE_HEADS_AS_N", raising=False)
        else:
            monkeypatch.setenv("OPPO_DECODE_HEADS_AS_N", value)
        out = torch.full((B, Hq, D), float("nan"), device="cuda")
        return A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, out=out, backend="cuda")

    default, off = run(None), run("0")
    assert float((default - ref).norm() / ref.norm()) < 2e-3
    if 1 <= Hq // Hkv <= 8 and plan != "v6":
        on = run("1")
        assert not torch.equal(on, off)    # the two forms sum in another order: the check below can fail
        assert torch.equal(default, on)
    else:
        assert torch.equal(default, off)


@pytest.mark.parametrize("switch", ["OPPO_DECODE_PDL", "OPPO_DECODE_PREFETCH=1", "OPPO_DECODE_PREFETCH=2",
                                    "OPPO_DECODE_REFILL", "both"])
@pytest.mark.parametrize("plan", ["v3", "v6", "v7"])
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [(1, 32, 8, 128, 32768), (3, 14, 2, 64, 2048), (40, 14, 2, 64, 512)])
def test_decode_pdl_waits_for_the_kernel_ahead(monkeypatch, switch, plan, B, Hq, Hkv, D, table):
    """OPPO_DECODE_PDL=1 (programmatic dependent launch of the split kernel and its reduction): a
    chain in which each call's q is the previous call's output (attention right after attention:
    the kernel ahead lets its dependents be scheduled before it has written its output), with a
    K/V append between some calls, gives bit for bit the chain without PDL, eagerly and replayed
    from a CUDA graph (programmatic edges). Split and unsplit plans, empty splits included. The
    same for OPPO_DECODE_PREFETCH=1 and 2 (L2 prefetch of the next tiles' rows: a hint, no result
    changes), OPPO_DECODE_REFILL=1 (the stages refilled earlier: the same tiles in the same order)
    and PDL with the prefetch of 2 at once."""
    switches = ["OPPO_DECODE_PDL", "OPPO_DECODE_PREFETCH=2"] if switch == "both" else [switch]
    _use_plan(monkeypatch, plan)
    bs = 16
    lens = [max(1, table - 5 - 700 * b) for b in range(B)]
    kv, bt, ctx = _full_width_case(lens, Hkv, D, table, bs)
    # the append rewrites each sequence's last token (its slot is inside every context)
    last = torch.tensor([int(bt[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)],
                        dtype=torch.int32, device="cuda")
    q0 = torch.randn(B, Hq, D, device="cuda").bfloat16()
    kn = torch.randn(B, Hkv, D, device="cuda").bfloat16()
    ws = A.paged_decode_workspace(q0, kv.k, bt, backend="cuda")
    outs = [torch.empty_like(q0) for _ in range(4)]

    def chain():
        q = q0
        for i, o in enumerate(outs):
            A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, out=o, backend="cuda", workspace=ws)
            if i == 1:
                A.kv_append(o[:, :Hkv] + kn, kn, kv.k, kv.v, last, backend="cuda")
            q = o
        return [o.clone() for o in outs]

    pool0 = kv.pool.clone()
    for sw in switches:
        monkeypatch.setenv(sw.split("=")[0], "0")
    want = chain()
    for mode in ("eager", "graph"):
        kv.pool.copy_(pool0)
        for sw in switches:
            name, _, value = sw.partition("=")
            monkeypatch.setenv(name, value or "1")
        if mode == "eager":
            got = chain()
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                chain()
            for o in outs:
                o.fill_(float("nan"))
            kv.pool.copy_(pool0)
            graph.replay()
            torch.cuda.synchronize()
            got = [o.clone() for o in outs]
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"{mode}: call {i} differs with {switches}"


def _late_writer_kernel():
    """A Triton kernel that lets its PDL dependents start at once, then spins ``SPIN_NS`` and only
    then writes q (from a source) and one K/V row per sequence: the kernel ahead of a decode call
    at its worst (the engine's rotary kernel does the same writes in ~3 us, and releases nothing)."""
    import triton
    import triton.language as tl

    @triton.jit
    def late_writer(q_src, q_dst, NQ, k_src, v_src, k_dst, v_dst, dst_off_ptr, NKV, SPIN_NS,
                    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()
        t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        t = t0
        while t - t0 < SPIN_NS:
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                          pack=1)
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_Q)
        tl.store(q_dst + b * NQ + i, tl.load(q_src + b * NQ + i, mask=i < NQ), mask=i < NQ)
        j = tl.arange(0, BLOCK_KV)
        off = tl.load(dst_off_ptr + b)
        tl.store(k_dst + off + j, tl.load(k_src + b * NKV + j, mask=j < NKV), mask=j < NKV)
        tl.store(v_dst + off + j, tl.load(v_src + b * NKV + j, mask=j < NKV), mask=j < NKV)

    return triton, late_writer


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("plan", ["v3", "v7"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,D,table,lens", [
    (1, 32, 8, 128, 32768, [32000]),                          # 32 splits: the new row in the last non-empty one
    (6, 28, 4, 128, 1024, [1, 37, 64, 129, 191, 1000]),       # G=7, ragged: new rows in tiles 0, 0, 0, 2, 2, 15
    (4, 8, 8, 64, 512, [1, 17, 300, 512]),                    # G=1
    (40, 14, 2, 64, 512, [7 + 11 * b for b in range(40)]),    # the engine's head shape, short contexts
])
def test_decode_rope_prologue_is_the_rotary_kernel_then_the_attention(monkeypatch, mode, plan, dtype, B, Hq, Hkv, D,
                                                                      table, lens):
    """OPPO_DECODE_ROPE_IN's kernel (paged_decode_attention_rope: q and the new row's k rotated, k and
    v appended, in the attention kernel's prologue) against the rotary kernel (with its K/V append)
    followed by the attention kernel, on shuffled pages with ragged contexts: the pages bit for bit,
    the output equal and within 2e-3 of the fp32 attention of the same rotated q, eagerly and from a
    graph replayed twice (the pool restored before each replay). The rows the step writes are NaN
    before it (a tile that kept the pages' old row would show it); one sequence's slot is -1 (its
    row is not written, and both read the old one). Plan v4 refuses the prologue."""
    from oppo_runtime.ops.fused import rotary_cos_sin_cache, rotary_qk
    _use_plan(monkeypatch, plan)
    bs = 16
    kv = PagedKV(num_blocks=sum(math.ceil(n / bs) for n in lens) + 7, block_size=bs, Hkv=Hkv, D=D, dtype=dtype)
    bt = kv.tables(lens, extra_blocks=table // bs - max(math.ceil(n / bs) for n in lens))
    kv.fill(bt, lens)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    pos = ctx.long() - 1
    slots = bt[torch.arange(B, device="cuda"), pos // bs].long() * bs + pos % bs
    if B > 1:
        slots[1] = -1
    for b in range(B):
        if slots[b] >= 0:
            kv.k[slots[b] // bs, slots[b] % bs] = float("nan")
            kv.v[slots[b] // bs, slots[b] % bs] = float("nan")
    pool0 = kv.pool.clone()
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, device="cuda").to(dtype)
    cache = rotary_cos_sin_cache(1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D)), 40000, "cuda")
    scale = D ** -0.5

    def views(pool):
        return (pool.as_strided(kv.k.shape, kv.k.stride(), kv.k.storage_offset()),
                pool.as_strided(kv.v.shape, kv.v.stride(), kv.v.storage_offset()))

    pool_a = pool0.clone()
    ka, va = views(pool_a)
    q, k, v = qkv.view(B, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=1)
    qr, _ = rotary_qk(q, k, cache, pos, kv=(v, ka, va, slots), backend="triton")
    want = A.paged_decode_attention(qr, ka, va, bt, ctx, scale, out=torch.empty(B, Hq, D, device="cuda"),
                                    backend="cuda")
    ref = A.paged_decode_attention_ref(qr.float(), ka.float(), va.float(), _ref_tables(bt), ctx, scale)
    assert torch.isfinite(want).all()

    pool_b = pool0.clone()
    kb, vb = views(pool_b)
    ws = A.paged_decode_workspace(q, kb, bt, backend="cuda")
    out = torch.full((B, Hq, D), float("nan"), device="cuda")

    def call():
        A.paged_decode_attention_rope(qkv, Hq, kb, vb, bt, ctx, scale, cache, pos, slots, out=out, backend="cuda",
                                      workspace=ws)

    runs = []
    if mode == "eager":
        call()
        runs.append((out.clone(), pool_b.clone()))
    else:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        for _ in range(2):
            pool_b.copy_(pool0)
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            runs.append((out.clone(), pool_b.clone()))
    for got, pages in runs:
        assert torch.equal(pages, pool_a), "the pages differ from the rotary kernel's append"
        assert torch.equal(got, want)
        assert float((got - ref).norm() / ref.norm()) < 2e-3
    _use_plan(monkeypatch, "v4")
    with pytest.raises((RuntimeError, ValueError), match="heads-as-N|plan v4"):
        A.paged_decode_attention_rope(qkv, Hq, kb, vb, bt, ctx, scale, cache, pos, slots, backend="cuda")


@pytest.mark.parametrize("plan", ["v3", "v7"])
@pytest.mark.parametrize("D,Hq,Hkv", [(64, 14, 2), (128, 32, 8)])
def test_decode_pdl_reads_nothing_before_a_late_writer_ends(monkeypatch, plan, D, Hq, Hkv):
    """OPPO_DECODE_PDL=1 behind a kernel that lets its dependents start at once, spins 300 us (longer
    than the host's time between the two launches in eager mode) and only then writes q and one row
    of each sequence's K/V (the first row, then the last): the outputs equal OPPO_DECODE_PDL=0's bit
    for bit, eagerly and from a CUDA graph. The chain test above cannot tell a read before the wait
    from one after it (its kernel ahead finishes within microseconds); here one such read of q
    (poisoned with NaN until the writer puts it) or of a row changes the output. Session 37 ran the
    same writer against a form of the kernel that read its first tiles before the wait on purpose:
    it saw row 0's old bytes in exactly the sequences it should (bench/NOTES.md "Session 37")."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch (griddepcontrol) needs sm_90")
    triton, late_writer = _late_writer_kernel()
    _use_plan(monkeypatch, plan)
    bs, lens = 16, [5, 100, 129, 130, 1000, 3000]
    B = len(lens)
    kv, bt, ctx = _full_width_case(lens, Hkv, D, 4096, bs)
    q_src = torch.randn(B, Hq, D, device="cuda").bfloat16()
    k_src, v_src = (torch.randn(B, Hkv, D, device="cuda").bfloat16() * 3 for _ in range(2))
    q = torch.full_like(q_src, float("nan"))
    out = torch.empty_like(q_src)
    ws = A.paged_decode_workspace(q_src, kv.k, bt, backend="cuda")
    elem = kv.k.stride(0)

    def offsets(rows):   # element offsets (from kv.k's first element) of row rows[b] of sequence b
        return torch.tensor([int(bt[b, r // bs]) * elem + (r % bs) * Hkv * D for b, r in enumerate(rows)],
                            dtype=torch.int64, device="cuda")

    def step(dst):
        late_writer[(B,)](q_src, q, Hq * D, k_src, v_src, kv.k, kv.v, dst, Hkv * D, 300_000,
                          BLOCK_Q=triton.next_power_of_2(Hq * D), BLOCK_KV=triton.next_power_of_2(Hkv * D))
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, D ** -0.5, out=out, backend="cuda", workspace=ws)

    def reset():
        kv.pool.copy_(pool0)
        q.fill_(float("nan"))
        out.fill_(float("nan"))
        torch.cuda.synchronize()

    pool0 = kv.pool.clone()
    for rows in ([0] * B, [n - 1 for n in lens]):
        dst = offsets(rows)
        results = {}
        for pdl in ("0", "1"):
            monkeypatch.setenv("OPPO_DECODE_PDL", pdl)
            for mode in ("eager", "graph"):
                reset()
                if mode == "eager":
                    step(dst)
                else:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step(dst)
                    reset()
                    graph.replay()
                torch.cuda.synchronize()
                results[pdl, mode] = out.clone()
        ref = A.paged_decode_attention_ref(q_src, kv.k, kv.v, bt, ctx, D ** -0.5)   # the cache as written
        want = results["0", "eager"]
        assert float((want.float() - ref.float()).norm() / ref.float().norm()) < 2e-3
        for key, got in results.items():
            assert torch.equal(got, want), (rows[0], key)


_RAW_WS_PROBE = """
import sys, torch, oppo_runtime.ops
assert oppo_runtime.ops.extension() is not None    # loads torch.ops.oppo
B, Hq, Hkv, D, bs, blocks = 1, 32, 8, 128, 16, 251
q = torch.randn(B, Hq, D, device="cuda").bfloat16()
k = torch.randn(blocks, bs, Hkv, D, device="cuda").bfloat16()
bt = torch.arange(blocks, dtype=torch.int32, device="cuda").view(1, -1)
ctx = torch.tensor([4000], dtype=torch.int32, device="cuda")
need = torch.ops.oppo.paged_decode_workspace_size(q, k, bt)
bad = {"short": lambda: torch.empty(need - 1, device="cuda"),
       "bf16": lambda: torch.empty(need, device="cuda", dtype=torch.bfloat16),
       "cpu": lambda: torch.empty(need)}[sys.argv[1]]()
try:
    torch.ops.oppo.paged_decode_attention(torch.empty_like(q), q, k, k, bt, ctx, 0.1, bad)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
    sys.exit(0)
sys.exit(3)
"""


@pytest.mark.parametrize("case", ["short", "bf16", "cpu"])
def test_decode_raw_op_refuses_a_bad_workspace_without_crashing(case):
    """The op itself (below the Python checks) raises on a bad workspace: in its own process, so
    that a crash is this case's failure, not the test session's. From session 10 to 14 the `short`
    case segfaulted on the GPU machine's build: its message's integers went through an ostream
    copy inside the extension (NOTES "Session 14"); the checks now format with check_text.h."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-u", "-c", _RAW_WS_PROBE, case], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "raised:" in r.stdout, (r.returncode, r.stdout[-500:], r.stderr[-2000:])


def test_decode_caller_workspace_checked():
    """A workspace too small for the call's plan, of the wrong dtype or device is a clear error
    (never an overrun), and the output is left as it was; a shape that does not split needs none."""
    B, Hq, Hkv, D, bs, n = 1, 32, 8, 128, 16, 4000
    kv = PagedKV(num_blocks=math.ceil(n / bs) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables([n])
    kv.fill(bt, [n])
    ctx = torch.tensor([n], dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    need = A.paged_decode_workspace(q, kv.k, bt, backend="cuda").numel()
    out = torch.zeros_like(q)
    for bad, err, msg in [(torch.empty(need - 1, device="cuda"), ValueError, "workspace holds"),
                          (torch.empty(need, device="cuda", dtype=torch.bfloat16), ValueError, "float32"),
                          (torch.empty(need), ValueError, "float32 tensor on cuda")]:
        with pytest.raises(err, match=msg):
            A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, 0.1, out=out, backend="cuda", workspace=bad)
    torch.cuda.synchronize()
    assert not out.any()
    # 256 sequences x 2 kv heads fill the machine: no split, no workspace
    q2 = torch.randn(256, 14, 64, device="cuda").bfloat16()
    kv2 = PagedKV(num_blocks=8, block_size=16, Hkv=2, D=64, dtype=torch.bfloat16)
    bt2 = torch.zeros(256, 4, dtype=torch.int32, device="cuda")
    assert A.paged_decode_workspace(q2, kv2.k, bt2, backend="cuda") is None


# Contexts at and around the 64-token tile and the 3-stage pipeline prologue (v4 D=64: 4 stages).
TILE_EDGE_LENS = [1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 300, 0]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D,bs", [(14, 2, 64, 16), (32, 8, 128, 16), (40, 2, 128, 8), (16, 4, 64, 256)])
def test_decode_no_split_when_heads_fill_the_machine(monkeypatch, plan, dtype, Hq, Hkv, D, bs):
    """B * Hkv * head chunks >= the resident CTAs: one split, `out` written by the main kernel
    itself (no workspace, no reduction); contexts at tile and pipeline-prologue edges, and 0.
    v4: a persistent grid, 1-2 items per CTA. v5 splits below 4 items per resident slot, so it
    gets 4 times the batch (and items up to 4096 tokens)."""
    _use_plan(monkeypatch, plan)
    monkeypatch.setenv("OPPO_DECODE_V5_MAX_PART", "4096")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chunks = Hkv * math.ceil(Hq // Hkv / 16)
    B = math.ceil(4 * sms / chunks) * (4 if plan == "v5" else 1)   # >= any resident count (<= 4 CTAs per SM)
    lens = [TILE_EDGE_LENS[i % len(TILE_EDGE_LENS)] for i in range(B)]
    out, ref, ws = _decode_run(B, Hq, Hkv, D, bs, lens, dtype, torch.float32)
    assert ws == 0, f"expected the no-split path (no workspace), got {ws} bytes"
    assert rel_err(out, ref) < TOL_F32_OUT[dtype]
    zero = [b for b, n in enumerate(lens) if n == 0]
    assert (out[zero] == 0).all()


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("D", [64, 128])
def test_decode_long_splits_partition_edges(monkeypatch, plan, D):
    """A 32k table over few sequences: long partitions (v3, v4); contexts at P-1, P, P+1, 2P+65 and
    near the table's end, so the last tile of a split and the first of the next are partial (v4:
    P-1 and P are written by split 0 directly, the others merged by their last CTA)."""
    _use_plan(monkeypatch, plan)
    B, Hq, Hkv, bs, table = 6, 32, 8, 16, 32768
    splits, P = _plan(B, Hq, Hkv, D, table, plan)
    assert splits > 1
    lens = [1, P - 1, P, P + 1, min(2 * P + 65, table - 1), table - 5]
    out, ref, _ = _decode_run(B, Hq, Hkv, D, bs, lens, torch.bfloat16, torch.float32, extra_blocks=0)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("plan,tickets", [("v2", None), ("v3", None), ("v4", None), ("v4", "memset"), ("v5", None),
                                          ("v5", "memset"), ("v6", None), ("v7", None), ("v7", "memset")])
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [(1, 32, 8, 128, 32768), (1, 32, 8, 64, 32768), (4, 14, 2, 64, 4096),
                                               (16, 32, 8, 128, 16384), (64, 14, 2, 64, 4096), (3, 40, 2, 128, 2048)])
def test_decode_plan_mirror_matches_launcher(monkeypatch, plan, tickets, B, Hq, Hkv, D, table):
    """The Python mirror of the split plan (used by the bench and to place contexts in these tests)
    agrees with the launcher, read through the workspace size. Contexts are short: the plan depends
    on the table's width only. A failure here means the mirror drifted (or the card's occupancy
    differs from its estimate), not a wrong result: the other tests check results. v4: the ticket
    counters come from the launcher's own pool (cudaMalloc, not in the workspace), or with
    OPPO_DECODE_TICKETS=memset one uint32 per group at the end of the workspace."""
    _use_plan(monkeypatch, plan, tickets)
    bs = 16
    lens = [1 + (37 * b) % 50 for b in range(B)]
    out, ref, ws = _decode_run(B, Hq, Hkv, D, bs, lens, torch.bfloat16, torch.float32,
                               extra_blocks=table // bs - max(math.ceil(n / bs) for n in lens))
    splits, _ = _plan(B, Hq, Hkv, D, table, plan)
    groups = B * Hkv * math.ceil(Hq // Hkv / 16)
    expected = _ws_expected(B, Hq, D, splits, _counters(plan, groups, splits) if tickets == "memset" else 0)
    assert ws == expected, f"launcher workspace {ws} B, mirror plans {splits} splits ({expected} B)"
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("plan", ["v7", "v3"])
@pytest.mark.parametrize("slots", ["1", "4"])
@pytest.mark.parametrize("B,Hq,Hkv,D,table", [(1, 32, 8, 128, 32768), (16, 32, 8, 128, 16384), (4, 14, 2, 64, 4096)])
def test_decode_split_slots_mirror_and_result(monkeypatch, plan, slots, B, Hq, Hkv, D, table):
    """OPPO_DECODE_SPLIT_SLOTS (the A/B switch for fewer or more splits than one wave): the launcher
    plans the splits the mirror plans (read through the workspace size), and the result stays within
    the reference's tolerance with contexts spread over the table (full, ragged, one token)."""
    _use_plan(monkeypatch, plan, None)
    monkeypatch.setenv("OPPO_DECODE_SPLIT_SLOTS", slots)
    bs = 16
    lens = [table - (977 * b) % (table // 2) if b % 3 else 1 + b for b in range(B)]
    lens[0] = table - 5
    out, ref, ws = _decode_run(B, Hq, Hkv, D, bs, lens, torch.bfloat16, torch.float32,
                               extra_blocks=table // bs - max(math.ceil(n / bs) for n in lens))
    splits, _ = _plan(B, Hq, Hkv, D, table, plan)
    assert ws == _ws_expected(B, Hq, D, splits, 0), f"launcher workspace {ws} B, mirror plans {splits} splits"
    assert rel_err(out, ref) < 2e-3


def test_decode_plans_v2_v3_v4_v5_agree(monkeypatch):
    """Same inputs under the four plans (they split (64, 4096, 14, 2, 64) 8, 3, 3 and ~13 ways)."""
    B, Hq, Hkv, D, bs = 64, 14, 2, 64, 16
    assert _plan(B, Hq, Hkv, D, 4096, "v2")[0] != _plan(B, Hq, Hkv, D, 4096, "v3")[0]
    lens = torch.randint(1, 4097, (B,)).tolist()
    lens[0] = 4096
    kv = PagedKV(num_blocks=sum(math.ceil(n / bs) for n in lens) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables(lens, extra_blocks=0)
    kv.fill(bt, lens)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda").bfloat16()
    outs = {}
    for plan in ("v2", "v3", "v4", "v5"):
        monkeypatch.setenv("OPPO_DECODE_PLAN", plan)
        outs[plan] = torch.full((B, Hq, D), float("nan"), device="cuda")
        A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, 0.125, out=outs[plan], backend="cuda")
    ref = A.paged_decode_attention_ref(q, kv.k, kv.v, _ref_tables(bt), ctx, 0.125, out=torch.empty(B, Hq, D, device="cuda"))
    for plan, out in outs.items():
        assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3, plan
    assert rel_err(outs["v2"], outs["v3"]) < 2e-3
    assert rel_err(outs["v4"], outs["v3"]) < 2e-3
    assert rel_err(outs["v5"], outs["v3"]) < 2e-3


@pytest.mark.parametrize("plan", PLANS)
def test_decode_cuda_graph_replay_no_split(monkeypatch, plan):
    """The no-split plan captured once, replayed on new queries and context lengths (v5: 4 items
    per resident slot, so 4 times the batch)."""
    _use_plan(monkeypatch, plan)
    Hq, Hkv, D, bs, max_len = 14, 2, 64, 16, 300
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    B = math.ceil(4 * sms / Hkv) * (4 if plan == "v5" else 1)
    assert _plan(B, Hq, Hkv, D, math.ceil(max_len / bs) * bs, plan)[0] == 1
    kv = PagedKV(num_blocks=B * math.ceil(max_len / bs) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    full = [max_len] * B
    bt = kv.tables(full, extra_blocks=0)
    kv.fill(bt, full)
    ctx = torch.randint(1, max_len + 1, (B,), dtype=torch.int32, device="cuda")
    _check_decode_graph_replay(kv, bt, ctx, Hq, 0.125, min_ctx=0, max_len=max_len)


@pytest.mark.parametrize("dtype,Hq,Hkv,D,bs", [(torch.bfloat16, 14, 2, 64, 16), (torch.bfloat16, 32, 8, 128, 16),
                                               (torch.bfloat16, 40, 2, 128, 8), (torch.bfloat16, 8, 8, 64, 256),
                                               (torch.float16, 28, 4, 64, 48)])
@pytest.mark.parametrize("plan", ["v4", "v5"])
def test_decode_v4_persistent_many_items_per_cta(monkeypatch, plan, dtype, Hq, Hkv, D, bs):
    """v4/v5 without split, ~4-6 (sequence, kv head) items per persistent CTA, all short (0 to 5
    tiles; contexts at tile edges and 0): the producer's look-ahead of kStages + 1 tiles crosses
    several items, Q of the next item is loaded during the merge of the current one (v5: items
    claimed from the counter, so a CTA's next item is only known at its claim)."""
    _use_plan(monkeypatch, plan)
    monkeypatch.setenv("OPPO_DECODE_V5_MAX_PART", "4096")   # v5: no split over the 768-token table of bs 256
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chunks = Hkv * math.ceil(Hq // Hkv / 16)
    slots = sms * A.paged_decode_resident_ctas(D, plan=plan)
    B = math.ceil(4 * slots / chunks)
    lens = [TILE_EDGE_LENS[(7 * i) % len(TILE_EDGE_LENS)] for i in range(B)]
    table = (math.ceil(max(lens) / bs) + 1) * bs
    ctas, per_cta = A.paged_decode_grid(B, Hq, Hkv, D, table, sms, A.paged_decode_resident_ctas(D, plan=plan), plan)
    assert ctas == slots and per_cta >= 4
    out, ref, ws = _decode_run(B, Hq, Hkv, D, bs, lens, dtype, torch.float32)
    assert ws == 0, f"expected the no-split path (no workspace), got {ws} bytes"
    assert rel_err(out, ref) < TOL_F32_OUT[dtype]
    zero = [b for b, n in enumerate(lens) if n == 0]
    assert (out[zero] == 0).all()


@pytest.mark.parametrize("plan", ["v4", "v5", "v7"])
def test_decode_v4_tickets_reset_between_calls_and_streams(monkeypatch, plan):
    """v4/v5 split plan, called eagerly five times on the current stream and alternately on two
    side streams (each stream has its own counters): every call's result is checked, so a counter
    left non-zero by one call (the last CTA must reset it; v5: also the claim and exit counters)
    fails the next one."""
    _use_plan(monkeypatch, plan)
    B, Hq, Hkv, D, bs = 3, 28, 4, 128, 16
    lens = [4000, 1, 2500]
    table = 4096
    assert _plan(B, Hq, Hkv, D, table, plan)[0] > 1
    kv = PagedKV(num_blocks=table // bs * B + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables(lens, extra_blocks=table // bs - math.ceil(max(lens) / bs))
    kv.fill(bt, lens)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    streams = [torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()]
    for i in range(9):
        s = streams[0] if i < 5 else streams[1 + i % 2]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            q = torch.randn(B, Hq, D, device="cuda").bfloat16()
            out = torch.full((B, Hq, D), float("nan"), device="cuda")
            A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, 0.09, out=out, backend="cuda")
            ref = A.paged_decode_attention_ref(q, kv.k, kv.v, _ref_tables(bt), ctx, 0.09, out=torch.empty_like(out))
        s.synchronize()
        assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3, f"call {i}"


def test_decode_float32_inputs_fall_back_to_reference():
    kv = PagedKV(num_blocks=8, block_size=16, Hkv=2, D=64, dtype=torch.float32)
    bt = kv.tables([40])
    kv.fill(bt, [40])
    q = torch.randn(1, 4, 64, device="cuda")
    ctx = torch.tensor([40], dtype=torch.int32, device="cuda")
    out = A.paged_decode_attention(q, kv.k, kv.v, bt, ctx, 0.125)
    ref = A.paged_decode_attention_ref(q, kv.k, kv.v, bt, ctx, 0.125)
    assert torch.allclose(out, ref)


# ----------------------------------------------------------------------------- prefill
def _prefill_case(Hq, Hkv, D, bs, prefixes, chunks, dtype, out_dtype, via_kv_append=False, pad_max=0,
                  backend="cuda", seed=None):
    """seed: the same pages, tables and inputs at every call with that seed (bitwise A/B of plans)."""
    lens = [p + c for p, c in zip(prefixes, chunks)]
    kv = PagedKV(num_blocks=sum(math.ceil(n / bs) for n in lens) + 5, block_size=bs, Hkv=Hkv, D=D, dtype=dtype,
                 seed=seed)
    if seed is not None:
        torch.manual_seed(seed)
    bt = kv.tables(lens)
    cu = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    Nq = int(cu[-1])
    if via_kv_append:   # prefix by hand, the chunk's K/V through kv_append (the scorer's order)
        kv.fill(bt, prefixes)
        key = torch.randn(Nq, Hkv, D, device="cuda").to(dtype)
        value = torch.randn(Nq, Hkv, D, device="cuda").to(dtype)
        slots = []
        for b, (p, c) in enumerate(zip(prefixes, chunks)):
            pos = torch.arange(p, p + c, device="cuda")
            slots.append(bt[b, pos // bs].long() * bs + pos % bs)
        A.kv_append(key, value, kv.k, kv.v, torch.cat(slots), backend="cuda" if backend == "cuda" else None)
    else:
        kv.fill(bt, lens)
    q = torch.randn(Nq, Hq, D, device="cuda").to(dtype)
    scale = D ** -0.5
    out = torch.full((Nq, Hq, D), float("nan"), device="cuda", dtype=out_dtype)
    A.paged_prefill_attention(q, kv.k, kv.v, cu, ctx, bt, scale, out=out, max_seqlen_q=max(chunks) + pad_max,
                              backend=backend)
    ref = A.paged_prefill_attention_ref(q, kv.k, kv.v, cu, ctx, _ref_tables(bt), scale,
                                        out=torch.empty(Nq, Hq, D, device="cuda"))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    return out, ref


PREFILL_SHAPES = [  # Hq, Hkv, D, block_size, prefixes, chunks
    (32, 8, 128, 16, [0, 37, 500, 1000], [1, 200, 77, 128]),
    (14, 2, 64, 16, [100, 0, 3], [256, 65, 1]),                 # G = 7
    (8, 8, 128, 8, [257, 0], [33, 300]),                        # G = 1
    (32, 4, 64, 256, [600, 1], [64, 700]),                      # G = 8, big pages
    (12, 4, 128, 48, [95, 13, 0], [31, 1, 129]),                # G = 3, page size not a power of two
    (16, 1, 64, 32, [0, 2000], [1000, 5]),                      # G = 16
    (32, 8, 128, 64, [130, 0, 64, 2047], [400, 64, 1, 129]),    # G = 4, pages of 64 (= the Triton tile)
    (28, 4, 64, 64, [63, 1000], [300, 17]),                     # G = 7, pages of 64
]


PREFILL_PLANS = ["mma", "wgmma", "wgmma_pp", "wgmma_ov", "wgmma_pp_ov", "wgmma_pp_ov_ps", "wgmma_kv",
                 "wgmma_pp_ov_kv", "wgmma_pp_ov_qp_ps", "wgmma_pp_ov_qp_xc_ps"]


def _skip_unless_wgmma(plan: str) -> None:
    if not A.prefill_wgmma_available(plan=plan):
        pytest.skip("the wgmma plan needs an sm_90 device and an extension built with sm_90a "
                    "(and is not in OPPO_PREFILL_WGMMA_OFF)")


@pytest.fixture(params=PREFILL_PLANS)
def prefill_plan(request, monkeypatch):
    """The CUDA launcher's plan (read at every call): mma (v2) everywhere, wgmma and its flag
    variants (ping-pong, intra-warpgroup overlap, persistent CTAs) on sm_90 with an sm_90a build
    (skipped elsewhere, with the reason)."""
    if request.param.startswith("wgmma"):
        _skip_unless_wgmma(request.param)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_kernel_error_in_float32_out(prefill_plan, dtype, shape):
    Hq, Hkv, D, bs, prefixes, chunks = shape
    out, ref = _prefill_case(Hq, Hkv, D, bs, prefixes, chunks, dtype, torch.float32)
    assert rel_err(out, ref) < TOL_F32_OUT[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_native_dtype_output(prefill_plan, dtype):
    out, ref = _prefill_case(32, 8, 128, 16, [0, 333], [300, 45], dtype, dtype)
    rounding = rel_err(ref.to(dtype), ref)
    assert rel_err(out, ref) < rounding + TOL_F32_OUT[dtype]


def test_prefill_after_kv_append_of_the_chunk(prefill_plan):
    out, ref = _prefill_case(28, 4, 128, 16, [0, 70, 513], [100, 1, 64], torch.bfloat16, torch.float32,
                             via_kv_append=True)
    assert rel_err(out, ref) < 2e-3


def test_prefill_long_chunk_and_padded_max_seqlen(prefill_plan):
    out, ref = _prefill_case(16, 4, 128, 16, [700, 0], [4096, 3], torch.bfloat16, torch.float32, pad_max=100)
    assert rel_err(out, ref) < 2e-3


def test_prefill_single_token_chunks_equal_decode(prefill_plan):
    Hq, Hkv, D, bs = 32, 8, 128, 16
    prefixes, chunks = [10, 400, 0], [1, 1, 1]
    out, ref = _prefill_case(Hq, Hkv, D, bs, prefixes, chunks, torch.bfloat16, torch.float32)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("plan_env", [None, "auto"])
@pytest.mark.parametrize("Hq,Hkv,D,default", [(32, 8, 128, "wgmma_pp_ov_qp_xc_ps"), (14, 2, 64, "wgmma3_pp_ov_qp_xc_ps")])
def test_prefill_auto_rule_runs_wgmma(monkeypatch, plan_env, Hq, Hkv, D, default):
    """OPPO_PREFILL_PLAN unset or auto, no backend asked for: on sm_90 with sm_90a code, head dim 128
    (bf16 or fp16) and head dim 64 in bf16 run the CUDA launcher's default plans there,
    wgmma_pp_ov_qp_xc_ps and wgmma3_pp_ov_qp_xc_ps (bitwise what that plan asked for by name gives, and
    within the fp32 reference's tolerance); fp16 at head dim 64 runs Triton; an explicit
    OPPO_PREFILL_PLAN=mma keeps the launcher on mma."""
    from oppo_runtime.ops import backends
    _skip_unless_wgmma(default)

    def set_plan_env():
        if plan_env is None:
            monkeypatch.delenv("OPPO_PREFILL_PLAN", raising=False)
        else:
            monkeypatch.setenv("OPPO_PREFILL_PLAN", plan_env)
    set_plan_env()
    monkeypatch.delenv("OPPO_PREFILL_BACKEND", raising=False)
    monkeypatch.delenv("OPPO_OP_BACKEND", raising=False)
    for dtype in (torch.bfloat16, torch.float16):
        out, ref = _prefill_case(Hq, Hkv, D, 16, [0, 37, 1000], [1, 200, 128], dtype, torch.float32, backend=None)
        if D == 64 and dtype == torch.float16:
            assert backends()["paged_prefill_attention"] == "triton"
        else:
            assert backends()["paged_prefill_attention"] == "cuda"
            assert backends()["paged_prefill_attention/cuda_plan"] == default
        assert rel_err(out, ref) < 2e-3
    # the same inputs through the default plan and through the plan named (PagedKV draws fresh seeds)
    lens, chunks = [69, 309], [64, 9]
    kv = PagedKV(num_blocks=40, block_size=16, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables(lens)
    kv.fill(bt, lens)
    cu = torch.tensor([0, 64, 73], dtype=torch.int32, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(73, Hq, D, device="cuda").bfloat16()

    def run():
        out = torch.full((73, Hq, D), float("nan"), device="cuda")
        A.paged_prefill_attention(q, kv.k, kv.v, cu, ctx, bt, D ** -0.5, out=out, max_seqlen_q=64, backend="cuda")
        torch.cuda.synchronize()
        return out

    auto = run()
    monkeypatch.setenv("OPPO_PREFILL_PLAN", default)
    assert torch.equal(auto, run())
    monkeypatch.setenv("OPPO_PREFILL_PLAN", "mma")
    mma = run()
    assert backends()["paged_prefill_attention/cuda_plan"] == "mma"
    assert torch.isfinite(mma).all() and not torch.equal(auto, mma)     # another kernel ran
    set_plan_env()


@pytest.mark.parametrize("plan", PREFILL_PLANS[1:])
def test_prefill_wgmma_graph_replay_and_many_tiles(monkeypatch, plan):
    """The wgmma plans captured once and replayed on new queries and new chunk/context lengths
    inside the captured grid: the producer/consumer mbarrier ring runs over 2-40 tiles per CTA
    (phases wrap several times), CTAs past a chunk exit before touching the barriers."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    Hq, Hkv, D, bs, max_chunk, max_ctx = 28, 4, 128, 16, 300, 2600
    B = 3
    kv = PagedKV(num_blocks=B * math.ceil(max_ctx / bs) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables([max_ctx] * B)
    kv.fill(bt, [max_ctx] * B)
    cu = torch.zeros(B + 1, dtype=torch.int32, device="cuda")
    ctx = torch.zeros(B, dtype=torch.int32, device="cuda")
    q = torch.empty(B * max_chunk, Hq, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(B * max_chunk, Hq, D, device="cuda")

    def set_case(chunks, prefixes):
        cu.copy_(torch.tensor([0] + torch.tensor(chunks).cumsum(0).tolist(), dtype=torch.int32))
        ctx.copy_(torch.tensor([p + c for p, c in zip(prefixes, chunks)], dtype=torch.int32))
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        out.fill_(float("nan"))

    set_case([max_chunk] * B, [0] * B)
    A.paged_prefill_attention(q, kv.k, kv.v, cu, ctx, bt, D ** -0.5, out=out, max_seqlen_q=max_chunk, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.paged_prefill_attention(q, kv.k, kv.v, cu, ctx, bt, D ** -0.5, out=out, max_seqlen_q=max_chunk,
                                  backend="cuda")
    for chunks, prefixes in (([300, 1, 77], [2300, 0, 1000]), ([5, 300, 64], [64, 2299, 127]),
                             ([1, 1, 1], [2599, 0, 15])):
        set_case(chunks, prefixes)
        graph.replay()
        n = sum(chunks)
        ref = A.paged_prefill_attention_ref(q[:n], kv.k, kv.v, cu, ctx, _ref_tables(bt), D ** -0.5,
                                            out=torch.empty(n, Hq, D, device="cuda"))
        torch.cuda.synchronize()
        assert torch.isfinite(out[:n]).all(), (chunks, prefixes)
        assert rel_err(out[:n], ref) < 2e-3, (chunks, prefixes)


def _many_items_case(Hq: int, D: int, out_dtype):
    """A bf16 batch with more (row tile, kv head, sequence) items than twice the SMs (persistent
    CTAs take several), 2 kv heads, ragged chunks (300, 1, 129, 64: items of one key tile, items
    past short chunks) after prefixes not multiples of the page: (out, fp32 reference)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    B = 2 * sms // 8 + 3                        # items = m_tiles * 2 kv heads * B > 2 x SMs
    prefixes = [(37 * b) % 700 for b in range(B)]
    chunks = [[300, 1, 129, 64][b % 4] for b in range(B)]
    return _prefill_case(Hq, 2, D, 16, prefixes, chunks, torch.bfloat16, out_dtype)


@pytest.mark.parametrize("plan", ["wgmma_pp_ov_ps", "wgmma_pp_ov_kv_ps", "wgmma_pp_ov_qp_ps", "wgmma_pp_ov_qp_xc_ps",
                                  "wgmma_pp_ov_kv_xc_ps"])
def test_prefill_wgmma_persistent_many_items_per_cta(monkeypatch, plan):
    """The persistent plan with several items per CTA (more (row tile, kv head, sequence) items
    than SMs): ragged chunks, items past short chunks, a stage ring that runs on across items
    (with _kv: the K and V rings)."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    out, ref = _many_items_case(8, 64, torch.float32)
    assert rel_err(out, ref) < 2e-3


MI_PLANS_D128 = ["wgmma_pp_ov_qp_mi_ps", "wgmma_pp_ov_kv_mi_ps", "wgmma_ov_mi_ps", "wgmma_mi_ps"]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan", MI_PLANS_D128)
def test_prefill_merged_items_head_dim_128(monkeypatch, plan, out_dtype):
    """_mi (a persistent CTA's items as one stream of batches: each item's last P V issued with the
    next item's first Q K^T, the next item's Q staged at the end of the item's last tile, O
    normalized before that last P V) at head dim 128: more items than SMs, ragged chunks (items of one key tile,
    items past short chunks), with and without ping-pong, the intra-warpgroup overlap and the
    split K/V rings."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    out, ref = _many_items_case(8, 128, out_dtype)
    tol = TOL_F32_OUT[torch.bfloat16] + (rel_err(ref.to(out_dtype), ref) if out_dtype != torch.float32 else 0)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("plan,D,dtype", [("wgmma_pp_ov_qp_mi_ps", 64, torch.bfloat16),
                                          ("wgmma_pp_ov_qp_mi_ps", 128, torch.float16),
                                          ("wgmma3_pp_ov_qp_mi_ps", 64, torch.float16)])
def test_prefill_merged_items_refused_where_not_built(monkeypatch, plan, D, dtype):
    """_mi is built for wgmma3 at head dim 64 and wgmma at head dim 128, bf16: elsewhere a clear
    error, not a silent other plan."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    with pytest.raises(RuntimeError, match="_mi plans are built for"):
        _prefill_case(8, 2, D, 16, [10], [20], dtype, torch.float32)


@pytest.mark.parametrize("plan", ["wgmma3_pp_ov_qp_xc_ks_ps", "wgmma3_ks"])
@pytest.mark.parametrize("chunks", [[64, 1, 2, 63], [256] * 6, [1] * 9])
def test_prefill_key_split_items(monkeypatch, plan, chunks):
    """_ks: items whose valid rows all fall in the first warpgroup's 64 (G = 7: a 256-token chunk's
    1792 rows leave 64 after nine items of 192; chunks of at most 9 tokens are one such item) have
    their key tiles split across the three warpgroups and the partial results merged: items of 1
    to ~20 key tiles (prefixes 0 to 2400: warpgroups without a tile of their own), beside
    ordinary items, fp32 output against the reference."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    prefixes = [(613 * i) % 2400 for i in range(len(chunks))]
    out, ref = _prefill_case(14, 2, 64, 16, prefixes, chunks, torch.bfloat16, torch.float32)
    assert rel_err(out, ref) < TOL_F32_OUT[torch.bfloat16]


@pytest.mark.parametrize("plan,D,dtype", [("wgmma_pp_ov_ks_ps", 64, torch.bfloat16),
                                          ("wgmma3_pp_ov_kv_ks_ps", 64, torch.bfloat16),
                                          ("wgmma3_pp_ov_mi_ks_ps", 64, torch.bfloat16)])
def test_prefill_key_split_refused_where_not_built(monkeypatch, plan, D, dtype):
    """_ks is built for wgmma3 at head dim 64 in bf16, without _mi or _kv: elsewhere a clear error."""
    _skip_unless_wgmma("wgmma3_pp_ov_qp_xc_ks_ps")
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    with pytest.raises(RuntimeError, match="_ks plans are built for"):
        _prefill_case(14, 2, D, 16, [10], [20], dtype, torch.float32)


WGMMA3_PLANS = ["wgmma3_pp_ov", "wgmma3_pp_ov_ps", "wgmma3_ov_ps", "wgmma3", "wgmma3_pp_ov_qp_ps", "wgmma3_pp_ov_qp_xc_ps",
                "wgmma3_pp_ov_qp_mi_ps", "wgmma3_pp_ov_qp_xc_ks_ps", "wgmma3_ks", "wgmma3_ov_ks_ps"]


@pytest.mark.parametrize("shape", [s for s in PREFILL_SHAPES if s[2] == 64])
@pytest.mark.parametrize("plan", WGMMA3_PLANS)
def test_prefill_wgmma3_matches_reference(monkeypatch, plan, shape):
    """Three consumer warpgroups (192-row items, 512 threads, setmaxnreg 32/160; head dim 64, bf16):
    every D=64 shape of the prefill tests (G = 7, 8, 16, big pages, pages of 64), fp32 output."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    Hq, Hkv, D, bs, prefixes, chunks = shape
    out, ref = _prefill_case(Hq, Hkv, D, bs, prefixes, chunks, torch.bfloat16, torch.float32)
    assert rel_err(out, ref) < TOL_F32_OUT[torch.bfloat16]


@pytest.mark.parametrize("plan", WGMMA3_PLANS[:3] + ["wgmma3_pp_ov_qp_ps", "wgmma3_pp_ov_qp_xc_ps", "wgmma3_pp_ov_kv_xc_ps",
                                                   "wgmma3_pp_ov_qp_mi_ps", "wgmma3_pp_ov_kv_mi_ps", "wgmma3_ov_mi_ps",
                                                   "wgmma3_pp_ov_qp_xc_ks_ps", "wgmma3_pp_ov_ks_ps"])
def test_prefill_wgmma3_persistent_many_items_and_native_output(monkeypatch, plan):
    """More items than SMs (persistent CTAs take several), ragged chunks, bf16 output; the plans
    with two or three warpgroups in ping-pong, and the auto plan at D=64 (with the Q prefetch)."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    out, ref = _many_items_case(14, 64, torch.bfloat16)
    assert rel_err(out, ref) < rel_err(ref.to(torch.bfloat16), ref) + TOL_F32_OUT[torch.bfloat16]


def _stamps_case(Hq: int, Hkv: int, D: int, prefixes: list[int], chunks: list[int], bs: int = 16):
    """A bf16 batch of chunks after prefixes on shuffled pages: a call of the CUDA prefill over it
    (under the plan the caller set), for the tests that compare calls bit for bit (the stamps)."""
    lens = [p + c for p, c in zip(prefixes, chunks)]
    kv = PagedKV(num_blocks=sum(math.ceil(n / bs) for n in lens) + 5, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables(lens)
    kv.fill(bt, lens)
    cu = torch.tensor([0] + list(torch.tensor(chunks).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(chunks), Hq, D, device="cuda").bfloat16()
    return lambda: A.paged_prefill_attention(q, kv.k, kv.v, cu, ctx, bt, D ** -0.5, max_seqlen_q=max(chunks),
                                             backend="cuda")


@pytest.mark.parametrize("plan", ["wgmma_pp_ov", "wgmma_pp_ov_ps", "wgmma3_pp_ov_ps", "wgmma3_pp_ov_qp_mi_ps",
                                  "wgmma3_pp_ov_qp_xc_ks_ps"])
def test_prefill_item_stamps_cover_every_item_and_change_nothing(monkeypatch, plan):
    """prefill_item_stamps: every work item of the wgmma kernel (row tile, kv head, sequence, in the
    kernel's order, prefill_item_coords; one CTA each or persistent CTAs) writes its row with its
    key-tile count (and the key-split bit for the _ks plan's split items) as the tag, items past a
    short chunk write nothing, and the output is bit for bit the unstamped call's."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    Hq, Hkv, D = 14, 2, 64
    G, bm = Hq // Hkv, 192 if plan.startswith("wgmma3") else 128
    prefixes, chunks = [0, 300, 77, 1000, 5], [256, 1, 129, 64, 200]
    run = _stamps_case(Hq, Hkv, D, prefixes, chunks)
    plain = run()
    m_tiles = math.ceil(max(chunks) * G / bm)
    items = m_tiles * Hkv * len(chunks)
    with A.prefill_item_stamps(items + 3) as stamps:
        stamped = run()
        torch.cuda.synchronize()
        s = stamps.cpu()
    assert torch.equal(stamped, plain)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for w in range(items + 3):
        x, rest = prefill_item_coords(w, m_tiles, items // m_tiles, key_split="_ks" in plan)
        b, row0 = rest // Hkv, (m_tiles - 1 - x) * bm
        if w >= items or row0 >= chunks[b] * G:
            assert not s[w].any(), f"item {w} (none) wrote {s[w].tolist()}"
            continue
        last = prefixes[b] + (min(row0 + bm, chunks[b] * G) - 1) // G
        start, end, tag = s[w].tolist()
        assert 0 < start <= end and (tag & 0xFFFFFFFF) < sms, (w, s[w].tolist())
        tiles, split = (tag >> 32) & 0xFFFFF, tag >> 52                  # kStampKeySplit: bit 20 of the tag
        assert tiles == (last + 128) // 128, f"item {w}: key tiles {tiles}, expected {(last + 128) // 128}"
        assert split == int("_ks" in plan and chunks[b] * G - row0 <= 64), f"item {w}: key-split bit {split}"


@pytest.mark.parametrize("plan", ["wgmma3_pp_ov_qp_xc_ps", "wgmma3_pp_ov_ps"])
def test_prefill_turn_stamps_follow_each_chain_and_change_nothing(monkeypatch, plan):
    """prefill_turn_stamps (bench/prefill_turns.py): the wgmma3 kernel instantiated with them gives
    bit for bit the output of the plain one; each consumer warpgroup of CTAs 0 and 1 writes its own
    slice, cycles never decrease, every item opens with its start and Q staged, every batch holds
    its request, turn, issue and tile's end in that order, and the persistent CTAs' items are the
    kernel's (c, c + grid, ...)."""
    _skip_unless_wgmma(plan)
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    run = _stamps_case(14, 2, 64, [0, 300, 77, 1000, 5] * 12, [256, 1, 129, 64, 200] * 12)
    plain = run()
    per = 2048
    with A.prefill_turn_stamps(6 * per) as stamps:
        stamped = run()
        torch.cuda.synchronize()
        rows = stamps.cpu()
    after = run()
    assert torch.equal(stamped, plain) and torch.equal(after, plain)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for k in range(6):
        sl = [r for r in rows[k * per:(k + 1) * per].tolist() if any(r)]
        assert sl, f"slice {k} (CTA {k // 3}, warpgroup {k % 3}) empty"
        cyc = [r[0] for r in sl]
        assert cyc == sorted(cyc), f"slice {k}: cycles go back"
        assert sl[0][1] & 0xFF == 0 and (sl[1][1] & 0xFF) == 1, f"slice {k} opens with {sl[:2]}"
        items = [r[2] for r in sl if r[1] & 0xFF == 0]
        assert items and all(w % sms == k // 3 for w in items) and items == sorted(items), items
        batch, batches = [], 0
        for r in sl + [[0, 0, 0]]:
            e = r[1] & 0xFF
            if e in (0, 2) and batch:      # a batch: request, turn, issued, ..., the tile's end or P V
                assert batch[:3] == [2, 3, 4] and (8 in batch or 7 in batch), f"slice {k}: a batch of events {batch}"
                batches += 1
            if e in (0, 2):
                batch = [2] if e == 2 else []
            elif batch:
                batch.append(e)
        assert batches > len(items), f"slice {k}: {batches} batches for {len(items)} items"


@pytest.mark.parametrize("plan", ["wgmma3_pp_ov_qp_xc_pq_ps", "wgmma_pp_ov_qp_xc_q1_ps", "wgmma_pp_ov_xx_ps"])
def test_prefill_unknown_plan_suffix_is_refused(monkeypatch, plan):
    """A plan with a suffix the launcher does not know (e.g. _pq and _q1, A/B plans removed in session
    33) is a clear error naming the grammar, never another plan run in its place."""
    _skip_unless_wgmma("wgmma_pp_ov_qp_xc_ps")
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    with pytest.raises(RuntimeError, match="OPPO_PREFILL_PLAN must be auto, mma or wgmma"):
        _prefill_case(14, 2, 64, 16, [10], [20], torch.bfloat16, torch.float32)


def test_prefill_wgmma3_refuses_head_dim_128_and_fp16(monkeypatch):
    """The wgmma3 plans are built for head dim 64 and bf16 only: anything else is a clear error."""
    _skip_unless_wgmma("wgmma3_pp_ov")
    monkeypatch.setenv("OPPO_PREFILL_PLAN", "wgmma3_pp_ov")
    with pytest.raises(RuntimeError, match="head dim 64 and bf16 only"):
        _prefill_case(8, 2, 128, 16, [10], [20], torch.bfloat16, torch.float32)
    with pytest.raises(RuntimeError, match="head dim 64 and bf16 only"):
        _prefill_case(8, 2, 64, 16, [10], [20], torch.float16, torch.float32)


@pytest.mark.parametrize("plan", ["wgmma_ov_qp_xc_ps", "wgmma_xc_ps", "wgmma3_ov_xc_ps"])
def test_prefill_xc_without_pingpong_is_refused(monkeypatch, plan):
    """_xc chains the ping-pong turns across items: a plan with _xc but without _pp is a clear error."""
    _skip_unless_wgmma("wgmma_pp_ov_qp_xc_ps")
    monkeypatch.setenv("OPPO_PREFILL_PLAN", plan)
    with pytest.raises(RuntimeError, match="needs _pp"):
        _prefill_case(14, 2, 64, 16, [10], [20], torch.bfloat16, torch.float32)


def _wgmma_diag_case(monkeypatch, D, q_zero=False, v_onehot=False):
    """One sequence, prefix 150, chunk 40, G = 4, plan wgmma: structured inputs whose outputs
    point at one half of the kernel when wrong (the GPU session's first look, before ncu)."""
    _skip_unless_wgmma("wgmma")
    monkeypatch.setenv("OPPO_PREFILL_PLAN", "wgmma")
    Hq, Hkv, bs, prefix, n = 8, 2, 16, 150, 40
    L = prefix + n
    kv = PagedKV(num_blocks=math.ceil(L / bs) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables([L])
    kv.fill(bt, [L])
    if v_onehot:       # V row of key t = one-hot(t % D): out[:, d] = the weights of keys t = d (mod D)
        pos = torch.arange(L, device="cuda")
        onehot = torch.nn.functional.one_hot(pos % D, D).to(torch.bfloat16)[:, None, :].expand(L, Hkv, D)
        kv.v[bt[0, pos // bs].long(), pos % bs] = onehot
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    ctx = torch.tensor([L], dtype=torch.int32, device="cuda")
    q = torch.zeros(n, Hq, D, device="cuda", dtype=torch.bfloat16) if q_zero else \
        torch.randn(n, Hq, D, device="cuda").bfloat16()
    out = torch.full((n, Hq, D), float("nan"), device="cuda")
    A.paged_prefill_attention(q, kv.k, kv.v, cu, ctx, bt, D ** -0.5, out=out, max_seqlen_q=n, backend="cuda")
    ref = A.paged_prefill_attention_ref(q, kv.k, kv.v, cu, ctx, _ref_tables(bt), D ** -0.5,
                                        out=torch.empty(n, Hq, D, device="cuda"))
    torch.cuda.synchronize()
    return out, ref


@pytest.mark.parametrize("D", [64, 128])
def test_prefill_wgmma_diag_pv_path(monkeypatch, D):
    """Q = 0: every visible key weighs the same, so the output is the mean of the visible V rows.
    Wrong here but right in the QK test below: the P V half (V's MN-major descriptor, the
    register A operand, the O fragment) or the mask's extent."""
    out, ref = _wgmma_diag_case(monkeypatch, D, q_zero=True)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3, rel_err(out, ref)


@pytest.mark.parametrize("D", [64, 128])
def test_prefill_wgmma_diag_qk_path(monkeypatch, D):
    """V rows one-hot in the key position (mod D): the output is the attention weights
    themselves. Wrong here but right above: the Q K^T half (Q/K descriptors, the swizzle, the
    S fragment) or the softmax."""
    out, ref = _wgmma_diag_case(monkeypatch, D, v_onehot=True)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3, rel_err(out, ref)
