"""The prefill v4 kernel's synchronization, simulated on the CPU (kernels/paged_prefill_wgmma.cuh).

A hang on the GPU costs a whole device call, so the barrier protocol is checked here first: the
producer warpgroup and the two (or, for the wgmma3 plans, three) consumer warpgroups run as
coroutines under a random scheduler,
over mbarriers (arrival counts, phases, parity waits as PTX defines them: a fresh barrier's
"preceding phase" of parity 1 counts as complete) and named barriers (bar.sync waits for the
barrier's thread count, bar.arrive adds to it without waiting). Each program mirrors the
kernel's order of operations, with and without ping-pong. The checks: every run finishes (no
deadlock), a consumer reads a stage only when it holds the tile it expects, the producer never
overwrites a stage a consumer has not released, and every named-barrier phase that starts is
completed (no arrival left over at exit, and no phase completed by one warpgroup's arrivals alone).

kFlagSplitKV (plans ``_kv``) gives K and V separate rings of barriers over the same stages: the
producer commits K(g) and V(g) as two cp.async groups and publishes each one group behind (two
always in flight); here the groups land in any order (a lander coroutine), and
``cp.async.wait_group n`` waits until all but the newest n groups have landed, so publishing a
group before it landed is caught too.

kFlagChain (plans ``_xc``) runs the ring of turns on across a persistent CTA's items; kFlagMerge
(plans ``_mi``) also issues each item's last P V in one batch with the next item's first Q K^T
(the next item's Q staged by each warpgroup into its own rows, which only its own barrier guards).
"""
from __future__ import annotations

import random

import pytest
from _scripts import prefill_item_coords


class MBarrier:
    def __init__(self, count: int):
        self.count, self.pending, self.completed = count, count, 0

    def arrive(self, n: int) -> None:
        self.pending -= n
        assert self.pending >= 0, "more arrivals than the barrier's count in one phase"
        if self.pending == 0:
            self.completed += 1
            self.pending = self.count

    def ready(self, parity: int) -> bool:   # try_wait.parity: the phase of that parity has completed
        return (self.completed & 1) != parity


class NamedBarrier:
    def __init__(self, threads: int):
        self.threads, self.arrived, self.generation = threads, 0, 0
        self.arrivers: list[str] = []

    def arrive(self, who: str, n: int = 128) -> int:
        self.arrived += n
        self.arrivers.append(who)
        gen = self.generation
        if self.arrived == self.threads:
            assert len(set(self.arrivers)) > 1 or self.threads == n, \
                f"a phase completed by {who}'s arrivals alone"
            self.arrived, self.arrivers = 0, []
            self.generation += 1
        assert self.arrived < self.threads
        return gen


KS_PAIR_PV = False   # a mutation of the key-split schedule, for its negative test


def _pp_base(nc: int) -> int:
    """The kernel's Geo<NC>::kPingPongBar: named barriers 1..nc stage Q, then nc for ping-pong."""
    return 1 + nc


def _turns(named: dict, pingpong: bool, cw: int, name: str, nc: int = 2):
    """Consumer warpgroup cw's ping-pong turn, as the kernel's begin_batch / end_batch: begin()
    waits for its turn (bar.sync on barrier base + cw: arrive, then wait for the phase to complete),
    end(last) hands the turn over (bar.arrive on the next one's in the ring, base + (cw + 1) % nc;
    the last warpgroup skips its last)."""
    me, other = _pp_base(nc) + cw, _pp_base(nc) + (cw + 1) % nc

    def begin():
        if pingpong:
            gen = named[me].arrive(name)
            yield lambda: named[me].generation > gen

    def end(last: bool):
        if pingpong and not (last and cw == nc - 1):
            named[other].arrive(name)

    return begin, end


def programs(items: list[int], kS: int, pingpong: bool, log: list, nc: int = 2, chain: bool | str = False,
             merge: bool | str = False, key_split: frozenset = frozenset()):
    """Generators for the producer and the two consumer warpgroups of a CTA that works through
    ``items`` (each a number of key tiles; one item, or several for the persistent plan), the
    ring of stages running on across items; each yields a predicate (callable) it waits on, or
    None to give up the processor."""
    n_total = sum(items)
    full = [MBarrier(128) for _ in range(kS)]
    empty = [MBarrier(128 * nc) for _ in range(kS)]
    named = {_pp_base(nc) + i: NamedBarrier(256) for i in range(nc)}
    ks_bar = NamedBarrier(128 * nc)   # kFlagKeySplit: the consumer warpgroups' barrier
    stage_tile = [None] * kS          # which tile a stage holds (None: being written or empty)
    readers = [set() for _ in range(kS)]

    issue_first = kS >= 4             # the kernel's kIssueFirst

    def publish(t):                   # wait_group, proxy fence, arrive on tile t's full barrier
        st = t % kS
        assert stage_tile[st] == ("landing", t), f"publishing tile {t}, stage {st} holds {stage_tile[st]}"
        stage_tile[st] = t
        full[st].arrive(128)

    def producer():
        # The kernel's producer also loads tile g+1's block-table entries during tile g (after the
        # publish with 3 stages, before the stage wait with 4) and shares row offsets by warp
        # shuffles: neither is a barrier operation, so the order simulated here is unchanged.
        for g in range(n_total):      # g: the ring position (tiles of all items, in order)
            s = g % kS
            p = ((g // kS) & 1) ^ 1
            if g > 0 and not issue_first:   # 3 stages: the previous tile before this tile's stage wait
                publish(g - 1)
            yield lambda s=s, p=p: empty[s].ready(p)
            assert not readers[s], f"producer overwrites stage {s} while {readers[s]} still read it"
            stage_tile[s] = None      # cp.async in flight
            yield None
            stage_tile[s] = ("landing", g)
            if g > 0 and issue_first:       # 4 stages: this tile issued, then the previous one (wait_group 1)
                publish(g - 1)
        publish(n_total - 1)
        log.append("producer done")

    def consumer(cw: int):
        name = f"wg{cw}"
        begin, end = _turns(named, pingpong, cw, name, nc)

        def read(s, it):
            assert stage_tile[s] == it, f"{name} reads stage {s} expecting tile {it}, it holds {stage_tile[s]}"
            readers[s].add(name)

        def release(s):
            readers[s].discard(name)
            empty[s].arrive(128)

        def ks_sync():                 # bar.sync on the consumers' barrier
            gen = ks_bar.arrive(name)
            yield lambda: ks_bar.generation > gen

        def ks_item(n_tiles, gbase, more):
            """kFlagKeySplit's item: this warpgroup's tiles cw, cw + nc, ... in every warpgroup's
            (n_tiles + nc - 1) // nc turns (empty ones where it has none), each tile's P V in its
            own turn; the positions it does not read, waited on and released in order before its
            next own tile."""
            yield None                 # warpgroup 0 stages its Q rows
            yield from ks_sync()
            if pingpong and cw == nc - 1 and (chain is not True or first[0]):
                named[_pp_base(nc)].arrive(name)
            first[0] = False
            nk = (n_tiles - cw + nc - 1) // nc if n_tiles > cw else 0
            turns = (n_tiles + nc - 1) // nc
            passed = [0]

            def pass_to(p_end):
                while passed[0] < p_end:
                    p = passed[0]
                    passed[0] += 1
                    if p % nc == cw:
                        continue
                    g = gbase + p
                    yield lambda g=g: full[g % kS].ready((g // kS) & 1)
                    assert stage_tile[g % kS] == g, f"{name} passes stage {g % kS} expecting {g}"
                    empty[g % kS].arrive(128)

            for j in range(turns):
                last = j == turns - 1 and not more
                if j < nk:
                    t = cw + nc * j
                    yield from pass_to(t)
                    passed[0] = t + 1
                    gt = gbase + t
                    if KS_PAIR_PV:             # (the mutation: the previous P V with this Q K^T)
                        yield lambda gt=gt: full[gt % kS].ready((gt // kS) & 1)
                        yield from begin()
                        read(gt % kS, gt)
                        if j > 0:
                            read((gt - nc) % kS, gt - nc)
                        end(False)
                        yield None
                        if j > 0:
                            release((gt - nc) % kS)
                        continue
                    yield lambda gt=gt: full[gt % kS].ready((gt // kS) & 1)
                    yield from begin()
                    read(gt % kS, gt)      # Q K^T
                    end(last)
                    yield None             # softmax
                    read(gt % kS, gt)      # P V, alone (outside the ring), waited on
                    yield None
                    release(gt % kS)
                else:
                    yield from begin()     # an empty turn
                    end(last)
            yield from pass_to(n_tiles)
            yield from ks_sync()       # the partial results handed over
            yield None                 # warpgroup 0 merges and stores
            yield from ks_sync()       # the hand-over area free again

        first = [True]
        gbase = 0
        for idx, n_tiles in enumerate(items):
            last_item = idx == len(items) - 1
            if idx in key_split:
                yield from ks_item(n_tiles, gbase, chain is True and not last_item)
                gbase += n_tiles
                continue
            if not (merge and idx > 0):    # kFlagMerge: tile 0 was issued with the last item's final P V
                yield None                 # the Q load of the item (named barrier of this warpgroup)
                if pingpong and cw == nc - 1 and (chain is not True or first[0]):   # kFlagChain: only the first kick
                    named[_pp_base(nc)].arrive(name)
                first[0] = False
                yield lambda g0=gbase: full[g0 % kS].ready((g0 // kS) & 1)
                yield from begin()
                read(gbase % kS, gbase)    # Q K^T of tile 0
                end(False)
                yield None                 # softmax
            for it in range(1, n_tiles):
                gi = gbase + it
                s, sp = gi % kS, (gi - 1) % kS
                yield lambda s=s, gi=gi: full[s].ready((gi // kS) & 1)
                yield from begin()
                read(s, gi)            # Q K^T of tile it (K of stage s)
                read(sp, gi - 1)       # P V of tile it-1 (V of stage sp)
                end(False)
                yield None             # the MMAs run, the softmax's first part
                release(sp)
                yield None
            gl = gbase + n_tiles - 1
            if merge and not last_item:    # the next item's Q staged (cp.async, own rows); its tile 0
                g0 = gl + 1                # with this item's last P V in one batch
                yield None
                yield lambda g0=g0: full[g0 % kS].ready((g0 // kS) & 1)
                yield from begin()
                read(g0 % kS, g0)
                read(gl % kS, gl)
                end(merge == "no-handover")    # (a mutation for the negative test)
                yield None                 # S of g0, the next item's first softmax, then P V done
                release(gl % kS)
                yield None                 # this item's epilogue
                gbase += n_tiles
                continue
            yield from begin()
            read(gl % kS, gl)
            end(not ((chain or merge) and not last_item))   # kFlagChain: the next item's kick
            yield None
            release(gl % kS)
            gbase += n_tiles
        log.append(f"{name} done")

    return [producer(), *(consumer(c) for c in range(nc))], named


def programs_split(items: list[int], kS: int, pingpong: bool, log: list, rng: random.Random,
                   v_wait: int = 2, skip_v_wait: str = "", k_wait: int = 2, nc: int = 2, chain: bool | str = False,
                   merge: bool | str = False):
    """kFlagSplitKV: fullK/emptyK (the kernel's full/empty) and fullV/emptyV per stage.
    Producer, per tile g (slot s = g % kS), each group published one group behind: wait emptyK[s],
    issue and commit K(g), wait_group 2, publish K(g-1); wait emptyV[s], issue and commit V(g),
    wait_group 2, publish V(g-1); at the end wait_group 0 and publish K and V of the last tile.
    Consumers: wait fullK[s] (and fullV of the previous tile) before the batch; release K(it) once
    S(it) is waited on, V(it-1) once P V(it-1) is. Mutation hooks: ``v_wait`` / ``k_wait``, the
    wait_group before V(g-1)'s / K(g-1)'s publish (3 publishes too early); ``skip_v_wait`` "loop"
    or "last", a consumer fullV wait left out."""
    n_total = sum(items)
    fullK = [MBarrier(128) for _ in range(kS)]
    emptyK = [MBarrier(128 * nc) for _ in range(kS)]
    fullV = [MBarrier(128) for _ in range(kS)]
    emptyV = [MBarrier(128 * nc) for _ in range(kS)]
    named = {_pp_base(nc) + i: NamedBarrier(256) for i in range(nc)}
    slot = {"K": [None] * kS, "V": [None] * kS}      # a slot's tile, ("flight"|"landed", tile) or None
    readers = {"K": [set() for _ in range(kS)], "V": [set() for _ in range(kS)]}
    groups: list = []                                  # committed cp.async groups, oldest first
    landed: set = set()
    state = {"producer": False}

    def commit(kind, t):
        st = t % kS
        assert not readers[kind][st], f"producer overwrites {kind} slot {st} while {readers[kind][st]} read it"
        slot[kind][st] = ("flight", t)
        groups.append((kind, t))

    def wait_group(n):                                 # all but the newest n groups have landed
        return lambda: all(gr in landed for gr in groups[:max(0, len(groups) - n)])

    def publish(kind, t):
        st = t % kS
        assert slot[kind][st] == ("landed", t), f"publishing {kind}({t}), slot {st} holds {slot[kind][st]}"
        slot[kind][st] = t
        (fullK if kind == "K" else fullV)[st].arrive(128)

    def lander():                                      # the copies land in any order
        while not (state["producer"] and len(landed) == len(groups)):
            todo = [gr for gr in groups if gr not in landed]
            if not todo:                               # nothing in flight: wait for a commit
                yield lambda: len(landed) < len(groups) or state["producer"]
                continue
            kind, t = rng.choice(todo)
            landed.add((kind, t))
            assert slot[kind][t % kS] == ("flight", t)
            slot[kind][t % kS] = ("landed", t)
            yield None

    def producer():
        for g in range(n_total):
            s = g % kS
            p = ((g // kS) & 1) ^ 1
            yield lambda s=s, p=p: emptyK[s].ready(p)
            commit("K", g)
            if g > 0:
                yield wait_group(k_wait)
                publish("K", g - 1)
            yield lambda s=s, p=p: emptyV[s].ready(p)
            commit("V", g)
            if g > 0:
                yield wait_group(v_wait)
                publish("V", g - 1)
        yield wait_group(0)
        publish("K", n_total - 1)
        publish("V", n_total - 1)
        state["producer"] = True
        log.append("producer done")

    def consumer(cw: int):
        name = f"wg{cw}"
        begin, end = _turns(named, pingpong, cw, name, nc)

        def read(kind, t):
            st = t % kS
            assert slot[kind][st] == t, f"{name} reads {kind} slot {st} expecting tile {t}, it holds {slot[kind][st]}"
            readers[kind][st].add(name)

        def release(kind, t):
            st = t % kS
            readers[kind][st].discard(name)
            (emptyK if kind == "K" else emptyV)[st].arrive(128)

        gbase = 0
        for idx, n_tiles in enumerate(items):
            last_item = idx == len(items) - 1
            if not (merge and idx > 0):
                yield None                 # the Q load of the item
                if pingpong and cw == nc - 1 and (chain is not True or idx == 0):
                    named[_pp_base(nc)].arrive(name)
                yield lambda g0=gbase: fullK[g0 % kS].ready((g0 // kS) & 1)
                yield from begin()
                read("K", gbase)           # Q K^T of tile 0
                end(False)
                yield None                 # S waited on
                release("K", gbase)
                yield None                 # softmax
            for it in range(1, n_tiles):
                gi = gbase + it
                yield lambda gi=gi: fullK[gi % kS].ready((gi // kS) & 1)
                if skip_v_wait != "loop":
                    yield lambda gi=gi: fullV[(gi - 1) % kS].ready(((gi - 1) // kS) & 1)
                yield from begin()
                read("K", gi)          # Q K^T of tile it
                read("V", gi - 1)      # P V of tile it-1
                end(False)
                yield None             # S done (wait_group 1, or 0)
                release("K", gi)
                yield None             # the softmax's first part, P V done
                release("V", gi - 1)
                yield None
            gl = gbase + n_tiles - 1
            if merge and not last_item:    # K of the next item's tile 0 and V of this item's last
                g0 = gl + 1
                yield None                 # the next item's Q staged
                yield lambda g0=g0: fullK[g0 % kS].ready((g0 // kS) & 1)
                if skip_v_wait != "last":
                    yield lambda gl=gl: fullV[gl % kS].ready((gl // kS) & 1)
                yield from begin()
                read("K", g0)
                read("V", gl)
                end(merge == "no-handover")
                yield None                 # S of g0 waited on
                release("K", g0)
                yield None                 # softmax, P V waited on
                release("V", gl)
                yield None                 # this item's epilogue
                gbase += n_tiles
                continue
            if skip_v_wait != "last":
                yield lambda gl=gl: fullV[gl % kS].ready((gl // kS) & 1)
            yield from begin()
            read("V", gl)
            end(not ((chain or merge) and not last_item))
            yield None
            release("V", gl)
            gbase += n_tiles
        log.append(f"{name} done")

    return [producer(), *(consumer(c) for c in range(nc)), lander()], named


def run(items, kS: int, pingpong: bool, seed: int, split: bool = False, nc: int = 2, chain: bool | str = False,
        merge: bool | str = False, key_split: frozenset = frozenset(), **kw) -> list:
    log: list = []
    items = [items] if isinstance(items, int) else list(items)
    if split:
        progs, named = programs_split(items, kS, pingpong, log, random.Random(seed + 7919), nc=nc, chain=chain,
                                      merge=merge, **kw)
    else:
        progs, named = programs(items, kS, pingpong, log, nc=nc, chain=chain, merge=merge, key_split=key_split)
    waiting = [None] * len(progs)
    alive = set(range(len(progs)))
    rng = random.Random(seed)
    for _ in range(400_000):
        if not alive:
            break
        runnable = [i for i in alive if waiting[i] is None or waiting[i]()]
        assert runnable, f"deadlock: items={items} kS={kS} pingpong={pingpong}, done: {log}"
        i = rng.choice(runnable)
        try:
            waiting[i] = next(progs[i])
        except StopIteration:
            alive.discard(i)
            waiting[i] = None
    assert not alive, "did not finish"
    for bid, nb in named.items():
        assert nb.arrived == 0, f"named barrier {bid}: {nb.arrived} threads' arrivals left at exit"
    return log


@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("kS", [3, 4])
@pytest.mark.parametrize("n_tiles", [1, 2, 3, 4, 5, 9, 40])
def test_barrier_protocol_finishes_without_races(n_tiles, kS, pingpong):
    for seed in range(25):
        log = run(n_tiles, kS, pingpong, seed)
        assert sorted(log) == ["producer done", "wg0 done", "wg1 done"]


@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("kS", [3, 4])
@pytest.mark.parametrize("items", [[1, 1, 1], [3, 1, 5], [2, 7, 1, 4, 2], [9, 9]])
def test_persistent_items_share_the_ring(items, kS, pingpong):
    """The persistent plan: one CTA works through several items, the stages and their phases
    running on across items, ping-pong restarting per item."""
    for seed in range(25):
        log = run(items, kS, pingpong, seed)
        assert sorted(log) == ["producer done", "wg0 done", "wg1 done"]


@pytest.mark.parametrize("split", [False, True])
def test_simulation_catches_a_wrong_parity(split):
    """Not vacuous: a consumer waiting on the wrong parity of a full barrier (the classic
    off-by-one) is caught, as a stale read or a deadlock; with the split rings (_kv) too."""
    orig = MBarrier.ready

    def flipped(self, parity):
        return orig(self, parity ^ 1) if self.count == 128 else orig(self, parity)
    MBarrier.ready = flipped
    try:
        with pytest.raises(AssertionError):
            for seed in range(10):
                run(6, 3, True, seed, split=split)
    finally:
        MBarrier.ready = orig


# ------------------------------------------------------------------ kFlagSplitKV (plans _kv)
@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("kS", [3, 4])
@pytest.mark.parametrize("n_tiles", [1, 2, 3, 4, 5, 9, 40])
def test_split_kv_protocol_finishes_without_races(n_tiles, kS, pingpong):
    for seed in range(25):
        log = run(n_tiles, kS, pingpong, seed, split=True)
        assert sorted(log) == ["producer done", "wg0 done", "wg1 done"]


@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("kS", [3, 4])
@pytest.mark.parametrize("items", [[1, 1, 1], [3, 1, 5], [2, 7, 1, 4, 2], [9, 9]])
def test_split_kv_persistent_items_share_the_rings(items, kS, pingpong):
    for seed in range(25):
        log = run(items, kS, pingpong, seed, split=True)
        assert sorted(log) == ["producer done", "wg0 done", "wg1 done"]


def test_split_kv_simulation_catches_publishing_v_before_it_landed():
    """wait_group 3 before V(g-1)'s publish (V(g-1), K(g) and V(g) may all be in flight) is caught."""
    with pytest.raises(AssertionError, match="publishing V"):
        for seed in range(50):
            run(6, 3, False, seed, split=True, v_wait=3)
    for seed in range(50):                             # and the kernel's wait_group 2 is clean
        run(6, 3, False, seed, split=True, v_wait=2)


def test_split_kv_simulation_catches_publishing_k_before_it_landed():
    """wait_group 3 before K(g-1)'s publish (K(g-1), V(g-1) and K(g) may all be in flight) is caught."""
    with pytest.raises(AssertionError, match="publishing K"):
        for seed in range(50):
            run(6, 3, False, seed, split=True, k_wait=3)


def test_split_kv_fullv_waits():
    """The last tile's fullV wait is needed (left out: a read of an unpublished V). The in-loop one
    is implied by the producer's order: each producer thread arrives on fullV[g-1] (after V(g)'s
    commit) before fullK[g] (after K(g+1)'s), so a completed fullK phase of tile it means V(it-1)
    is published (and, by each thread's release order, visible). The kernel keeps the wait (one try_wait that succeeds at once) so that a
    producer reordering cannot break the consumers silently."""
    with pytest.raises(AssertionError, match="reads V"):
        for seed in range(50):
            run([3, 2, 4], 3, True, seed, split=True, skip_v_wait="last")
    for seed in range(25):
        run([3, 2, 4], 3, True, seed, split=True, skip_v_wait="loop")


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("items", [[1], [2], [5], [40], [3, 1, 5], [2, 7, 1, 4, 2]])
def test_three_consumer_warpgroups_finish_without_races(items, pingpong, split):
    """The wgmma3 plans (head dim 64, 4 stages): three consumer warpgroups, empty barriers of 384
    arrivals, ping-pong as a ring over named barriers 4, 5, 6 (the last warpgroup kicks the first
    at each item and skips its arrive after the item's final P V), one item or several."""
    for seed in range(15):
        log = run(items, 4, pingpong, seed, split=split, nc=3)
        assert sorted(log) == ["producer done", "wg0 done", "wg1 done", "wg2 done"]


def test_three_consumer_simulation_catches_a_two_warpgroup_ring():
    """Not vacuous: with three warpgroups, handing the turn over as the two-warpgroup kernel did
    (to 3 + (1 - cw)) deadlocks or leaves a phase open."""
    def two_ring(named, pingpong, cw, name, nc=2):
        me, other = _pp_base(nc) + cw, _pp_base(nc) + (1 - cw) % nc

        def begin():
            if pingpong:
                gen = named[me].arrive(name)
                yield lambda: named[me].generation > gen

        def end(last):
            if pingpong and not (last and cw == nc - 1):
                named[other].arrive(name)
        return begin, end
    global _turns
    orig = _turns
    _turns = two_ring
    try:
        caught = 0
        for seed in range(10):
            try:
                run([3, 2], 4, True, seed, nc=3)
            except AssertionError:
                caught += 1
        assert caught == 10
    finally:
        _turns = orig


# ------------------------------------------------------------------ kFlagChain (plans _xc)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("nc,kS", [(2, 3), (2, 4), (3, 4)])
@pytest.mark.parametrize("items", [[1], [4], [1, 1, 1], [3, 1, 5], [2, 7, 1, 4, 2], [9, 9]])
def test_chained_turns_across_items_finish_without_races(items, nc, kS, split):
    """_xc: the last warpgroup kicks the first at the CTA's first item only, and its arrive after
    each item's final P V but the last is the next item's kick (the ring of turns runs on across
    items); every phase still completes, no stage is read stale or overwritten early."""
    for seed in range(15):
        log = run(items, kS, True, seed, split=split, nc=nc, chain=True)
        assert sorted(log) == ["producer done"] + [f"wg{c} done" for c in range(nc)]


def test_chained_turns_catch_a_kick_left_in():
    """Not vacuous: chaining the final arrive while still kicking at every item's start (chain
    "both", a wrong kernel) completes a phase with one warpgroup's arrivals or leaves one open."""
    for split in (False, True):
        for seed in range(10):
            with pytest.raises(AssertionError):
                run([3, 2, 4], 4, True, seed, split=split, nc=3, chain="both")


# ------------------------------------------------------------------ kFlagMerge (plans _mi)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("nc,kS", [(2, 3), (2, 4), (3, 4)])
@pytest.mark.parametrize("items", [[1], [4], [1, 1, 1], [3, 1, 5], [2, 7, 1, 4, 2], [9, 9]])
def test_merged_items_finish_without_races(items, nc, kS, pingpong, split):
    """_mi: a CTA's items as one stream of batches (each item's last P V issued with the next
    item's first Q K^T; the first kick only, the last warpgroup's arrive skipped only at the very
    end): every phase completes, no stage is read stale or overwritten early."""
    for seed in range(15):
        log = run(items, kS, pingpong, seed, split=split, nc=nc, merge=True)
        assert sorted(log) == ["producer done"] + [f"wg{c} done" for c in range(nc)]


def test_merged_items_catch_a_turn_not_handed_on():
    """Not vacuous: a merged batch that skips its hand-over like an item's final P V (the last
    warpgroup's arrive left out at every item's end, a wrong kernel) stalls the ring."""
    for split in (False, True):
        for seed in range(5):
            with pytest.raises(AssertionError, match="deadlock"):
                run([3, 2, 4], 4, True, seed, split=split, nc=3, merge="no-handover")


# ------------------------------------------------------------------ kFlagKeySplit (plans _ks)
@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("items,split", [([1], {0}), ([2], {0}), ([3], {0}), ([10], {0}), ([10, 9, 9], {0}),
                                         ([9, 10, 1, 4], {1, 2}), ([10, 10, 10], {0, 1, 2}), ([5, 2, 7, 1], {1, 3})])
def test_key_split_items_finish_without_races(items, split, pingpong, chain):
    """_ks: items of warpgroup 0's rows only with their key tiles split across three warpgroups
    (tiles k, k + 3, ... each; empty turns keep the ring; the positions a warpgroup does not read
    released in order), between ordinary items, with and without chained turns: every phase
    completes, no stage is read stale or overwritten early (four stages, three warpgroups)."""
    if chain and not pingpong:
        pytest.skip("the chained turns need ping-pong")
    for seed in range(12):
        log = run(items, 4, pingpong, seed, nc=3, chain=chain, key_split=frozenset(split))
        assert sorted(log) == ["producer done"] + [f"wg{c}" + " done" for c in range(3)]


def test_key_split_catches_a_p_v_paired_with_the_next_tile():
    """Not vacuous: pairing each own tile's P V with the warpgroup's next Q K^T (the ordinary
    items' schedule) deadlocks the key split with four stages: the producer publishes a tile only
    once it has issued the next, so the wait for own tile t needs tile t - 3, this warpgroup's
    previous one, released first."""
    global KS_PAIR_PV
    KS_PAIR_PV = True
    try:
        with pytest.raises(AssertionError, match="deadlock"):
            for seed in range(6):
                run([10, 9], 4, True, seed, nc=3, chain=True, key_split=frozenset({0}))
    finally:
        KS_PAIR_PV = False


@pytest.mark.parametrize("key_split", [False, True])
def test_item_order_gives_the_short_items_to_the_ctas_with_one_more(key_split):
    """The wgmma kernel's item order (kernels/paged_prefill_wgmma.cuh item_at, mirrored by
    prefill_item_coords; the GPU stamps test checks the mirror against the kernel) is a permutation
    of the items, and under the key split's order persistent CTAs (CTA c takes items c, c + 132,
    ...) at issue 8's D=64 shape (64 sequences x 2 kv heads, 10 row tiles of 192 rows, the tenth 64
    rows: short under the key split) each take at most 9 full items plus one short one. In the
    x-fastest order the short items fall on even CTAs only, and the busiest CTAs carry 10 full ones."""
    m_tiles, groups, ctas = 10, 128, 132
    order = [prefill_item_coords(w, m_tiles, groups, key_split) for w in range(m_tiles * groups)]
    assert sorted(order) == sorted((x, g) for g in range(groups) for x in range(m_tiles))
    full = [0] * ctas
    short = [0] * ctas
    for w, (x, _) in enumerate(order):
        (short if x == 0 else full)[w % ctas] += 1
    if key_split:
        assert max(full) == 9 and all(s <= 1 for s in short)
        assert all(s == 1 for f, s in zip(full, short) if f + s == max(f + s for f, s in zip(full, short)))
    else:
        assert max(full) == 10 and all(s == 0 for c, s in enumerate(short) if c % 2)
