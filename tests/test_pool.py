"""The shared page pool: accounting, geometry views, release/reacquire, property tests."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from oppo_runtime.memory import KVGeometry, PagePool, PoolExhausted

GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def test_views_of_different_geometries_share_pages_without_overlap():
    small = KVGeometry(1, 1, 8, torch.float32)
    pool = PagePool(num_pages=6, page_bytes=PagePool.page_bytes_for([GEOM, small], 4))
    a, b = pool.register("actor", GEOM), pool.register("reward", small)
    assert a.tokens_per_page == 4 and b.tokens_per_page == 16
    pa, pb = a.ensure(1, 7), b.ensure(1, 20)
    assert len(pa) == 2 and len(pb) == 2 and not set(pa) & set(pb)
    for layer, (k, v) in enumerate(a.kv_caches):
        k[pa[0]].fill_(layer + 1.0)
        v[pa[0]].fill_(-(layer + 1.0))
    kb, vb = b.kv_caches[0]
    kb[pb].fill_(9.0)
    vb[pb].fill_(9.0)
    for layer, (k, v) in enumerate(a.kv_caches):       # nothing of 'reward' landed in actor's pages
        assert torch.all(k[pa[0]] == layer + 1.0) and torch.all(v[pa[0]] == -(layer + 1.0))


def test_layers_and_k_v_do_not_alias_within_a_page():
    pool = PagePool(2, PagePool.page_bytes_for([GEOM], 4))
    view = pool.register("m", GEOM)
    for i, (k, v) in enumerate(view.kv_caches):
        k.fill_(2 * i)
        v.fill_(2 * i + 1)
    for i, (k, v) in enumerate(view.kv_caches):
        assert torch.all(k == 2 * i) and torch.all(v == 2 * i + 1)


def test_exhaustion_raises_and_allocates_nothing():
    pool = PagePool(3, PagePool.page_bytes_for([GEOM], 4))
    view = pool.register("m", GEOM)
    view.ensure("a", 8)
    with pytest.raises(PoolExhausted):
        view.ensure("b", 9)
    assert pool.num_free == 1 and view.pages("b") == []
    pool.check()


def test_release_keeps_pages_of_in_flight_sequences_at_their_ids():
    pool = PagePool(4, PagePool.page_bytes_for([GEOM], 4))
    view = pool.register("m", GEOM)
    keep, drop = view.ensure("keep", 8), view.ensure("drop", 4)
    k, _ = view.kv_caches[1]
    data = torch.randn(len(keep), *k.shape[1:])
    k[keep] = data
    pool.release(keep=[("m", "keep")])
    assert pool.buffer is None and view.pages("drop") == []
    with pytest.raises(RuntimeError, match="released"):
        view.kv_caches
    pool.reacquire()
    assert view.pages("keep") == keep
    assert torch.equal(view.kv_caches[1][0][keep], data)
    pool.check()


def test_invalid_pool_sizes_raise():
    with pytest.raises(ValueError):
        PagePool(0, 1024)
    with pytest.raises(ValueError):
        PagePool(4, 1000)


ops = st.lists(st.tuples(st.sampled_from(["grow", "free", "rename"]), st.sampled_from(["actor", "reward"]),
                         st.integers(0, 5), st.integers(1, 40)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_grow_and_free_never_leak_or_double_own(seq_ops):
    small = KVGeometry(1, 2, 8, torch.float32)
    pool = PagePool(10, PagePool.page_bytes_for([GEOM, small], 4))
    views = {"actor": pool.register("actor", GEOM), "reward": pool.register("reward", small)}
    for op, model, sid, n in seq_ops:
        v = views[model]
        before = list(v.pages(sid))
        if op == "grow":
            try:
                pages = v.ensure(sid, n)
                assert pages[:len(before)] == before and len(pages) >= v.pages_for_tokens(n)
            except PoolExhausted:
                assert v.pages(sid) == before
        elif op == "rename":            # to a free id (the engine's quarantine), or a no-op
            to = next(i for i in range(6, 20) if not v.pages(i))
            assert pool.rename((model, sid), (model, to)) == len(before)
            assert v.pages(to) == before and v.pages(sid) == []
        else:
            assert v.free(sid) == len(before)
        pool.check()                    # includes the row mirror of the block tables
        assert sum(pool.usage().values()) == pool.num_pages
        live = [i for i in range(20) if v.pages(i)]
        if live:                        # the mirror's tables: each owner's pages first
            width = max(len(v.pages(i)) for i in live) + 1
            table, counts = v.block_table(live + [99], width)
            for row, i in enumerate(live):
                assert table[row, :counts[row]].tolist() == v.pages(i) and counts[row] == len(v.pages(i))
            assert counts[-1] == 0 and not table[-1].any()


# ------------------------------------------------------------------ scheduler properties
from oppo_runtime.engine import Scheduler, Sequence, SamplingParams  # noqa: E402

requests = st.lists(st.tuples(st.integers(1, 30), st.integers(1, 25)), min_size=1, max_size=12)


@settings(max_examples=100, deadline=None)
@given(requests, st.integers(8, 40), st.integers(1, 6), st.integers(4, 64), st.randoms(use_true_random=False))
def test_scheduler_never_leaks_never_double_owns_and_finishes_everyone(reqs, num_pages, max_seqs, budget, rnd):
    """Random requests through admit / chunked prefill / decode / preempt / finish, with the pool
    shared with another model that grabs and frees pages at random."""
    pool = PagePool(num_pages, PagePool.page_bytes_for([GEOM], 4))
    view = pool.register("actor", GEOM)
    other = pool.register("reward", GEOM)
    sched = Scheduler(view, max_seqs, budget)
    seqs = []
    for plen, new in reqs:
        if view.pages_for_tokens(plen + new) > num_pages:
            continue                         # the engine rejects those at admission
        s = Sequence(list(range(plen)), SamplingParams(max_new_tokens=new))
        sched.add(s)
        seqs.append(s)
    for step in range(5000):
        if not sched.has_work():
            break
        if rnd.random() < 0.2:               # another pool user comes and goes
            try:
                other.ensure(rnd.randint(0, 3), rnd.randint(1, 8))
            except Exception:
                pass
        if rnd.random() < 0.3:
            other.free(rnd.randint(0, 3))
        batch = sched.schedule()
        if batch is None:
            for i in range(4):               # starved by the other user: it frees (as scorers evict)
                other.free(i)
            continue
        for seq, span, sample in zip(batch.seqs, batch.spans, batch.sample):
            assert span.start == seq.num_cached_tokens
            assert len(view.pages(seq.seq_id)) * view.tokens_per_page >= span.start + len(span.token_ids)
            seq.num_cached_tokens = span.start + len(span.token_ids)
            if sample:
                seq.output_ids.append(0)
                if len(seq.output_ids) >= seq.sampling.max_new_tokens:
                    sched.finish(seq)
        pool.check()
        assert sum(pool.usage().values()) == pool.num_pages
        assert len(sched.running) <= max_seqs
    assert not sched.has_work(), "a sequence starved"
    assert all(s.is_finished and len(s.output_ids) == s.sampling.max_new_tokens for s in seqs)
    assert view.pool.usage()["actor"] == 0
