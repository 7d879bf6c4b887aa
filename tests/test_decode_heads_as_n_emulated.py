"""decode_tile_update_hn's fragment maps (kernels/paged_decode_attention.cuh), emulated on the CPU.

OPPO_DECODE_HEADS_AS_N=1 turns decode's tile around: S^T = K Q^T with the warp's 16 tokens as the
mma's M and the (<= 8) heads as its N, and O^T += V^T P^T with P^T made by movmatrix from the
packed C fragments. No GPU runs here, so this test replays what the 32 lanes of a warp do, in
numpy, with the fragment semantics of the PTX ISA: ldmatrix (.x4, with and without .trans: lane
8i + r gives row r of matrix i; lane T receives row T / 4, columns 2 (T % 4) .. + 1, or with .trans
the transpose's), mma.m16n8k16 (A rows g / g + 8 and k 2c / 2c + 8; B k 2c / 2c + 8 and column g;
C rows g / g + 8, columns 2c, 2c + 1; g = lane / 4, c = lane % 4) and movmatrix.m8n8.trans (the
same layout, of the transpose). The addresses, masks, shuffles, softmax and the warp's partials in
shared memory are transliterated from the kernel.

The same emulator first replays the 16-row form (decode_tile_update, the default kernel's, which
the GPU tests check on the card): if the fragment semantics here were wrong, that replay would
miss the reference. What it cannot check: the hardware itself (the GPU tests do), timing.
"""
from __future__ import annotations

import numpy as np
import pytest

# ------------------------------------------------------------------ fragment semantics (PTX ISA)
LANES = np.arange(32)
G, C = LANES // 4, LANES % 4


def ldmatrix_x4(smem: np.ndarray, addr, trans: bool = False) -> np.ndarray:
    """[32 lanes, 4 regs, 2 halves]: lane 8i + r's address (row, col) starts row r of matrix i."""
    mats = np.stack([np.stack([smem[addr[8 * i + r][0], addr[8 * i + r][1]:addr[8 * i + r][1] + 8]
                               for r in range(8)]) for i in range(4)])          # [4, 8, 8]
    if trans:
        mats = mats.transpose(0, 2, 1)
    return np.stack([mats[:, G[t], 2 * C[t]:2 * C[t] + 2] for t in range(32)])   # [32, 4, 2]


def a_matrix(a: np.ndarray) -> np.ndarray:
    """The 16 x 16 A operand of mma.m16n8k16 from its per-lane registers a[lane, 0..3, half]."""
    m = np.zeros((16, 16))
    for t in range(32):
        g, c = G[t], C[t]
        m[g, 2 * c:2 * c + 2], m[g + 8, 2 * c:2 * c + 2] = a[t, 0], a[t, 1]
        m[g, 2 * c + 8:2 * c + 10], m[g + 8, 2 * c + 8:2 * c + 10] = a[t, 2], a[t, 3]
    return m


def b_matrix(b: np.ndarray) -> np.ndarray:
    """The 16 x 8 B operand from b[lane, 0..1, half]: b0 = (k 2c, 2c + 1; n g), b1 = (k 2c + 8, +9; n g)."""
    m = np.zeros((16, 8))
    for t in range(32):
        g, c = G[t], C[t]
        m[2 * c:2 * c + 2, g], m[2 * c + 8:2 * c + 10, g] = b[t, 0], b[t, 1]
    return m


def mma(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """acc[lane, 4] += (A B) in C's fragment layout: c0, c1 = (row g, cols 2c, 2c + 1), c2, c3 = row g + 8."""
    d = a_matrix(a) @ b_matrix(b)
    out = acc.copy()
    for t in range(32):
        g, c = G[t], C[t]
        out[t] += [d[g, 2 * c], d[g, 2 * c + 1], d[g + 8, 2 * c], d[g + 8, 2 * c + 1]]
    return out


def movmatrix_trans(x: np.ndarray) -> np.ndarray:
    """x[lane, 2]: row lane / 4, cols 2 (lane % 4) .. + 1 of an 8 x 8 matrix -> the transpose's, same layout."""
    m = np.zeros((8, 8))
    for t in range(32):
        m[G[t], 2 * C[t]:2 * C[t] + 2] = x[t]
    return np.stack([m.T[G[t], 2 * C[t]:2 * C[t] + 2] for t in range(32)])


def shfl_xor(v: np.ndarray, mask: int) -> np.ndarray:
    return v[LANES ^ mask]


def rnd(x):
    """bf16 rounding (to nearest even) of float64 values, as Mma<bf16>::pack."""
    f = np.asarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return u.view(np.float32).astype(np.float64)


# ------------------------------------------------------------------ the kernel's two tile updates
def tile_update_16(k_s, v_s, q_s, tok0, end, scale_log2, m, l, o, D):
    """decode_tile_update (QFragRegs: Q's A fragments by ldmatrix of rows lane & 15, col (lane >> 4) 8)."""
    mi = LANES >> 3
    s = np.zeros((2, 32, 4))
    for kk in range(D // 16):
        qa = ldmatrix_x4(q_s, [(t & 15, kk * 16 + (t >> 4) * 8) for t in range(32)])
        kb = ldmatrix_x4(k_s, [((t & 7) + (mi[t] >> 1) * 8, kk * 16 + (mi[t] & 1) * 8) for t in range(32)])
        s[0] = mma(s[0], qa, kb[:, 0:2])
        s[1] = mma(s[1], qa, kb[:, 2:4])
    tok = tok0 + 2 * C                          # the kernel's tok0 includes qc * 2
    for nt in range(2):
        for e in range(4):
            s[nt][:, e] = np.where(tok + nt * 8 + (e & 1) < end, s[nt][:, e] * scale_log2, -np.inf)
    for h in range(2):
        mx = np.maximum(np.maximum(s[0][:, 2 * h], s[0][:, 2 * h + 1]), np.maximum(s[1][:, 2 * h], s[1][:, 2 * h + 1]))
        mx = np.maximum(mx, shfl_xor(mx, 1))
        mx = np.maximum(mx, shfl_xor(mx, 2))
        m_new = np.maximum(m[:, h], mx)
        m_use = np.where(m_new == -np.inf, 0.0, m_new)
        corr = np.exp2(m[:, h] - m_use)
        m[:, h] = m_new
        tot = 0
        for nt in range(2):
            s[nt][:, 2 * h] = np.exp2(s[nt][:, 2 * h] - m_use)
            s[nt][:, 2 * h + 1] = np.exp2(s[nt][:, 2 * h + 1] - m_use)
            tot = tot + s[nt][:, 2 * h] + s[nt][:, 2 * h + 1]
        l[:, h] = l[:, h] * corr + tot
        o[:, :, 2 * h] *= corr[:, None]
        o[:, :, 2 * h + 1] *= corr[:, None]
    px = np.stack([s[0][:, 0], s[0][:, 2], s[1][:, 0], s[1][:, 2]], 1)
    py = np.stack([s[0][:, 1], s[0][:, 3], s[1][:, 1], s[1][:, 3]], 1)
    ph = np.stack([rnd(px), rnd(py)], 2)
    pl = np.stack([rnd(px - ph[..., 0]), rnd(py - ph[..., 1])], 2)
    for jj in range(D // 16):
        vb = ldmatrix_x4(v_s, [((t & 7) + (mi[t] & 1) * 8, jj * 16 + (mi[t] >> 1) * 8) for t in range(32)], trans=True)
        for half, b in ((0, vb[:, 0:2]), (1, vb[:, 2:4])):
            o[:, 2 * jj + half] = mma(mma(o[:, 2 * jj + half], ph, b), pl, b)


def tile_update_hn(k_s, v_s, qb, tok0, end, scale_log2, m, l, o, D):
    """decode_tile_update_hn, line by line."""
    s = np.zeros((32, 4))
    for kk in range(D // 16):
        ka = ldmatrix_x4(k_s, [(t & 15, kk * 16 + (t >> 4) * 8) for t in range(32)])
        s = mma(s, ka, qb[:, kk])
    for e in range(4):
        s[:, e] = np.where(tok0 + G + (e >> 1) * 8 < end, s[:, e] * scale_log2, -np.inf)
    for h in range(2):
        mx = np.maximum(s[:, h], s[:, 2 + h])
        for msk in (4, 8, 16):
            mx = np.maximum(mx, shfl_xor(mx, msk))
        m_new = np.maximum(m[:, h], mx)
        m_use = np.where(m_new == -np.inf, 0.0, m_new)
        corr = np.exp2(m[:, h] - m_use)
        m[:, h] = m_new
        s[:, h] = np.exp2(s[:, h] - m_use)
        s[:, 2 + h] = np.exp2(s[:, 2 + h] - m_use)
        l[:, h] = l[:, h] * corr + (s[:, h] + s[:, 2 + h])
        o[:, :, h] *= corr[:, None]
        o[:, :, 2 + h] *= corr[:, None]
    ph, pl = np.zeros((32, 2, 2)), np.zeros((32, 2, 2))
    for r in range(2):
        x, y = s[:, 2 * r], s[:, 2 * r + 1]
        hi = np.stack([rnd(x), rnd(y)], 1)
        ph[:, r] = movmatrix_trans(hi)
        pl[:, r] = movmatrix_trans(np.stack([rnd(x - hi[:, 0]), rnd(y - hi[:, 1])], 1))
    for j in range(D // 16):
        va = ldmatrix_x4(v_s, [((t & 7) + (t >> 4) * 8, j * 16 + ((t >> 3) & 1) * 8) for t in range(32)], trans=True)
        o[:, j] = mma(mma(o[:, j], va, ph), va, pl)


# ------------------------------------------------------------------ one warp's share of a CTA, end to end
def _warp_partials(form, q, k, v, end, D, tiles):
    """The warp 0 of a CTA over `tiles` 64-token tiles (its 16 tokens of each), then its partials as
    warp_partials_to_smem(_hn) leave them: per head, the unnormalised o [rows, D], m and l."""
    rows = q.shape[0]
    q_s = np.zeros((16, D))
    q_s[:rows] = q
    scale_log2 = D ** -0.5 * 1.4426950408889634
    m, l = np.full((32, 2), -np.inf), np.zeros((32, 2))
    o = np.zeros((32, D // 8 if form == "16" else D // 16, 4))
    if form == "hn":     # qb[kk]: Q(head g, dims 16 kk + 2c, +1) and (16 kk + 8 + 2c, +1)
        qb = np.stack([np.stack([q_s[G, kk * 16 + 2 * C + i] for i in (0, 1)], -1) for kk in range(D // 16)], 1)
        qb = np.stack([qb, np.stack([np.stack([q_s[G, kk * 16 + 8 + 2 * C + i] for i in (0, 1)], -1)
                                     for kk in range(D // 16)], 1)], 2)                     # [32, D/16, 2, 2]
    for t in range(tiles):
        rows_tok = slice(t * 64, t * 64 + 16)      # warp 0's 16 tokens of tile t
        k_s, v_s = k[rows_tok], v[rows_tok]
        if form == "16":
            tile_update_16(k_s, v_s, q_s, t * 64, end, scale_log2, m, l, o, D)
        else:
            tile_update_hn(k_s, v_s, qb, t * 64, end, scale_log2, m, l, o, D)
    o_m, m_m, l_m = np.zeros((16, D)), np.full(16, np.nan), np.full(16, np.nan)
    if form == "16":     # warp_partials_to_smem
        l = l + l[LANES ^ 1]
        l = l + l[LANES ^ 2]
        for t in range(32):
            if C[t] == 0:
                m_m[G[t]], m_m[G[t] + 8], l_m[G[t]], l_m[G[t] + 8] = m[t, 0], m[t, 1], l[t, 0], l[t, 1]
            for j in range(D // 8):
                o_m[G[t], j * 8 + C[t] * 2:j * 8 + C[t] * 2 + 2] = o[t, j, 0:2]
                o_m[G[t] + 8, j * 8 + C[t] * 2:j * 8 + C[t] * 2 + 2] = o[t, j, 2:4]
    else:                # warp_partials_to_smem_hn
        for msk in (4, 8, 16):
            l = l + l[LANES ^ msk]
        for t in range(32):
            if G[t] == 0:
                for h in range(2):
                    m_m[2 * C[t] + h], l_m[2 * C[t] + h] = m[t, h], l[t, h]
            for j in range(D // 16):
                for e in range(4):
                    o_m[2 * C[t] + (e & 1), 16 * j + G[t] + 8 * (e >> 1)] = o[t, j, e]
    return o_m[:rows], m_m[:rows], l_m[:rows]


@pytest.mark.parametrize("form", ["16", "hn"])
@pytest.mark.parametrize("D,rows,tiles,end", [(64, 7, 2, 64 + 13), (128, 4, 3, 2 * 64 + 16), (64, 8, 1, 9),
                                              (128, 1, 2, 64 + 3), (64, 2, 2, 5)])
def test_warp_partials_equal_the_softmax_of_its_tokens(form, D, rows, tiles, end):
    """Both forms' partials of warp 0 (its 16 tokens of each tile, masked at `end`) give, normalised,
    the softmax-weighted V of those tokens for each head, and their m / l are the tokens' log2 max and
    sum of 2^(s - m): the 16-row form (checked on the GPU) validates the emulated fragment semantics,
    and the heads-as-N form is then checked by them. A tile past `end` (all masked) leaves m at -inf
    for a warp with no token yet, and the partials at zero."""
    rng = np.random.default_rng(D * 100 + rows * 10 + tiles)
    q = rnd(rng.standard_normal((rows, D)))
    k = rnd(rng.standard_normal((tiles * 64, D)))
    v = rnd(rng.standard_normal((tiles * 64, D)))
    o_m, m_m, l_m = _warp_partials(form, q, k, v, end, D, tiles)
    toks = np.array([t * 64 + i for t in range(tiles) for i in range(16) if t * 64 + i < end])
    scale_log2 = D ** -0.5 * 1.4426950408889634
    if toks.size == 0:
        assert np.all(m_m == -np.inf) and np.all(l_m == 0) and np.all(o_m == 0)
        return
    s = q @ k[toks].T * scale_log2                                  # [rows, tokens], log2 domain
    m_ref = s.max(1)
    p = np.exp2(s - m_ref[:, None])
    np.testing.assert_allclose(m_m, m_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(l_m, p.sum(1), rtol=1e-9)
    want = (p @ v[toks]) / p.sum(1)[:, None]
    got = o_m / l_m[:, None]
    # P enters the mma as bf16 hi + lo: the pair carries ~16 bits of P, so ~1e-5 relative
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
