"""Fused Gumbel-max sampling in one pass over the logits (Triton), split over the vocabulary.

Per row: temperature scaling, the counter-based noise of ``sampling.hash_uniform`` computed in
registers (uint32 arithmetic wraps exactly as the reference's masked int64), the running argmax of
``x/t + gumbel`` (greedy rows: of ``x``), an online log-sum-exp for the behaviour log-prob, and the
NaN/+inf flag (read off the log-sum-exp: a NaN or +inf logit makes the sum NaN). Reads each logit
once. Top-k / top-p rows need a sort and take the reference path.

v2 (session 8), per element of a sampled row (see bench/NOTES.md "Session 8" for the counts):
- no cross-warp reduction in the loop: each program sweeps its slice in 4096-column blocks held as
  a [512, 8] tile (one 16-byte vector of bf16 per tile row, so a tile row lives in one thread). Every
  tile slot keeps its own best key and the block it came from; every tile row keeps its own running
  max and sum (the rescale is one exp2 per 8 entries). The program reduces across the tile once, at
  the end;
- one murmur3 finaliser per entry (was three), its first xor-shift hoisted (``sampling.colmix``);
- log2 units throughout (``c = log2(e) / t`` folds the temperature and the base change into one
  multiply): key = x*c - log2(-log2 u), the Gumbel key in base 2 (same argmax as x/t + g);
- on the GPU the two logs are MUFU ``lg2.approx`` except where that is inaccurate: ``-log2(u)`` for
  u near 1 (the winners' region: lg2.approx has an absolute error of ~2^-22.6 there, which would be
  a relative error of order 1 in E = -log2(u) ~ 1e-7) comes from a polynomial in v = 1 - u (exact);
- greedy rows take a branch of their own (argmax of x, no noise).
"""
from __future__ import annotations

import torch

from ._backend import sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

__all__ = ["gumbel_sample", "available", "neg_log2_uniform"]

_BLOCK = 4096          # columns per step of a program; must be 2**sampling.COL_SPLIT (the hoisted hash)
_VEC = 8               # tile row: 8 logits = one 16-byte load of bf16


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = x * 0x85EBCA6B
        x = x ^ (x >> 13)
        x = x * 0xC2B2AE35
        return x ^ (x >> 16)

    @triton.jit
    def _shr(x, n: tl.constexpr):
        # x >> n as the high word of x * 2^(32-n): an IMAD.HI on the FMA pipe instead of a shift on the
        # integer ALU pipe, the loop's busiest (ptxas keeps it)
        return tl.umulhi(x, 1 << (32 - n))

    @triton.jit
    def _neg_lg2(x, FAST: tl.constexpr):
        if FAST:     # MUFU.LG2 (abs. error ~2^-22.6 in [0.5, 2], 2 ulp elsewhere), negated inside the asm: a
                     # negation of the asm's result is an integer xor, not folded into its consumer
            return tl.inline_asm_elementwise("{ .reg .f32 t; lg2.approx.ftz.f32 t, $1; neg.f32 $0, t; }",
                                             "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return -tl.log2(x)

    @triton.jit
    def _load(base, wbase, start, lane, wlane, hi, WORDS: tl.constexpr):
        """The tile of columns start + lane (masked to < hi), raw as loaded. WORDS: bf16 pairs as uint32
        words (the row is even-aligned and hi even): converted by one shift or mask per logit in
        _to_f32, where a bf16 load costs a byte permute and a shift."""
        if WORDS:
            return tl.load(wbase + start // 2 + wlane, mask=wlane < (hi - start) // 2, other=0xFF80FF80)  # -inf x2
        else:
            return tl.load(base + start + lane, mask=start + lane < hi, other=float("-inf"))

    @triton.jit
    def _to_f32(raw, R: tl.constexpr, VEC: tl.constexpr, WORDS: tl.constexpr):
        if WORDS:     # little-endian: the low half is the even column
            lo = (raw << 16).to(tl.float32, bitcast=True)
            hi = (raw & 0xFFFF0000).to(tl.float32, bitcast=True)
            return tl.reshape(tl.join(lo, hi), (R, VEC))
        else:
            return raw.to(tl.float32)

    @triton.jit
    def _row_lse_step(raw, c, Mc, s):
        """One block of the per-tile-row online log-sum-exp in log2 units: (new max of raw*c, new sum).
        -inf entries add 0; a NaN or +inf entry makes the sum NaN (the bad flag)."""
        mn = tl.maximum(Mc, tl.max(raw, 1) * c)          # c > 0: max(raw) * c == max(raw * c)
        base = tl.where(mn == float("-inf"), 0.0, mn)   # all -inf so far: keep exp2 away from -inf - -inf
        p = tl.exp2(raw * c - base[:, None])
        return mn, s * tl.exp2(Mc - base) + tl.sum(p, 1)

    @triton.jit
    def _neg_log2_uniform(bits, FAST: tl.constexpr):
        """E = -log2(u) for u = (2k + 1) / 2^24, given bits = k | 0x3F800000 (the float 1 + k / 2^23).

        For u > 15/16 from v = 1 - u (exact) as v * poly(v), a near-minimax fit of -log2(1 - v) / v on
        [0, 1/16] (relative error < 1.4e-7 over the grid of u, evaluated in float32); lg2.approx there
        would be off by up to 2^-22.6 absolute, i.e. by 100% at E ~ 1e-7, where the winners live. Else
        lg2 (relative error < 2e-6 where E > 0.093)."""
        u = bits.to(tl.float32, bitcast=True) - 0.99999994039535522   # (2k + 1) / 2^24, exact
        v = 1.0 - u
        q = v * 0.39957576990127563 + 0.47934022545814514
        q = v * q + 0.7213672399520874
        q = v * q + 1.4426950216293335
        return tl.where(v < 0.0625, v * q, _neg_lg2(u, FAST))

    @triton.jit
    def _noise_kernel(k_ptr, out_ptr, n, BLOCK: tl.constexpr, FAST: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        k = tl.load(k_ptr + i, mask=i < n, other=0).to(tl.uint32)
        tl.store(out_ptr + i, _neg_log2_uniform((k & 0x7FFFFF) | 0x3F800000, FAST), mask=i < n)

    @triton.jit
    def _gumbel_partial_kernel(logits_ptr, stride, temp_ptr, key_ptr, pos_ptr, seed_ptr, V, span,
                               best_ptr, bi_ptr, m_ptr, s_ptr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                               FAST: tl.constexpr, WORDS: tl.constexpr):
        """Program (row, split): the vocabulary slice [split*span, (split+1)*span) of one row; span is a
        multiple of BLOCK. Writes the slice's best key and its column (lowest column on ties), and the
        max and sum of its log-sum-exp (log2 units)."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        nsplit = tl.num_programs(1)
        t = tl.load(temp_ptr + row).to(tl.float32)
        greedy = t <= 0.0
        c = 1.4426950408889634 / tl.where(greedy, 1.0, t)      # log2(e) / t: x/t in log2 units
        lo = split * span
        hi = tl.minimum(lo + span, V)
        base = logits_ptr + row.to(tl.int64) * stride
        wbase = logits_ptr.to(tl.pointer_type(tl.uint32)) + row.to(tl.int64) * (stride // 2)   # WORDS only
        R: tl.constexpr = BLOCK // VEC
        lane = tl.arange(0, R)[:, None] * VEC + tl.arange(0, VEC)[None, :]      # [R, VEC], column - start
        wlane = tl.arange(0, R)[:, None] * (VEC // 2) + tl.arange(0, VEC // 2)[None, :]   # WORDS: word index
        Mc = tl.full((R,), float("-inf"), tl.float32)          # per tile row: max of x*c so far
        s = tl.zeros((R,), tl.float32)                          #               sum of exp2(x*c - Mc)
        best = tl.full((R, VEC), float("-inf"), tl.float32)    # per slot: best key so far
        bstart = tl.full((R, VEC), 0, tl.int32) + lo            #           the block it came from
        nxt = _load(base, wbase, lo, lane, wlane, hi, WORDS)
        if greedy:
            for start in range(lo, hi, BLOCK):
                raw = _to_f32(nxt, R, VEC, WORDS)
                nxt = _load(base, wbase, start + BLOCK, lane, wlane, hi, WORDS)
                Mc, s = _row_lse_step(raw, c, Mc, s)
                take = raw > best                               # strict: the earliest block keeps a tie
                best = tl.where(take, raw, best)
                bstart = tl.where(take, start, bstart)
        else:
            key = tl.load(key_ptr + row).to(tl.uint32)
            pos = tl.load(pos_ptr + row).to(tl.uint32)
            seed = tl.load(seed_ptr).to(tl.uint32)          # a tensor: an int argument of 1 would be specialised
            rowhash = _mix32(_mix32(key * 0x9E3779B1 + seed) ^ (pos * 0x7FEB352D))
            lo_mix = lane.to(tl.uint32) * 0x9E3779B1            # sampling.colmix, low part (lane = col & 4095)
            lo_mix = lo_mix ^ (lo_mix >> 16)                    # ... with the finaliser's first xor-shift
            for start in range(lo, hi, BLOCK):
                raw = _to_f32(nxt, R, VEC, WORDS)
                nxt = _load(base, wbase, start + BLOCK, lane, wlane, hi, WORDS)
                Mc, s = _row_lse_step(raw, c, Mc, s)
                r = rowhash ^ ((tl.cast(start >> 12, tl.uint32) * 0x7FEB352D) << 12)    # colmix, high part
                h = ((r ^ (r >> 16)) ^ lo_mix) * 0x85EBCA6B
                h = h ^ _shr(h, 13)
                h = h * 0xC2B2AE35
                bits = (_shr(h, 9) ^ _shr(h, 25)) | 0x3F800000  # top 23 bits of the finaliser, as 1.k
                e = _neg_log2_uniform(bits, FAST)
                g = raw * c + _neg_lg2(e, FAST)             # (a negation outside the asm costs a LOP3)
                take = g > best
                best = tl.where(take, g, best)
                bstart = tl.where(take, start, bstart)
        top = tl.max(tl.max(best, 1), 0)
        idx = bstart + lane
        tok = tl.min(tl.min(tl.where(best == top, idx, 2147483647), 1), 0)
        M = tl.max(Mc, 0)
        S = tl.sum(tl.where(Mc == float("-inf"), 0.0, s * tl.exp2(Mc - M)), 0)
        o = row * nsplit + split
        tl.store(best_ptr + o, top)
        tl.store(bi_ptr + o, tok)
        tl.store(m_ptr + o, M)
        tl.store(s_ptr + o, S)

    @triton.jit
    def _gumbel_combine_kernel(logits_ptr, stride, temp_ptr, V, best_ptr, bi_ptr, m_ptr, s_ptr, nsplit,
                               tok_ptr, logp_ptr, rowbad_ptr, SPLITS: tl.constexpr):
        """One row: the first split holding the best key (strict >, as in one pass: the lowest index wins
        ties), the log-sum-exp of the splits' (max, sum) pairs, the chosen logit read back."""
        row = tl.program_id(0)
        j = tl.arange(0, SPLITS)
        ok = j < nsplit
        o = row * nsplit + j
        best = tl.load(best_ptr + o, mask=ok, other=float("-inf"))
        m = tl.load(m_ptr + o, mask=ok, other=float("-inf"))
        s = tl.load(s_ptr + o, mask=ok, other=0.0)
        top = tl.max(best, 0)
        first = tl.min(tl.where(best == top, j, SPLITS), 0)
        first = tl.minimum(first, nsplit - 1)                  # NaN keys (a bad row): any split
        tok = tl.load(bi_ptr + row * nsplit + first)
        tok = tl.minimum(tl.maximum(tok, 0), V - 1)            # in range even for a bad or all -inf row
        mm = tl.max(m, 0)
        tot = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp2(m - mm)), 0)
        t = tl.load(temp_ptr + row).to(tl.float32)
        c = 1.4426950408889634 / tl.where(t <= 0.0, 1.0, t)    # the partial kernel's c, bit for bit
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + tok).to(tl.float32)
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(logp_ptr + row, (x * c - mm - tl.log2(tot)) * 0.69314718055994531)
        tl.store(rowbad_ptr + row, (tot != tot).to(tl.int8))


_seeds: dict = {}


def _seed_tensor(seed: int, device: torch.device) -> torch.Tensor:
    """The seed on the device, made once: ``torch.tensor(..., device=cuda)`` from a Python list is a
    synchronous copy, which would stall the host behind the GPU at every decode step."""
    key = (seed & 0xFFFFFFFF, device)
    t = _seeds.get(key)
    if t is None:
        t = _seeds[key] = torch.tensor([key[0]], dtype=torch.int64).to(device)
    return t


# Programs of the partial kernel resident per SM: 256 threads at <= 128 registers (sm_90 SASS of the
# bf16 kernel: see bench/NOTES.md, session 8) -> 2 of them in 64k registers.
_PROGRAMS_PER_SM = 2


def _splits(B: int, V: int, device: torch.device) -> int:
    """Vocabulary splits per row: as many as fill one wave of resident programs without a second
    (floor, not ceil: B=64 on 132 SMs gets 4 splits, 256 programs in 264 slots, where 5 would run
    320 programs in two waves of the same length), at least one 4096-logit block per split."""
    if device.type != "cuda":
        return min(3, triton.cdiv(V, _BLOCK))      # the interpreter: exercise the combine
    slots = _PROGRAMS_PER_SM * sm_count(device)
    return max(1, min(triton.cdiv(V, _BLOCK), slots // max(B, 1), 64))


def split_layout(B: int, V: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(splits, span): the partial kernel's grid over the vocabulary, whole 4096-column blocks per
    split (``splits``: asked for, else _splits'; the count is recomputed from the span)."""
    span = triton.cdiv(triton.cdiv(V, splits or _splits(B, V, device)), _BLOCK) * _BLOCK
    return triton.cdiv(V, span), span


def neg_log2_uniform(k: torch.Tensor) -> torch.Tensor:
    """The kernel's exponential noise E = -log2(u), u = (2k + 1) / 2^24, for 23-bit integers k (any
    integer dtype), float32: how the sampler turns its hash into noise, exposed for the tests."""
    out = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    n = k.numel()
    if n:
        kk = k.reshape(-1).to(torch.int32).contiguous()
        _noise_kernel[(triton.cdiv(n, 4096),)](kk, out.view(-1), n, BLOCK=4096, FAST=k.device.type == "cuda")
    return out


def _words(logits: torch.Tensor) -> bool:
    """bf16 logits readable as uint32 pairs: even row stride and width, 4-byte aligned."""
    return (logits.dtype == torch.bfloat16 and logits.stride(0) % 2 == 0 and logits.shape[1] % 2 == 0
            and logits.data_ptr() % 4 == 0)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int, seq_keys: torch.Tensor,
                  positions: torch.Tensor, splits: int | None = None):
    """(tokens int64 [B], behaviour log-probs float32 [B], bad bool [B]) without top-k/top-p.

    Two kernels: (row, vocabulary split) partials (best Gumbel key and its column, max and sum of the
    log-sum-exp), then one program per row combines them and reads the chosen logit back."""
    B, V = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    dev = logits.device
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float32, device=dev)
    bad = torch.empty(B, dtype=torch.int8, device=dev)
    if B:
        S, span = split_layout(B, V, dev, splits)
        f = torch.empty(3, B, S, dtype=torch.float32, device=dev)
        i = torch.empty(B, S, dtype=torch.int32, device=dev)
        temp = temperature.float().contiguous()
        _gumbel_partial_kernel[(B, S)](logits, logits.stride(0), temp,
                                       seq_keys.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous(),
                                       _seed_tensor(seed, dev), V, span, f[0], i, f[1], f[2],
                                       BLOCK=_BLOCK, VEC=_VEC, FAST=dev.type == "cuda", WORDS=_words(logits),
                                       num_warps=8)
        _gumbel_combine_kernel[(B,)](logits, logits.stride(0), temp, V, f[0], i, f[1], f[2], S, tok, logp, bad,
                                     SPLITS=max(2, triton.next_power_of_2(S)), num_warps=1)
    return tok, logp, bad.bool()
