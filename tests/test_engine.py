"""ActorEngine: exact greedy decoding vs transformers, preemption, chunk stream, sampling."""
import numpy as np
import pytest
import torch
import transformers

from oppo_runtime.engine import ActorEngine, EngineConfig, RequestError, SamplingParams
from oppo_runtime.memory import KVGeometry, PagePool
from oppo_runtime.models import load_model
from oppo_runtime.ops import process_logits
from oppo_runtime.models.context import DenseContext

VOCAB = 96


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return hf, load_model(path, dtype=torch.float32)


def make_pool(model, num_pages, tokens_per_page=4):
    L, Hkv, D = model.kv_geometry()
    g = KVGeometry(L, Hkv, D, torch.float32)
    return PagePool(num_pages, PagePool.page_bytes_for([g], tokens_per_page))


def prompts(n, seed=0, lo=1, hi=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_greedy_matches_transformers_under_preemption(tiny_llama, chunk_size):
    hf, model = tiny_llama
    ps = prompts(10, seed=chunk_size)
    n_new = 24
    pool = make_pool(model, num_pages=24)     # holds ~96 tokens: far fewer than 10 sequences need
    engine = ActorEngine(model, pool, EngineConfig(chunk_size=chunk_size, max_num_batched_tokens=32))
    chunks = []
    engine.add_chunk_consumer(chunks.extend)
    seqs = engine.generate(ps, SamplingParams(temperature=0.0, max_new_tokens=n_new))
    assert engine.scheduler.num_preemptions > 0
    for p, s in zip(ps, seqs):
        assert s.output_ids == hf_greedy(hf, p, n_new), f"sequence {s.seq_id}"
        assert s.finish_reason == "length"
    # the chunk stream reassembles each output exactly, in order, in pieces of chunk_size
    for s in seqs:
        mine = [c for c in chunks if c.seq is s]
        assert [t for c in mine for t in c.token_ids] == s.output_ids
        assert mine[-1].final and all(not c.final for c in mine[:-1])
        assert all(c.end - c.start == chunk_size for c in mine[:-1])
    assert pool.num_free == pool.num_pages
    pool.check()


def test_sampling_is_reproducible_and_independent_of_batching(tiny_llama):
    _, model = tiny_llama
    ps = prompts(6, seed=3)
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=16)

    def run(max_num_seqs, num_pages, seed=7):
        eng = ActorEngine(model, make_pool(model, num_pages), EngineConfig(max_num_seqs=max_num_seqs, seed=seed))
        return [s.output_ids for s in eng.generate(ps, sp)]

    a = run(8, 64)
    assert a == run(8, 64)
    assert a == run(2, 12)            # other batch composition, preemption: same tokens
    assert a != run(8, 64, seed=8)


def test_behaviour_logprobs_are_those_of_the_sampled_distribution(tiny_llama):
    _, model = tiny_llama
    ps = prompts(4, seed=5)
    sp = SamplingParams(temperature=0.7, top_k=20, top_p=0.95, max_new_tokens=12)
    eng = ActorEngine(model, make_pool(model, 64), EngineConfig(seed=1))
    for s in eng.generate(ps, sp):
        ids = torch.tensor(s.all_ids)
        with torch.no_grad():
            h = model(ids, torch.arange(len(ids)), DenseContext(torch.tensor([0, len(ids)])))
            logits = model.compute_logits(h)[len(s.prompt_ids) - 1:-1]
        n = len(logits)
        lp = process_logits(logits, torch.full((n,), 0.7), torch.full((n,), 20), torch.full((n,), 0.95))
        want = lp.gather(-1, torch.tensor(s.output_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-3, rtol=0)
        assert s.versions == [0] * len(s.output_ids)


def test_greedy_logprobs_equal_log_softmax(tiny_llama):
    _, model = tiny_llama
    eng = ActorEngine(model, make_pool(model, 64))
    s = eng.generate(prompts(1, seed=9), SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    ids = torch.tensor(s.all_ids)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, torch.arange(len(ids)), DenseContext(torch.tensor([0, len(ids)]))))
    want = torch.log_softmax(logits[len(s.prompt_ids) - 1:-1], -1).gather(-1, torch.tensor(s.output_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-3, rtol=0)


def test_warmup_refuses_requests_in_flight_and_is_a_no_op_on_cpu(tiny_llama):
    _, model = tiny_llama
    eng = ActorEngine(model, make_pool(model, 64))
    assert eng.warmup() == 0                         # no CUDA graphs on the CPU
    eng.add_request(prompts(1)[0], SamplingParams(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="warmup.*in flight"):
        eng.warmup()


def test_stops_on_eos_stop_tokens_and_target_length(tiny_llama):
    _, model = tiny_llama
    p = prompts(1, seed=11)[0]
    free = ActorEngine(model, make_pool(model, 64)).generate([p], SamplingParams(temperature=0.0, max_new_tokens=10))[0]
    eos = free.output_ids[3]
    first = free.output_ids.index(eos)
    s = ActorEngine(model, make_pool(model, 64), eos_token_id=eos).generate(
        [p], SamplingParams(temperature=0.0, max_new_tokens=10))[0]
    assert s.finish_reason == "eos" and s.output_ids == free.output_ids[:first + 1]
    s = ActorEngine(model, make_pool(model, 64)).generate(
        [p], SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(eos,)))[0]
    assert s.finish_reason == "stop" and len(s.output_ids) == first + 1
    s = ActorEngine(model, make_pool(model, 64), eos_token_id=eos).generate(
        [p], SamplingParams(temperature=0.0, max_new_tokens=10), target_lens=[7])[0]
    assert len(s.output_ids) == 7 and s.finish_reason == "length"


def test_bad_requests_get_an_error_and_the_others_go_on(tiny_llama):
    _, model = tiny_llama
    eng = ActorEngine(model, make_pool(model, 8), EngineConfig(max_model_len=64))
    good = prompts(2, seed=13)
    too_long = list(range(64))
    huge = [1, 2, 3]
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    seqs = eng.generate([good[0], [], too_long, good[1], [VOCAB + 5]], sp)
    assert seqs[1].finish_reason.startswith("error: empty prompt")
    assert "does not fit the context" in seqs[2].finish_reason
    assert "outside the vocabulary" in seqs[4].finish_reason
    assert seqs[0].finish_reason == seqs[3].finish_reason == "length"
    with pytest.raises(RequestError, match="whole pool"):
        eng.add_request(huge, SamplingParams(max_new_tokens=60))


def test_nan_logits_end_only_the_poisoned_request(tiny_llama):
    _, model = tiny_llama
    eng = ActorEngine(model, make_pool(model, 64))
    orig = model.compute_logits
    calls = {"n": 0}

    def poisoned(h):
        out = orig(h)
        calls["n"] += 1
        if calls["n"] == 3:
            out = out.clone()
            out[0, 5] = float("nan")
        return out

    model.compute_logits = poisoned
    try:
        seqs = eng.generate(prompts(3, seed=17), SamplingParams(temperature=0.0, max_new_tokens=6))
    finally:
        del model.compute_logits
    errs = [s for s in seqs if s.finish_reason.startswith("error")]
    assert len(errs) == 1 and "NaN" in errs[0].finish_reason
    assert all(len(s.output_ids) == 6 for s in seqs if s not in errs)


@pytest.mark.parametrize("mode", ["async", "static async", "static async graph-sampling", "static graph-sampling"])
@pytest.mark.parametrize("num_pages,batched", [(64, 256), (20, 24)])
def test_async_decode_equals_synchronous_decode(tiny_llama, num_pages, batched, mode, monkeypatch):
    """Reading tokens back one step late changes nothing: tokens, log-probs, versions, finish
    reasons, chunks; EOS ends cost one wasted row; preemption (small pool) drains first; pages
    freed while a step is on the device are quarantined, then freed (no leak). "static": decode
    steps through the CUDA graphs' packed input buffers (run eagerly on the CPU: padding rows,
    the tables' copy, input tokens taken from the step in flight), with the LM head and the
    sampler inside the step ("graph-sampling") or after it."""
    _, model = tiny_llama
    static, graph_sampling = "static" in mode, "graph-sampling" in mode
    ps = prompts(9, seed=23)

    def run(async_decode, static=False, graph_sampling=False, pages=num_pages):
        monkeypatch.setenv("OPPO_STATIC_DECODE", "1" if static else "0")
        pool = make_pool(model, pages)
        eng = ActorEngine(model, pool, EngineConfig(async_decode=async_decode, chunk_size=3, seed=4,
                                                    max_num_batched_tokens=batched, max_model_len=40,
                                                    graph_sampling=graph_sampling),
                          eos_token_id=eos)
        assert eng.runner.static_decode == static and eng.graph_sampling == graph_sampling
        chunks = []
        eng.add_chunk_consumer(lambda cs: chunks.extend((c.seq.seq_id, c.start, c.end, c.final, tuple(c.token_ids))
                                                        for c in cs))
        sp = SamplingParams(temperature=1.0, max_new_tokens=30)
        # also: a stop token, EOS ignored, top-k (the eager sampler), a colder temperature
        sps = [sp, sp, SamplingParams(temperature=1.0, max_new_tokens=30,
                                                        stop_token_ids=() if stop is None else (stop,)),
               sp, SamplingParams(temperature=1.0, max_new_tokens=20, ignore_eos=True), sp,
               SamplingParams(temperature=1.0, max_new_tokens=30, top_k=5), sp,
               SamplingParams(temperature=0.5, max_new_tokens=30)]
        lens = [None, 5, None, 12, None, 1, None, 30, None]
        seqs = [eng.add_request(p, q, target_len=t) for p, q, t in zip(ps, sps, lens)]
        lagged = 0
        while eng.has_unfinished():
            eng.step()
            lagged += eng._inflight is not None
            pool.check()
        assert pool.num_free == pool.num_pages and not eng._retired
        ids = {s.seq_id: i for i, s in enumerate(seqs)}
        chunks = sorted((ids[c[0]],) + c[1:] for c in chunks)
        return [(s.output_ids, s.logprobs, s.versions, s.finish_reason) for s in seqs], chunks, lagged, eng

    # EOS and the stop token from a run without them (sampling is a function of the sequence and
    # position only): sequence 0 meets the EOS by its 5th token, sequence 2 its stop token by its 3rd
    eos = stop = None
    probe, *_ = run(False, pages=128)
    eos = probe[0][0][4]
    stop = next(t for t in probe[2][0][2:] if t != eos)
    sync_out, sync_chunks, lagged_sync, sync_eng = run(False)
    async_decode = "async" in mode
    async_out, async_chunks, lagged_async, eng = run(async_decode, static, graph_sampling)
    # the same schedule: as many prefill steps, and as many decode steps but those a read-late
    # EOS or stop token adds (a step left with wasted rows only)
    assert eng.stats["prefill_steps"] == sync_eng.stats["prefill_steps"]
    assert 0 <= eng.stats["decode_steps"] - sync_eng.stats["decode_steps"] <= eng.stats["wasted_rows"]
    assert lagged_sync == 0 and (lagged_async > 0) == async_decode
    # prefill steps of waiting prompts (24-token budget: several) launched behind a decode step in flight
    assert sync_eng.stats["lagged_prefills"] == 0 and (eng.stats["lagged_prefills"] > 0) == (async_decode and batched == 24)
    # the lagged steps of the steady state filter the previous step's arrays (Scheduler._lagged_rows)
    assert (eng.scheduler.rows_stats["fast"] > 0) == async_decode
    # a read-late EOS or stop token costs at most one wasted row; a known end (length) costs none
    token_ends = sum(r in ("eos", "stop") for *_, r in sync_out)
    assert eng.stats["wasted_rows"] <= (token_ends if async_decode else 0)
    if async_decode and num_pages == 64:            # (no preemption draining the step first)
        assert eng.stats["wasted_rows"] > 0
    if static:       # every decode step went through the static buffers of its batch size
        assert eng.runner.graphs and all(g is None for g, _ in eng.runner.graphs.values())
    # tokens, versions and finishes exactly; log-probs to float rounding (the wasted rows change a
    # step's batch size, and a CPU GEMM's blocking with it)
    assert [(o, v, r) for o, _, v, r in async_out] == [(o, v, r) for o, _, v, r in sync_out]
    torch.testing.assert_close(torch.tensor([x for _, lp, _, _ in async_out for x in lp]),
                               torch.tensor([x for _, lp, _, _ in sync_out for x in lp]), atol=1e-5, rtol=0)
    assert async_chunks == sync_chunks
    finals = [c[0] for c in async_chunks if c[3]]
    assert sorted(finals) == list(range(len(ps)))         # one final chunk per sequence
    assert {"eos", "stop", "length"} <= {r for *_, r in sync_out}
    assert all(t >= 0 for out, *_ in async_out for t in out)
    if num_pages == 20:
        assert eng.scheduler.num_preemptions > 0


def test_every_schedulable_batch_has_a_decode_graph_size():
    from oppo_runtime.engine import EngineConfig
    for n in (1, 3, 64, 80, 256, 300):
        sizes = EngineConfig(max_num_seqs=n).graph_batch_sizes
        assert sizes[-1] == n and all(1 <= b <= n for b in sizes) and list(sizes) == sorted(set(sizes))
    assert EngineConfig(max_num_seqs=80).graph_batch_sizes[-2:] == (64, 80)
    assert EngineConfig(max_num_seqs=8, graph_batch_sizes=()).graph_batch_sizes == ()


def test_decode_inputs_from_the_pool_mirror_equal_the_general_path(tiny_llama):
    """The decode fast path of ModelRunner._context (block tables from the pool's row mirror)
    gives the general path's ids, positions, slots, context lengths, cu_seqlens and, within each
    sequence's pages, block tables; after interleaved growth, frees, reused rows and a rename."""
    from oppo_runtime.engine.runner import Span
    _, model = tiny_llama
    pool = make_pool(model, 400)
    eng = ActorEngine(model, pool)
    view, T = eng.view, eng.view.tokens_per_page
    g = torch.Generator().manual_seed(3)
    lens = {}
    for step in range(6):                       # interleaved growth: pages of a sequence scattered
        for i in range(12):
            lens[i] = lens.get(i, 0) + int(torch.randint(1, 9, (1,), generator=g))
            view.ensure(i, lens[i] + 1)
    for i in (2, 5):                            # freed rows, reused by new sequences
        view.free(i)
        del lens[i]
    for i in (20, 21):
        lens[i] = 30 + i
        view.ensure(i, lens[i] + 1)
    pool.rename((view.name, 7), (view.name, 70))
    lens[70] = lens.pop(7)
    pool.check()
    spans = [Span(k, [int(k) % 50], n) for k, n in lens.items()]
    r = eng.runner
    fast = r._context(spans, view.pages)
    slow = r._context(spans, lambda k: view.pages(k))
    for a, b in zip(fast[:2], slow[:2]):
        assert torch.equal(a, b)
    fa, sl = fast[2], slow[2]
    for name in ("slot_mapping", "context_lens", "cu_seqlens_q"):
        assert torch.equal(getattr(fa, name), getattr(sl, name)), name
    assert fa.block_tables.shape == sl.block_tables.shape and fa.is_decode and sl.is_decode
    for row, (k, n) in enumerate(lens.items()):
        used = -(-(n + 1) // T)
        assert torch.equal(fa.block_tables[row, :used], sl.block_tables[row, :used])
        assert fa.block_tables[row, :used].tolist() == view.pages(k)[:used]
    with pytest.raises(RuntimeError, match="has 0 pages"):
        r._context([Span(999, [1], 4)], view.pages)



def test_static_decode_buffers_pad_rows_past_the_batch(tiny_llama, monkeypatch):
    """The packed decode inputs of a batch smaller than its graph size: real rows carry the step's
    positions, slots, context lengths and sampler inputs; padding rows write no K/V (slot -1), see
    one key (context length 1) and sample with key 0, position 0, temperature 1."""
    _, model = tiny_llama
    monkeypatch.setenv("OPPO_STATIC_DECODE", "1")
    pool = make_pool(model, 64)
    eng = ActorEngine(model, pool, EngineConfig(seed=2, graph_sampling=True, max_model_len=64))
    seqs = [eng.add_request(p, SamplingParams(temperature=0.7, max_new_tokens=6), target_len=6)
            for p in prompts(5, seed=9)]
    while eng.has_unfinished():
        eng.step()
    _, st = eng.runner.graphs[8]                    # the 5-sequence batch used the bucket of 8
    B = 5
    assert (st["slot_mapping"][B:] == -1).all() and (st["context_lens"][B:] == 1).all()
    assert (st["keys"][B:] == 0).all() and (st["sample_pos"][B:] == 0).all()
    assert (st["temperature"][B:] == 1.0).all() and torch.allclose(st["temperature"][:B], torch.tensor(0.7))
    # the last step's real rows: position n-1 of each sequence, its slot in its own pages
    last = [len(s.prompt_ids) + 4 for s in seqs]     # the 6th token was sampled from position P + 4
    assert st["positions"][:B].tolist() == last and st["context_lens"][:B].tolist() == [p + 1 for p in last]
    assert all(t == s.sample_key for t, s in zip(st["keys"][:B].tolist(), seqs))
    assert all(len(s.output_ids) == 6 for s in seqs) and pool.num_free == pool.num_pages


def test_decode_graph_step_runs_the_inference_path_whatever_the_callers_grad_mode(tiny_llama, monkeypatch):
    """A decode graph freezes the model's path at capture, and the model takes its fused inference
    path only with grad off. ActorEngine.warmup() captures outside the step's inference_mode (with
    grad on, e.g. in the trainer): the captured step must still see grad off. Before the fix, its
    graphs replayed the autograd path (~4.5x the kernels: 2.1 ms per decode step instead of 1.1 on
    an H200, session 11). On the CPU (OPPO_STATIC_DECODE=1) the stored step is what a GPU capture
    calls."""
    _, model = tiny_llama
    monkeypatch.setenv("OPPO_STATIC_DECODE", "1")
    eng = ActorEngine(model, make_pool(model, 64), EngineConfig(seed=2, graph_sampling=True, max_model_len=64))
    seen = []
    forward = type(model).forward

    def spy(self, *a, **k):
        seen.append(torch.is_grad_enabled())
        return forward(self, *a, **k)

    monkeypatch.setattr(type(model), "forward", spy)
    with torch.enable_grad():
        assert eng.warmup() == len(eng.runner.graph_batch_sizes)
        for _graph, st in eng.runner.graphs.values():
            hidden, sampled = st["step"]()        # what torch.cuda.graph() would record
            assert not hidden.requires_grad and sampled is not None
    assert seen and not any(seen)


def test_drains_and_waiting_decode_steps_count_where_async_decode_stalls(tiny_llama):
    """perf counters of the async decode: a step that must read the one in flight back first (a
    prefill pending: here a sequence admitted mid-run; the end) counts as a drain; decode steps
    taken while a sequence waits for pages count as waiting. Nothing waits with a roomy pool and
    every request in at the start, and then only the end and the prompts' prefill drain."""
    _, model = tiny_llama

    def run(pages, late):
        pool = make_pool(model, pages)
        eng = ActorEngine(model, pool, EngineConfig(async_decode=True, chunk_size=4, seed=1, max_num_seqs=4,
                                                    max_num_batched_tokens=64, max_model_len=64))
        sp = SamplingParams(temperature=1.0, max_new_tokens=40)
        for p in prompts(4, seed=5):
            eng.add_request(p, sp, target_len=30)
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
            if steps == 10 and late:          # one more request once the others decode (slot or pages)
                eng.add_request(prompts(1, seed=6)[0], sp, target_len=10)
        assert pool.num_free == pool.num_pages
        return eng.stats

    roomy = run(400, late=False)
    assert roomy["waiting_decode_steps"] == 0 and roomy["drains"] <= 2 and roomy["decode_steps"] >= 29
    # max_num_seqs=4: the fifth waits for a slot while four decode. It cannot be admitted before
    # one of them ends, so those steps stay lagged (they drained every step before 2026-12-05:
    # 22 drains in 38 decode steps); one drain admits it once a slot is free
    late = run(400, late=True)
    assert late["waiting_decode_steps"] >= 10
    assert late["drains"] <= roomy["drains"] + 2, late
    # pages, not slots: a waiting request may be admitted by preempting, so each step drains
    short = run(22, late=True)
    assert short["drains"] > roomy["drains"] + 2, short


def test_async_decode_with_requests_waiting_for_a_slot_equals_synchronous(tiny_llama):
    """More requests than batch slots (max_num_seqs=3 for 8): waiting requests do not stop the
    lagged decode, and tokens, log-probs and finishes equal the synchronous engine's."""
    _, model = tiny_llama
    ps = prompts(8, seed=31)

    def run(async_decode):
        pool = make_pool(model, 400)
        eng = ActorEngine(model, pool, EngineConfig(async_decode=async_decode, chunk_size=4, seed=2, max_num_seqs=3,
                                                    max_num_batched_tokens=64, max_model_len=64))
        sp = SamplingParams(temperature=1.0, max_new_tokens=30)
        seqs = [eng.add_request(p, sp, target_len=t) for p, t in zip(ps, [5, 30, 12, 1, 20, 8, 25, 3])]
        while eng.has_unfinished():
            eng.step()
            pool.check()
        assert pool.num_free == pool.num_pages
        return [(s.output_ids, s.versions, s.finish_reason) for s in seqs], [x for s in seqs for x in s.logprobs], eng

    sync_out, sync_lp, _ = run(False)
    async_out, async_lp, eng = run(True)
    assert async_out == sync_out
    torch.testing.assert_close(torch.tensor(async_lp), torch.tensor(sync_lp), atol=1e-5, rtol=0)
    assert eng.stats["waiting_decode_steps"] > 0 and eng.stats["drains"] < eng.stats["waiting_decode_steps"]


@pytest.mark.parametrize("async_decode", [False, True])
def test_reprefill_of_a_sequence_with_tokens_samples_nothing(tiny_llama, async_decode):
    """Sequences whose KV is dropped mid-generation (``drop_kv``, as after a weight update) are
    re-prefilled up to their last token, and the next decode step feeds that token: the prefill
    samples nothing, so with async decode the engine launches the next step behind it without
    waiting (it stays unbooked until then). Tokens, versions and finishes equal a run without the
    drop (sampling is keyed by sequence and position); no page leaks."""
    _, model = tiny_llama
    ps = prompts(4, seed=41)

    def run(drop: bool):
        pool = make_pool(model, 64)
        eng = ActorEngine(model, pool, EngineConfig(async_decode=async_decode, chunk_size=4, seed=9,
                                                    max_model_len=60), eos_token_id=None)
        sp = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
        seqs = [eng.add_request(p, sp, target_len=t) for p, t in zip(ps, (12, 7, 10, 3))]
        for _ in range(5):
            eng.step()
        unbooked = None
        if drop:
            assert eng.drop_kv() > 0
            before = [len(s.output_ids) for s in seqs]
            n0 = eng.stats["prefill_steps"]
            eng.step()
            assert eng.stats["prefill_steps"] == n0 + 1
            assert [len(s.output_ids) for s in seqs] == before            # the prefill sampled nothing
            unbooked = eng._unbooked is not None
            running = [s for s in eng.scheduler.running]
            assert running and all(s.num_cached_tokens == s.num_tokens - 1 for s in running)
        while eng.has_unfinished():
            eng.step()
            pool.check()
        assert pool.num_free == pool.num_pages and not eng._retired and eng._unbooked is None
        return [(s.output_ids, s.versions, s.finish_reason) for s in seqs], unbooked

    want, _ = run(False)
    got, unbooked = run(True)
    assert got == want
    assert unbooked == async_decode


def test_resumed_sequence_with_its_kv_kept_decodes_without_a_prefill(tiny_llama):
    """``resume`` of a sequence whose pages are still there (all its tokens but the last cached)
    admits it straight into decoding: no prefill step, and its tokens equal an uninterrupted run."""
    _, model = tiny_llama
    p = prompts(1, seed=43)[0]

    def run(pause: bool):
        pool = make_pool(model, 32)
        eng = ActorEngine(model, pool, EngineConfig(async_decode=False, chunk_size=4, seed=3, max_model_len=60),
                          eos_token_id=None)
        seq = eng.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True), target_len=8)
        for _ in range(4):
            eng.step()
        if pause:       # out of the running set with its pages kept, then back (as a checkpoint's resume)
            eng.scheduler.running.remove(seq)
            n0 = eng.stats["prefill_steps"]
            eng.resume(seq)
            assert seq.num_cached_tokens == seq.num_tokens - 1
        while eng.has_unfinished():
            eng.step()
        if pause:
            assert eng.stats["prefill_steps"] == n0
        assert pool.num_free == pool.num_pages
        return seq.output_ids

    assert run(True) == run(False)


def test_staging_reuses_its_pinned_buffers_only_after_their_copies(monkeypatch):
    """runner._Staging on CUDA copies through a ring of pinned buffers it owns: each call's data lands
    in the next buffer (grown when too small), and a buffer is written again only after the event
    recorded behind its previous copy has been waited on. Checked on the CPU with the ring's logic
    (unpinned buffers, events that record their calls): the values each call returns, the growth,
    and that no slot is reused before its own event's synchronize()."""
    from oppo_runtime.engine import runner as R

    log = []

    class FakeEvent:
        def __init__(self):
            self.id = len(log)
            log.append(("new", self.id))

        def record(self):
            log.append(("record", self.id))

        def synchronize(self):
            log.append(("sync", self.id))

    monkeypatch.setattr(R.torch.cuda, "Event", FakeEvent)
    st = R._Staging(torch.device("cpu"))
    st.pin, st._ring, st._events = True, R.PinnedRing(st.RING, False), [None] * st.RING
    rng = np.random.default_rng(0)
    for call in range(3 * st.RING + 1):
        n = 5 if call != st.RING + 2 else (st.MIN_BYTES // 8) + 3        # one call outgrows the buffers
        parts = [rng.integers(0, 1000, size=n), list(range(call)), [7]]
        before = len(log)
        got = st.many(parts)
        assert [g.tolist() for g in got] == [list(parts[0]), list(range(call)), [7]]
        slot = st._ring.i
        assert slot == (call + 1) % st.RING
        assert st._ring.bufs[slot].numel() >= max(st.MIN_BYTES, 8 * (n + call + 1))
        ev = st._events[slot]
        this_call = log[before:]
        assert this_call[-1] == ("record", ev.id)
        # from the second round on, the slot's previous copy is waited on before its buffer is written
        assert (("sync", ev.id) in this_call) == (call >= st.RING)
    uses = [e for e in log if e[0] == "record"]
    syncs = [e for e in log if e[0] == "sync"]
    assert len(uses) == 3 * st.RING + 1 and len(syncs) == 2 * st.RING + 1
    assert len({e[1] for e in uses}) == st.RING       # one event per slot, made once
    t = st([1.5, 2.5], torch.float32)
    assert t.dtype == torch.float32 and t.tolist() == [1.5, 2.5]
