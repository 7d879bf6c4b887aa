"""The claimed tiles of paged_decode_kernel's kCL loop (OPPO_DECODE_CLAIM=1), simulated on the CPU.

A group's splits run their iterations under a random scheduler, each with the kernel's own index
arithmetic (kernels/paged_decode_attention.cuh): the tiles it keeps (the first F of its partition's
PT, F = PT - PT / 4), the ring of 8 stream positions that thread 0 fills kStages + 2 positions ahead,
and the claims, one atomicAdd on the group's counter per position past its own tiles, issued one
iteration before the claim is read. Checked over ragged contexts, every split count and both
prefetch depths the kernel's stages allow: every tile of the context is computed exactly once, every
ring slot read holds the position the reader expects (no slot overwritten while still to be read),
the tiles a split loads are the tiles it later computes, and splits past the context never claim.
A mutation (the claim read in the iteration it is issued, i.e. no slack for the atomic, or the ring
filled one position later) makes the checks fail, so they are not vacuous.
"""
from __future__ import annotations

import random

import pytest

TILE = 64


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def simulate(ctx: int, num_splits: int, partition: int, k_stages: int, seed: int, lag: int = 1,
             ahead: int = 2, per_split: list | None = None) -> dict[int, int]:
    """Runs the group's splits to the end; returns {tile: times computed} (and, into ``per_split``,
    (speed, tiles computed) of each split). ``lag`` 1 is the kernel (a claim is read one iteration
    after it is issued); ``ahead`` 2 is the kernel (thread 0 fills the position kStages + 2 ahead)."""
    rng = random.Random(seed)
    part_tiles = partition // TILE
    keep = part_tiles - part_tiles // 4
    pool = part_tiles // 4 if keep >= k_stages + 3 else 0
    counter = [0]
    done: dict[int, int] = {}

    class Split:
        def __init__(self, s: int):
            self.start = s * partition
            self.claimer = pool > 0 and self.start + keep * TILE <= ctx
            end = ctx if pool > 0 else min(ctx, self.start + partition)
            self.ntiles = (_ceil_div(min(ctx, self.start + keep * TILE) - self.start, TILE) if pool > 0
                           else _ceil_div(end - self.start, TILE) if end > self.start else 0)
            self.ring: list = [None] * 8          # (position, first token)
            for p in range(k_stages + ahead):
                self.ring[p] = (p, self.start + p * TILE if p < self.ntiles else -1)
            self.t, self.spent, self.pending = 0, False, {}
            self.loaded: dict[int, int] = {}

        def read(self, p: int) -> int:
            assert self.ring[p & 7] is not None, f"slot {p & 7} read as position {p} before any write"
            pos, tok = self.ring[p & 7]
            assert pos == p, f"split at {self.start}: slot {p & 7} holds position {pos}, read as {p}"
            return tok

        def step(self) -> bool:                   # one iteration; False once the stream has ended
            t = self.t
            tok_t = self.read(t)
            if tok_t < 0:
                return False
            tok_load = self.read(t + k_stages - 1)
            if tok_load >= 0:
                self.loaded[t + k_stages - 1] = tok_load
            self.read(t + k_stages)               # the offsets' row positions
            self.read(t + k_stages + 1)           # the pages' row positions
            u = t + k_stages + ahead              # thread 0
            tok = -1
            if u < self.ntiles:
                tok = self.start + u * TILE
            elif self.claimer and not self.spent:
                c = self.pending.pop(u)
                tile = (c // pool) * part_tiles + keep + c % pool
                if tile < _ceil_div(ctx, TILE):
                    tok = tile * TILE
                else:
                    self.spent = True
            self.ring[u & 7] = (u, tok)
            claim_for = u + lag
            if self.claimer and not self.spent and claim_for >= self.ntiles:
                self.pending[claim_for] = counter[0]
                counter[0] += 1
            assert self.loaded.get(t, tok_t) == tok_t, f"tile loaded for position {t} is not the one computed"
            done[tok_t // TILE] = done.get(tok_t // TILE, 0) + 1
            self.t += 1
            return True

    nvalid = min(num_splits, _ceil_div(ctx, partition)) if ctx > 0 else 0
    live = [Split(s) for s in range(nvalid)]
    speed = [rng.choice([1, 1, 1, 2, 3]) for _ in live]     # splits on faster SMs step more often
    if per_split is not None:
        per_split.extend((v, sp) for v, sp in zip(speed, live))
    while live:
        i = rng.choices(range(len(live)), weights=speed)[0]
        if not live[i].step():
            live.pop(i)
            speed.pop(i)
    if per_split is not None:
        per_split[:] = [(v, sp.t) for v, sp in per_split]
    return done


def _cases():
    out = []
    for num_splits, part_tiles in ((32, 16), (8, 64), (2, 8), (4, 6), (3, 12), (16, 4), (5, 7)):
        partition = part_tiles * TILE
        full = num_splits * partition
        for ctx in (1, 63, 64, 65, partition - 1, partition, partition + 1, full // 2 + 17, full - 64, full - 1,
                    full):
            if 0 < ctx <= full:
                out.append((ctx, num_splits, partition))
    return out


@pytest.mark.parametrize("k_stages", [3, 2])
@pytest.mark.parametrize("ctx,num_splits,partition", _cases())
def test_every_tile_once_and_every_ring_slot_as_expected(ctx, num_splits, partition, k_stages):
    for seed in range(6):
        done = simulate(ctx, num_splits, partition, k_stages, seed)
        tiles = _ceil_div(ctx, TILE)
        assert sorted(done) == list(range(tiles)), f"tiles computed {sorted(done)}, context has {tiles}"
        assert all(n == 1 for n in done.values()), f"a tile computed twice: {done}"


def test_claims_give_the_pool_to_the_faster_splits():
    """What the claims are for: at issue 7's (1, 32768) plan (32 splits of 16 tiles, 12 kept), the
    splits that step three times as often compute more tiles than the slow ones, all of the pool's
    surplus coming from claims (a static split would give each exactly 16)."""
    splits: list = []
    simulate(32768, 32, 1024, 3, 1, per_split=splits)
    fast = [n for v, n in splits if v == 3]
    slow = [n for v, n in splits if v == 1]
    assert fast and slow and min(fast) > max(slow) >= 12, splits


@pytest.mark.parametrize("lag,ahead", [(0, 2), (1, 1)])
def test_the_checks_catch_a_claim_read_too_early_or_a_ring_filled_late(lag, ahead):
    """Not vacuous: the claim read in the iteration it is issued (no slack for the atomic), or the
    ring filled one position later than the pages are read, fails the checks."""
    with pytest.raises((AssertionError, KeyError)):
        for seed in range(10):
            simulate(32768, 32, 1024, 3, seed, lag=lag, ahead=ahead)
