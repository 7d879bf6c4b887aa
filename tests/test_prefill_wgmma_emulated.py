"""The prefill v4 kernel's index math, emulated on the CPU (kernels/paged_prefill_wgmma.cuh).

No GPU here runs the wgmma kernel, so this test replays what its threads do, line by line, in
numpy: the producer's cp.async writes of K/V tiles into the 128-byte-swizzled stages, the
consumers' swizzled Q stores, the wgmma descriptors (encoded as the kernel encodes them, then
decoded and read back through the canonical layouts of CUTLASS's ``make_gmma_desc``: K-major
SW128 ((8,m),(8,2)):((64,SBO),(1,8)) and MN-major SW128 ((64,n),(8,k)):((1,LBO),(64,SBO)) in
elements, with the swizzle on byte addresses), the accumulator fragments of m64nNk16 (thread
lane/4 and lane%4 of warp w own rows 16w + g (+8), columns 8i + 2t (+1)), the register A
operand (the mma.m16n8k16 A fragment) built from the packed P, the online softmax with the quad
reductions, the mask on diagonal tiles only, the stage ring and the peeled loop. The output is
compared with ``paged_prefill_attention_ref``.

What it cannot check: that the hardware reads descriptors the way CUTLASS documents (the GPU
tests do that), the mbarrier/proxy-fence protocol, timing. What it does check: that the pieces
the kernel combines agree with each other for the shapes that matter (GQA rows, ragged chunks,
prefixes across pages, D = 64 and 128, several stages' wrap-around).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oppo_runtime.ops import attention as A

BM = 128
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- mirrors of the kernel
def swz(rows: int, row, chunk):
    """Byte offset of 16-byte chunk ``chunk`` of row ``row`` in a [rows x D] tile (kernel's swz)."""
    return (chunk >> 3) * rows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4)


def desc128(saddr: int, lbo: int, sbo: int) -> int:
    """The kernel's desc128: start >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, 128B swizzle."""
    return ((saddr >> 4) & 0x3FFF) | (((lbo >> 4) & 0x3FFF) << 16) | (((sbo >> 4) & 0x3FFF) << 32) | (1 << 62)


def stages(D: int) -> int:
    return 3 if D == 128 else 4


BN = 128   # keys per K/V tile (Cfg<D>::kBN, both head dims)


# --------------------------------------------------------------------------- the hardware, as documented
def _decode(desc: int):
    assert desc >> 62 == 1, "not a 128B-swizzle descriptor"
    assert (desc >> 49) & 7 == 0, "base offset must be 0"
    return (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4


def _sw128(addr):
    return addr ^ (((addr >> 7) & 7) << 4)


def kmajor(smem: np.ndarray, desc: int, rows: int) -> np.ndarray:
    """[rows x 16] operand, K-major SW128: ((8, m), (8, 2)) : ((64 el, SBO), (1 el, 8 el))."""
    start, _, sbo = _decode(desc)
    m = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    addr = start + (m % 8) * 128 + (m // 8) * sbo + (k % 8) * 2 + (k // 8) * 16
    return smem[_sw128(addr) // 2]


def mnmajor(smem: np.ndarray, desc: int, n: int) -> np.ndarray:
    """[16 x n] operand (K rows, N columns), MN-major SW128: ((64, n), (8, k)) : ((1 el, LBO), (64 el, SBO))."""
    start, lbo, sbo = _decode(desc)
    k = np.arange(16)[:, None]
    nn = np.arange(n)[None, :]
    addr = start + (nn % 64) * 2 + (nn // 64) * lbo + (k % 8) * 128 + (k // 8) * sbo
    return smem[_sw128(addr) // 2]


# thread tw of a warpgroup: warp w = tw // 32, lane; g = lane // 4, t = lane % 4
TW = np.arange(128)
WARP, LANE = TW // 32, TW % 32
G_, T_ = LANE // 4, LANE % 4


def acc_index(n: int):
    """(row, col) of accumulator register r of every thread of an m64nNk16 fragment: [128, n/2]."""
    r = np.arange(n // 2)[None, :]
    i, j = r // 4, r % 4
    row = 16 * WARP[:, None] + G_[:, None] + 8 * (j >> 1)
    col = 8 * i + 2 * T_[:, None] + (j & 1)
    return row, col


def a_from_regs(pa_lo: np.ndarray, pa_hi: np.ndarray) -> np.ndarray:
    """The 64 x 16 A operand from every thread's 4 registers of pairs (mma.m16n8k16 A layout):
    reg 0 (g, 2t..+1), reg 1 (g+8, 2t..), reg 2 (g, 8+2t..), reg 3 (g+8, 8+2t..), rows + 16 w."""
    a = np.zeros((64, 16), np.float32)
    base = 16 * WARP + G_
    for reg, (dr, dc) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
        a[base + dr, 2 * T_ + dc] = pa_lo[:, reg]
        a[base + dr, 2 * T_ + dc + 1] = pa_hi[:, reg]
    return a


def round_to(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype).float().numpy()


# --------------------------------------------------------------------------- the kernel, replayed
def items_of(cu, ctx, Gq, Hkv, BN, BM=BM):
    """The kernel's work items in index order: (b, kvh, q0, rows, row0, L, prefix, n_tiles, n_full)
    or None for a row tile past its sequence's chunk (item_at). BM: rows per item (64 x the
    consumer warpgroups: 128, or 192 for the wgmma3 plans)."""
    B = len(ctx)
    max_seqlen = max(cu[b + 1] - cu[b] for b in range(B))
    m_tiles = math.ceil(max_seqlen * Gq / BM)
    out = []
    for w in range(m_tiles * Hkv * B):
        x, rest = w % m_tiles, w // m_tiles
        kvh, b = rest % Hkv, rest // Hkv
        q0, n = cu[b], cu[b + 1] - cu[b]
        rows, row0 = n * Gq, (m_tiles - 1 - x) * BM
        if row0 >= rows:
            out.append(None)
            continue
        L = ctx[b]
        prefix = L - n
        first, last = prefix + row0 // Gq, prefix + (min(row0 + BM, rows) - 1) // Gq
        out.append(dict(b=b, kvh=kvh, q0=q0, rows=rows, row0=row0, L=L, prefix=prefix,
                        n_tiles=(last + BN) // BN, n_full=(first + 1) // BN))
    return out


def emulate(q, k_cache, v_cache, cu, ctx, bt, scale, out, grid=None, nc=2):
    """paged_prefill_wgmma_kernel over the whole grid, one CTA after another: CTA c takes items
    c, c + grid, ... (grid None: one item per CTA; fewer: the persistent plan), its K/V ring and
    the producer's prefetch running on across items. nc: consumer warpgroups (3: the wgmma3
    plans' 192-row items)."""
    BM = 64 * nc
    dtype = q.dtype
    Nq, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    Gq = Hq // Hkv
    kS, chunks = stages(D), D // 8
    NB, KS = BN // 8, BN // 16
    qn = q.float().numpy()
    # the pools as the kernel sees them: flat, pages page_stride elements apart (>= a page)
    page_stride = k_cache.stride(0)
    assert v_cache.stride(0) == page_stride and k_cache.stride(1) == Hkv * D
    kflat, vflat = (torch.as_strided(x, (x.shape[0] * page_stride,), (1,)).float().numpy() for x in (k_cache, v_cache))
    cu, ctx, bt = cu.tolist(), ctx.tolist(), bt.tolist()
    q_bytes, tile_bytes = BM * D * 2, BN * D * 2
    stage_bytes = 2 * tile_bytes
    scale_log2 = scale * LOG2E
    items = items_of(cu, ctx, Gq, Hkv, BN, BM)
    grid = len(items) if grid is None else min(grid, len(items))
    srow, scol = acc_index(BN)
    orow, ocol = acc_index(D)
    q_addr = [64 * cw * 128 for cw in range(nc)]
    for c in range(grid):
        work = [I for I in items[c::grid] if I is not None]
        ring = [(I, it) for I in work for it in range(I["n_tiles"])]      # tiles in ring order (g)
        smem = np.full((q_bytes + kS * stage_bytes) // 2, np.nan, np.float32)   # unwritten = NaN
        produced = 0
        # the producer's cursor (kernel: Tile): per thread, the page (q, r) of its key `own` of
        # the last tile produced, stepped by BN keys per tile, reset at an item's first tile
        per, step = BN * chunks // 128, 128 // chunks
        t = np.arange(128)
        ch, tok0 = t % chunks, t // chunks
        own = tok0 + step * ch                       # the key each thread looks up
        own_q, own_r = own // bs, own % bs           # once per thread (the kernel's only division)
        step_q, step_r = BN // bs, BN % bs
        cur = dict(q=own_q.copy(), r=own_r.copy())

        def produce_next():          # the producer warpgroup's copies of ring tile `produced`
            nonlocal produced
            I, it = ring[produced]
            if it == 0:
                cur["q"], cur["r"] = own_q.copy(), own_r.copy()
            else:                    # kBN keys on: quotient and remainder without a division
                r = cur["r"] + step_r
                cur["q"], cur["r"] = cur["q"] + step_q + (r >= bs), np.where(r >= bs, r - bs, r)
            assert (cur["q"] == (it * BN + own) // bs).all() and (cur["r"] == (it * BN + own) % bs).all()
            key_in = it * BN + own < I["L"]
            page = np.array([bt[I["b"]][q] if ok else 0 for q, ok in zip(cur["q"], key_in)])
            off = np.where(key_in, page * page_stride + cur["r"] * Hkv * D + I["kvh"] * D, 0)   # elements
            lim = I["L"] - it * BN - tok0
            base = q_bytes + (produced % kS) * stage_bytes
            for tt in range(128):
                for i in range(per):
                    tok = tok0[tt] + i * step
                    # shfl.idx width `chunks`: lane i of this thread's segment (same tok0) owns key tok
                    src = (tt // chunks) * chunks + i
                    assert own[src] == tok
                    dst = (base + swz(BN, tok, ch[tt])) // 2
                    for flat, half in ((kflat, 0), (vflat, tile_bytes // 2)):
                        if step * i < lim[tt]:
                            o = off[src] + ch[tt] * 8
                            smem[dst + half:dst + half + 8] = flat[o:o + 8]
                        else:                # cp.async with src-size 0: zero fill
                            smem[dst + half:dst + half + 8] = 0
            produced += 1

        def release():               # both warpgroups released a stage: the producer refills it
            if produced < len(ring):
                produce_next()

        for _ in range(min(kS, len(ring))):
            produce_next()
        gbase = 0
        for I in work:
            for cw in range(nc):       # Q rows of each consumer warpgroup
                for i in range(64 * chunks // 128):
                    cidx = i * 128 + TW
                    rr, ch = cidx // chunks, cidx % chunks
                    grow = I["row0"] + 64 * cw + rr
                    for tw in range(128):
                        dst = swz(BM, 64 * cw + rr[tw], ch[tw]) // 2
                        if grow[tw] < I["rows"]:
                            smem[dst:dst + 8] = qn[I["q0"] + grow[tw] // Gq, I["kvh"] * Gq + grow[tw] % Gq,
                                                   ch[tw] * 8:ch[tw] * 8 + 8]
                        else:
                            smem[dst:dst + 8] = 0
            state = []
            for cw in range(nc):
                rA = 64 * cw + 16 * WARP + G_
                pos = np.stack([np.where(I["row0"] + rA + 8 * r < I["rows"], I["prefix"] + (I["row0"] + rA + 8 * r) // Gq,
                                         I["L"] - 1) for r in range(2)], 1)
                state.append(dict(rA=rA, pos=pos, m=np.full((128, 2), -np.inf, np.float32),
                                  l=np.zeros((128, 2), np.float32), o=np.zeros((128, D // 2), np.float32),
                                  sacc=np.zeros((128, BN // 2), np.float32), pa=None))

            def issue_qk(st, cw, s):
                k_addr = q_bytes + s * stage_bytes
                S = np.zeros((64, BN), np.float32)
                for kk in range(D // 16):
                    koff = (kk & 3) * 32
                    a = kmajor(smem, desc128(q_addr[cw] + (kk >> 2) * (BM * 128) + koff, 16, 1024), 64)
                    bmat = kmajor(smem, desc128(k_addr + (kk >> 2) * (BN * 128) + koff, 16, 1024), BN)
                    S += a @ bmat.T
                st["sacc"] = S[srow, scol]

            def issue_pv(st, s):
                v_addr = q_bytes + s * stage_bytes + tile_bytes
                O = np.zeros((64, D), np.float32)
                O[orow, ocol] = st["o"]
                lo, hi = st["pa"]
                for kk in range(KS):
                    bmat = mnmajor(smem, desc128(v_addr + kk * 16 * 128, BN * 128, 1024), D)
                    O += a_from_regs(lo[:, kk], hi[:, kk]) @ bmat
                st["o"] = O[orow, ocol]

            def softmax(st, it):
                sacc = st["sacc"].copy()
                if it >= I["n_full"]:
                    key = it * BN + scol
                    p_row = st["pos"][:, (np.arange(BN // 2) % 4) >> 1]
                    sacc[key > p_row] = -np.inf
                half = [[4 * i + j for i in range(NB) for j in js] for js in ((0, 1), (2, 3))]
                mx = np.stack([np.max(sacc[:, h], 1) for h in half], 1)
                mx = mx.reshape(4, 8, 4, 2).max(axis=2, keepdims=True).repeat(4, axis=2).reshape(128, 2)  # quad
                m_new = np.maximum(st["m"], mx * scale_log2)
                m_use = np.where(m_new == -np.inf, 0.0, m_new).astype(np.float32)
                alpha = np.exp2(st["m"] - m_use)
                st["m"] = m_new
                p = np.exp2(sacc * scale_log2 - m_use[:, (np.arange(BN // 2) % 4) >> 1]).astype(np.float32)
                st["l"] = st["l"] * alpha + np.stack([p[:, h].sum(1) for h in half], 1)
                st["o"] = st["o"] * alpha[:, (np.arange(D // 2) % 4) >> 1]
                pr = round_to(p, dtype)                           # Mma<T>::pack rounds to T
                lo = np.stack([pr[:, [8 * kk + 2 * r for r in range(4)]] for kk in range(KS)], 1)
                hi = np.stack([pr[:, [8 * kk + 2 * r + 1 for r in range(4)]] for kk in range(KS)], 1)
                st["pa"] = (lo, hi)                               # [128, kk, reg]

            n_tiles = I["n_tiles"]
            for cw in range(nc):
                issue_qk(state[cw], cw, gbase % kS)
                softmax(state[cw], 0)
            for it in range(1, n_tiles):
                gi = gbase + it
                for cw in range(nc):
                    issue_pv(state[cw], (gi - 1) % kS)
                    issue_qk(state[cw], cw, gi % kS)
                release()                                         # tile gi-1's stage
                for cw in range(nc):
                    softmax(state[cw], it)
            for cw in range(nc):
                issue_pv(state[cw], (gbase + n_tiles - 1) % kS)
            release()
            gbase += n_tiles

            for cw in range(nc):                                   # epilogue
                st = state[cw]
                l = st["l"].reshape(4, 8, 4, 2).sum(axis=2, keepdims=True).repeat(4, axis=2).reshape(128, 2)
                for r in range(2):
                    grow = I["row0"] + st["rA"] + 8 * r
                    for tw in np.nonzero(grow < I["rows"])[0]:
                        cols = [8 * i + 2 * T_[tw] + d for i in range(D // 8) for d in (0, 1)]
                        vals = [st["o"][tw, 4 * i + 2 * r + d] / l[tw, r] for i in range(D // 8) for d in (0, 1)]
                        out[I["q0"] + grow[tw] // Gq, I["kvh"] * Gq + grow[tw] % Gq, cols] = torch.tensor(vals)
    return out


# --------------------------------------------------------------------------- the test
def _case(Hq, Hkv, D, bs, prefixes, chunks, dtype, seed=0, grid=None, pad=0, nc=2):
    """pad > 0: pages `pad` rows longer than block_size (page stride > page, garbage between pages)."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + c for p, c in zip(prefixes, chunks)]
    nblocks = sum(math.ceil(n / bs) for n in lens) + 3
    k = (torch.rand(nblocks, bs + pad, Hkv, D, generator=g) * 100 - 50).to(dtype)[:, :bs]  # garbage outside the contexts
    v = (torch.rand(nblocks, bs + pad, Hkv, D, generator=g) * 100 - 50).to(dtype)[:, :bs]
    perm = torch.randperm(nblocks, generator=g)
    width = max(math.ceil(n / bs) for n in lens) + 1
    bt = torch.full((len(lens), width), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(lens):
        need = math.ceil(n / bs)
        bt[b, :need] = perm[at:at + need].to(torch.int32)
        at += need
        pos = torch.arange(n)
        blocks = bt[b, pos // bs].long()
        k[blocks, pos % bs] = torch.randn(n, Hkv, D, generator=g).to(dtype)
        v[blocks, pos % bs] = torch.randn(n, Hkv, D, generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(chunks).cumsum(0).tolist(), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(sum(chunks), Hq, D, generator=g).to(dtype)
    scale = D ** -0.5
    out = torch.full((sum(chunks), Hq, D), float("nan"))
    emulate(q, k, v, cu, ctx, bt, scale, out, grid=grid, nc=nc)
    ref = A.paged_prefill_attention_ref(q, k, v, cu, ctx, bt.clamp_min(0), scale, out=torch.empty_like(out))
    return out, ref


@pytest.mark.parametrize("Hq,Hkv,D,bs,prefixes,chunks", [
    (8, 2, 64, 16, [0, 37, 130], [1, 70, 20]),          # G = 4: prefix 0, chunk 1, several tiles
    (14, 2, 64, 16, [600], [30]),                        # G = 7 (Qwen2.5), 4 stages of 128 keys wrap
    (4, 2, 128, 16, [450, 0], [9, 40]),                  # D = 128: two column blocks, 3 stages wrap
    (2, 2, 128, 48, [100], [150]),                       # G = 1, pages not a power of two, 2 row tiles
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_kernel_logic_matches_reference(Hq, Hkv, D, bs, prefixes, chunks, dtype):
    out, ref = _case(Hq, Hkv, D, bs, prefixes, chunks, dtype)
    assert torch.isfinite(out).all(), "a row the kernel should write was left unwritten"
    err = float((out - ref).norm() / ref.norm())
    assert err < (2e-3 if dtype == torch.bfloat16 else 1e-3), err


@pytest.mark.parametrize("D", [64, 128])
def test_persistent_grid_runs_the_ring_across_items(D):
    """The persistent plan (grid smaller than the items): each CTA's ring of stages and the
    producer's prefetch run on across items (a stage holds the next item's tile while the last
    one's P V is pending); ragged items of 1 to 6 tiles, items past short chunks skipped."""
    out, ref = _case(8, 2, D, 16, [0, 300, 5, 700], [150, 40, 1, 90], torch.bfloat16, grid=3)
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bs,pad", [(1, 0), (7, 1), (32, 3), (128, 0), (200, 2), (256, 0)])
def test_producer_pages_any_block_size(D, bs, pad):
    """The producer's page arithmetic (quotient and remainder of each thread's key, stepped by 128
    keys per tile, reset per item; one table load per thread and tile, its row offset shuffled to
    the threads that copy the key) for block sizes below, at and above the 128-key tile, powers of
    two or not, pages apart by more than a page, over a persistent grid (the cursor crosses items)."""
    out, ref = _case(8, 2, D, bs, [0, 300, 5, 260], [150, 40, 1, 9], torch.bfloat16, grid=3, pad=pad)
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.parametrize("grid", [None, 3])
@pytest.mark.parametrize("Hq,Hkv,prefixes,chunks", [
    (14, 2, [0, 600, 37], [1, 30, 70]),        # G = 7: 192-row items cut mid-query, 4 stages wrap
    (8, 2, [0, 300, 5, 700], [150, 40, 1, 90]),  # G = 4: several row tiles, ragged
])
def test_three_consumer_warpgroups_match_reference(Hq, Hkv, prefixes, chunks, grid):
    """The wgmma3 plans' kernel (three consumer warpgroups, 192-row items, head dim 64, bf16):
    items, Q staging of each warpgroup's 64 rows into the 192-row Q tile and its descriptors, one
    item per CTA and persistent."""
    out, ref = _case(Hq, Hkv, 64, 16, prefixes, chunks, torch.bfloat16, grid=grid, nc=3)
    assert torch.isfinite(out).all(), "a row the kernel should write was left unwritten"
    assert float((out - ref).norm() / ref.norm()) < 2e-3


def test_emulation_catches_a_wrong_descriptor():
    """The emulation is not vacuous: the V descriptor with LBO and SBO swapped (the likeliest
    mistake in the MN-major operand) gives a wrong answer."""
    global desc128
    good = desc128
    try:
        def swapped(saddr, lbo, sbo):
            return good(saddr, sbo, lbo) if lbo == BN * 128 else good(saddr, lbo, sbo)
        desc128 = swapped
        out, ref = _case(4, 2, 128, 16, [170], [10], torch.bfloat16)
        assert float((out - ref).norm() / ref.norm()) > 0.1
    finally:
        desc128 = good
