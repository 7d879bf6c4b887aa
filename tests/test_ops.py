"""The pure-torch references on the CPU (the oracle of the kernels), and dispatch errors."""
import math

import pytest
import torch

from oppo_runtime import ops
from oppo_runtime.ops import (MissingKernelError, kv_append, paged_decode_attention, paged_decode_workspace,
                              paged_prefill_attention,
                              varlen_causal_attention)


def paged(num_blocks, block_size, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(num_blocks, 2, block_size, Hkv, D, generator=g, dtype=torch.float64)
    return pool[:, 0], pool[:, 1]          # page stride = 2 pages: as in the shared pool


def test_kv_append_writes_the_named_slots_and_skips_minus_one():
    k_cache, v_cache = paged(6, 4, 2, 8)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    key, value = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)
    slots = torch.tensor([13, -1, 0, 22, -1])
    kv_append(key, value, k_cache, v_cache, slots)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(k_cache[s // 4, s % 4], key[i]) and torch.equal(v_cache[s // 4, s % 4], value[i])
    untouched = torch.ones(6, 4, dtype=torch.bool)
    for s in (13, 0, 22):
        untouched[s // 4, s % 4] = False
    assert torch.equal(k_cache[untouched], before_k[untouched]) and torch.equal(v_cache[untouched], before_v[untouched])


def dense_attention(q, k, v, causal_offset):
    """q [n, Hq, D], k/v [L, Hkv, D]; query i sees keys 0..causal_offset+i (float64, by hand)."""
    G = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            L = causal_offset + i + 1
            s = (k[:L, h // G] @ q[i, h]) / math.sqrt(q.shape[2])
            out[i, h] = torch.softmax(s, 0) @ v[:L, h // G]
    return out


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1), (7, 1)])
def test_decode_reference_equals_attention_by_hand_on_shuffled_pages(Hq, Hkv):
    block_size, D, lens = 4, 8, [1, 7, 12]
    k_cache, v_cache = paged(12, block_size, Hkv, D)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    tables = perm[:9].view(3, 3).to(torch.int32)
    q = torch.randn(3, Hq, D, dtype=torch.float64)
    assert paged_decode_workspace(q, k_cache, tables) is None     # the reference needs no scratch
    out = paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), D ** -0.5)
    for b, L in enumerate(lens):
        k = torch.cat([k_cache[p] for p in tables[b].tolist()])[:L]
        v = torch.cat([v_cache[p] for p in tables[b].tolist()])[:L]
        torch.testing.assert_close(out[b:b + 1], dense_attention(q[b:b + 1], k, v, L - 1))


def test_decode_takes_head_major_pages_and_refuses_other_layouts():
    """Decode accepts pages [Hkv, block_size, D] viewed as [block_size, Hkv, D] (same answer as the
    pool's token-major pages); prefill and pages whose rows are not contiguous are refused."""
    block_size, Hq, Hkv, D, lens = 4, 4, 2, 8, [3, 9]
    k_cache, v_cache = paged(6, block_size, Hkv, D)
    k_hm = k_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)   # same values, head-major memory
    v_hm = v_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert k_hm.stride() == (block_size * Hkv * D, D, block_size * D, 1)
    tables = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    q = torch.randn(2, Hq, D, dtype=torch.float64)
    ctx = torch.tensor(lens, dtype=torch.int32)
    torch.testing.assert_close(paged_decode_attention(q, k_hm, v_hm, tables, ctx, 0.3),
                               paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="each page of the cache must be contiguous"):
        paged_prefill_attention(q, k_hm, v_hm, torch.tensor([0, 1, 2], dtype=torch.int32), ctx, tables, 0.3)
    k_bad = k_cache.transpose(2, 3).contiguous().transpose(2, 3)          # D not the inner dim
    with pytest.raises(ValueError, match="each page of the cache must be contiguous"):
        paged_decode_attention(q, k_bad, k_bad, tables, ctx, 0.3)


def test_prefill_reference_is_bottom_right_causal_over_the_prefix():
    block_size, Hq, Hkv, D = 4, 4, 2, 8
    k_cache, v_cache = paged(16, block_size, Hkv, D)
    tables = torch.randperm(16, generator=torch.Generator().manual_seed(2))[:12].view(3, 4).to(torch.int32)
    chunks, ctx = [3, 1, 5], [9, 1, 14]               # prefix 6, 0, 9
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q = torch.randn(9, Hq, D, dtype=torch.float64)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, torch.tensor(ctx, dtype=torch.int32), tables, D ** -0.5)
    for b in range(3):
        k = torch.cat([k_cache[p] for p in tables[b].tolist()])[:ctx[b]]
        v = torch.cat([v_cache[p] for p in tables[b].tolist()])[:ctx[b]]
        want = dense_attention(q[cu[b]:cu[b + 1]], k, v, ctx[b] - chunks[b])
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], want)


def test_varlen_training_attention_keeps_sequences_apart():
    q, k, v = (torch.randn(10, 4, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 3, 10])
    out = varlen_causal_attention(q, k[:, :2], v[:, :2], cu, 8 ** -0.5)
    for s, e in ((0, 3), (3, 10)):
        torch.testing.assert_close(out[s:e], dense_attention(q[s:e], k[s:e, :2], v[s:e, :2], 0))


def test_asking_for_a_cuda_kernel_on_cpu_tensors_names_the_op():
    k_cache, v_cache = paged(2, 4, 1, 8)
    with pytest.raises(MissingKernelError, match=r"op kv_append: CUDA kernel requested"):
        kv_append(torch.zeros(1, 1, 8, dtype=torch.float64), torch.zeros(1, 1, 8, dtype=torch.float64),
                  k_cache, v_cache, torch.tensor([0]), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        kv_append(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), k_cache.float(), v_cache.float(), torch.tensor([0]),
                  backend="triton")


@pytest.mark.parametrize("op", ["decode_cta_stamps", "decode_tile_stamps", "prefill_item_stamps", "prefill_turn_stamps"])
def test_stamp_switches_are_registered_and_refuse_without_a_gpu(op):
    """The profiling switches (bench/decode_stamps.py, bench/prefill_stamps.py): torch ops of the
    extension where it is built with CUDA; without a GPU the context managers raise before
    touching anything."""
    from oppo_runtime.ops import attention as A
    if ops.has_cuda_kernels():
        assert f"{op}(Tensor(a!) stamps) -> ()" in str(getattr(torch.ops.oppo, op).default._schema)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        with getattr(A, op)(0):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(MissingKernelError, match=f"{op}: needs"):
            with getattr(A, op)(4):
                pass


def test_shape_errors_name_the_op_and_shapes():
    k_cache, v_cache = paged(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"paged_decode_attention: q must be \[B, Hq, 8\]"):
        paged_decode_attention(torch.zeros(1, 3, 8, dtype=torch.float64), k_cache, v_cache,
                               torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)
    assert "kv_append" in ops.backends()


def test_doctor_lists_every_environment_switch_the_package_reads():
    """`oppo doctor` prints each OPPO_* variable the runtime (Python and CUDA launchers) reads."""
    import re
    from pathlib import Path

    from oppo_runtime.cli import _SWITCHES
    src = Path(ops.__file__).resolve().parent.parent
    read = set()
    for f in src.rglob("*.py"):
        read |= set(re.findall(r"""environ(?:\.get)?\(\s*["'](OPPO_[A-Z0-9_]+)""", f.read_text()))
        read |= set(re.findall(r"""environ\[\s*["'](OPPO_[A-Z0-9_]+)""", f.read_text()))
    for f in (src.parent / "csrc").glob("*.cu"):                # the CUDA launchers read some too
        # getenv("NAME") or a helper given the name (env_int / env_switch("NAME", ...)): any literal that is a name
        read |= set(re.findall(r'(?:getenv|env_int|env_switch)\(\s*"(OPPO_[A-Z0-9_]+)"', f.read_text()))
    listed = {name for name, _ in _SWITCHES}
    assert read and read <= listed, f"not listed by doctor: {sorted(read - listed)}"


def test_decode_plan_mirror_caps_tokens_per_split():
    """max_partition (EngineConfig.decode_max_partition): the plan of workload G's decode batch
    (B 128, Hq 14, Hkv 2, D 64, table 3360 tokens, 132 SMs x 4 CTAs) goes from 2 splits of 1680
    tokens to 14 of 256 (rounded to the 64-token tile: 200 -> 256); a cap above the plan's own
    partition changes nothing; v4 ignores it; a negative cap is refused."""
    from oppo_runtime.ops.attention import paged_decode_grid, paged_decode_plan
    shape = (128, 14, 2, 64, 3360, 132, 4)
    assert paged_decode_plan(*shape, plan="v3") == (2, 1728)
    assert paged_decode_plan(*shape, plan="v3", max_partition=200) == (14, 256)
    assert paged_decode_plan(*shape, plan="v3", max_partition=512) == (7, 512)
    assert paged_decode_plan(*shape, plan="v3", max_partition=4096) == (2, 1728)
    assert paged_decode_plan(*shape, plan="v4", max_partition=256) == paged_decode_plan(*shape, plan="v4")
    assert paged_decode_grid(*shape, plan="v3", max_partition=512) == (7 * 256, 1)
    # a long context alone (no split by the plan: B x Hkv fills the machine) gets split by the cap
    assert paged_decode_plan(512, 32, 8, 128, 4096, 132, 2, plan="v3") == (1, 1 << 30)
    assert paged_decode_plan(512, 32, 8, 128, 4096, 132, 2, plan="v3", max_partition=1024) == (4, 1024)
    with pytest.raises(ValueError, match="max_partition"):
        paged_decode_plan(*shape, plan="v3", max_partition=-1)
    with pytest.raises(ValueError, match="decode_max_partition"):
        from oppo_runtime.engine import EngineConfig
        EngineConfig(decode_max_partition=-5)


def test_decode_plan_mirror_v5_and_v6(monkeypatch):
    """v5 (items claimed from a counter): at least OPPO_DECODE_V5_ITEMS (4) items per resident slot,
    of at most OPPO_DECODE_V5_MAX_PART (512) tokens, a persistent grid of min(items, slots) CTAs;
    it ignores max_partition. v6 (v3 lean at D=128, 3 CTAs per SM) takes v3's rule."""
    from oppo_runtime.ops.attention import paged_decode_grid, paged_decode_plan
    monkeypatch.delenv("OPPO_DECODE_V5_ITEMS", raising=False)
    monkeypatch.delenv("OPPO_DECODE_V5_MAX_PART", raising=False)
    # (1, 32768, 32, 8, 128) on 132 SMs x 2: 8 groups, 4 x 264 items -> 132 splits -> 128 of 256 tokens
    assert paged_decode_plan(1, 32, 8, 128, 32768, 132, 2, plan="v5") == (128, 256)
    assert paged_decode_grid(1, 32, 8, 128, 32768, 132, 2, plan="v5") == (264, 4)
    # (64, 4096, 32, 8, 128): 512 groups need 3 splits for 4 items a slot; 512 tokens a split need 8
    assert paged_decode_plan(64, 32, 8, 128, 4096, 132, 2, plan="v5") == (8, 512)
    assert paged_decode_plan(64, 32, 8, 128, 4096, 132, 2, plan="v5", max_partition=256) == (8, 512)
    monkeypatch.setenv("OPPO_DECODE_V5_MAX_PART", "4096")
    assert paged_decode_plan(64, 32, 8, 128, 4096, 132, 2, plan="v5") == (3, 1408)
    monkeypatch.setenv("OPPO_DECODE_V5_ITEMS", "1")
    assert paged_decode_plan(64, 32, 8, 128, 4096, 132, 2, plan="v5") == (1, 1 << 30)
    assert paged_decode_grid(64, 32, 8, 128, 4096, 132, 2, plan="v5") == (264, 2)   # 512 items, 264 CTAs
    # v6 = v3's rule with its own occupancy: 3 CTAs per SM at D=128 -> 396 slots
    assert paged_decode_plan(1, 32, 8, 128, 32768, 132, 3, plan="v6") == (47, 704)
    assert paged_decode_plan(1, 32, 8, 128, 32768, 132, 3, plan="v6", max_partition=256) == (128, 256)
    assert paged_decode_plan(1, 32, 8, 128, 32768, 132, 3, plan="v6") == paged_decode_plan(
        1, 32, 8, 128, 32768, 132, 3, plan="v3")
    # v7 = v3's rule and kernel (its splits merged by each group's last CTA): the same plan and grid,
    # the engine's cap included, with no second kernel
    for args in ((1, 32, 8, 128, 32768, 132, 2), (256, 14, 2, 64, 1024, 132, 4), (128, 14, 2, 64, 3360, 132, 4)):
        for cap in (0, 512):
            assert paged_decode_plan(*args, plan="v7", max_partition=cap) == paged_decode_plan(
                *args, plan="v3", max_partition=cap)
            assert paged_decode_grid(*args, plan="v7", max_partition=cap) == paged_decode_grid(
                *args, plan="v3", max_partition=cap)


def test_decode_plan_mirror_split_slots(monkeypatch):
    """OPPO_DECODE_SPLIT_SLOTS=N (an A/B switch): v3/v4/v6/v7 plan their splits as if N CTAs per SM
    were resident instead of the kernel's count: (1, 32768, 32, 8, 128) on 132 SMs x 2 goes from 32
    splits of 1024 to 16 of 2048 with N=1; a shape whose groups fill N x 132 slots gets no split; the
    cap on tokens per split still wins; 0 or unset is the kernel's own; v2 and v5 ignore it; anything
    but an integer in 0..16 is refused, as the launcher refuses it."""
    from oppo_runtime.ops.attention import paged_decode_plan
    monkeypatch.delenv("OPPO_DECODE_SPLIT_SLOTS", raising=False)
    long1 = (1, 32, 8, 128, 32768, 132, 2)
    assert paged_decode_plan(*long1, plan="v7") == (32, 1024)
    v2, v5 = paged_decode_plan(*long1, plan="v2"), paged_decode_plan(*long1, plan="v5")
    monkeypatch.setenv("OPPO_DECODE_SPLIT_SLOTS", "0")
    assert paged_decode_plan(*long1, plan="v7") == (32, 1024)
    monkeypatch.setenv("OPPO_DECODE_SPLIT_SLOTS", "1")
    assert paged_decode_plan(*long1, plan="v7") == (16, 2048)
    assert paged_decode_plan(*long1, plan="v3") == (16, 2048)
    assert paged_decode_plan(*long1, plan="v7", max_partition=1024) == (32, 1024)
    assert paged_decode_plan(16, 32, 8, 128, 16384, 132, 2, plan="v7") == (1, 1 << 30)
    assert (paged_decode_plan(*long1, plan="v2"), paged_decode_plan(*long1, plan="v5")) == (v2, v5)
    monkeypatch.setenv("OPPO_DECODE_SPLIT_SLOTS", "4")
    assert paged_decode_plan(*long1, plan="v7") == (64, 512)
    for bad in ("17", "-1", "one"):
        monkeypatch.setenv("OPPO_DECODE_SPLIT_SLOTS", bad)
        with pytest.raises(ValueError, match="OPPO_DECODE_SPLIT_SLOTS"):
            paged_decode_plan(*long1, plan="v7")
