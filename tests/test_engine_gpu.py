"""The engine and the overlapped rollout on a GPU: exact greedy decoding, CUDA graphs, kernels."""
import pytest
import torch

from oppo_runtime import ops
from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams
from oppo_runtime.engine.rollout import Rollout
from oppo_runtime.engine.scorer import Scorer
from oppo_runtime.memory import KVGeometry, PagePool
from oppo_runtime.models import ModelConfig, build_model
from oppo_runtime.models.context import DenseContext

pytestmark = pytest.mark.gpu

CFG = dict(architectures=["Qwen2ForCausalLM"], vocab_size=512, hidden_size=512, intermediate_size=1024,
           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
           rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def model(kind="causal_lm", dtype=torch.bfloat16, seed=0, device="cuda"):
    return build_model(ModelConfig.from_dict(CFG), kind, seed=seed, dtype=dtype, device=device).eval()


def pool_for(m, pages, tpp=16):
    g = KVGeometry(*m.kv_geometry(), next(m.parameters()).dtype)
    return PagePool(pages, PagePool.page_bytes_for([g], tpp), next(m.parameters()).device)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_greedy_matches_transformers_on_gpu_with_preemption():
    transformers = pytest.importorskip("transformers")
    m = model(dtype=torch.float32)
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in CFG.items() if k != "architectures"})
    hf = transformers.Qwen2ForCausalLM(hf_cfg).cuda().eval()
    hf.load_state_dict(m.state_dict(), strict=False)
    hf.tie_weights()
    ps = prompts(12, seed=1)
    eng = ActorEngine(m, pool_for(m, 40, 8), EngineConfig(chunk_size=7, max_num_batched_tokens=128))
    seqs = eng.generate(ps, SamplingParams(temperature=0.0, max_new_tokens=24))
    assert eng.scheduler.num_preemptions > 0
    for p, s in zip(ps, seqs):
        out = hf.generate(torch.tensor([p], device="cuda"), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                          device="cuda"), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert s.output_ids == out[0, len(p):].tolist()


def test_cuda_graph_decode_equals_eager_decode():
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    m = model()
    ps = prompts(20, seed=2)
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=40)
    outs = []
    for eager in (True, False):
        eng = ActorEngine(m, pool_for(m, 256), EngineConfig(enforce_eager=eager, seed=3))
        outs.append([(s.output_ids, s.logprobs) for s in eng.generate(ps, sp)])
        assert eng.runner.use_graphs == (not eager)
        if not eager:
            assert eng.runner.graphs, "no graph was captured"
    assert [o for o, _ in outs[0]] == [o for o, _ in outs[1]]
    torch.testing.assert_close(torch.tensor([lp for _, l in outs[0] for lp in l]),
                               torch.tensor([lp for _, l in outs[1] for lp in l]), atol=1e-3, rtol=0)


def test_warmup_captures_every_decode_graph_up_front():
    """After warmup() (called with grad on, trainable weights) a generation whose batch shrinks
    through every size captures nothing more, its graphs hold the inference path, and its tokens
    equal a lazily capturing engine's."""
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    m = model()
    ps = prompts(20, seed=4)
    sp = SamplingParams(temperature=1.0, max_new_tokens=40)
    lens = [1 + 2 * i for i in range(20)]          # one finishes every 2 steps: every batch size is met
    lazy = ActorEngine(m, pool_for(m, 256), EngineConfig(seed=5))
    want = [s.output_ids for s in lazy.generate(ps, sp, target_lens=lens)]
    eng = ActorEngine(m, pool_for(m, 256), EngineConfig(seed=5))
    assert torch.is_grad_enabled() and all(p.requires_grad for p in m.parameters())   # as in the trainer
    n = eng.warmup()
    assert n == len(eng.runner.graph_batch_sizes) and set(eng.runner.graphs) == set(eng.runner.graph_batch_sizes)
    # the fused inference path, not the autograd one (session 11: warmup() captured the latter,
    # ~4.5x the kernels per replay; its tokens still matched, so the token check alone missed it)
    assert not any(st["hidden"].requires_grad for _, st in eng.runner.graphs.values())
    captured = dict(eng.runner.graphs)
    assert eng.warmup() == 0
    got = [s.output_ids for s in eng.generate(ps, sp, target_lens=lens)]
    assert got == want
    assert all(eng.runner.graphs[bs] is captured[bs] for bs in captured), "a graph was captured again"


def test_decode_graph_replays_write_only_memory_the_runner_holds():
    """Each decode graph's split-KV workspace lives as long as the graph: after warmup(), junk
    tensors of the workspaces' sizes (which would take any block freed behind a graph's back)
    stay untouched through a generation that replays every graph, and its tokens equal an eager
    engine's. (Session 10: the workspace was freed after capture and a G run hit an illegal
    address.)"""
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    m = model()
    ps = prompts(20, seed=6)
    sp = SamplingParams(temperature=1.0, max_new_tokens=40)
    lens = [1 + 2 * i for i in range(20)]
    want = [s.output_ids for s in ActorEngine(m, pool_for(m, 256), EngineConfig(seed=5, enforce_eager=True))
            .generate(ps, sp, target_lens=lens)]
    eng = ActorEngine(m, pool_for(m, 256), EngineConfig(seed=5))
    eng.warmup()
    sizes = [st["ctx"].decode_workspace.numel() for _, st in eng.runner.graphs.values()
             if st["ctx"].decode_workspace is not None]
    assert sizes, "small batches over a 1024-token table split: their graphs have a workspace"
    import gc
    gc.collect()
    junk = [torch.full((n,), 7.0, device="cuda") for n in sizes for _ in range(3)]
    got = [s.output_ids for s in eng.generate(ps, sp, target_lens=lens)]
    torch.cuda.synchronize()
    assert all(bool((j == 7.0).all()) for j in junk), "a replay wrote into memory the runner had freed"
    assert got == want


def test_behaviour_logprobs_match_a_dense_forward_in_bf16():
    m = model()
    ps = prompts(16, seed=4)
    eng = ActorEngine(m, pool_for(m, 256), EngineConfig(seed=5))
    seqs = eng.generate(ps, SamplingParams(temperature=1.0, max_new_tokens=48))
    err = []
    for s in seqs:
        ids = torch.tensor(s.all_ids, device="cuda")
        with torch.no_grad():
            h = m(ids, torch.arange(len(ids), device="cuda"), DenseContext(torch.tensor([0, len(ids)], device="cuda")))
            lp = m.compute_logprobs(h[len(s.prompt_ids) - 1:-1], ids[len(s.prompt_ids):])
        err.append((lp.cpu() - torch.tensor(s.logprobs)).abs().max())
    assert max(err) < 0.1, max(err)


def test_overlap_on_and_off_agree_on_gpu():
    actor, reward, critic = model(seed=0), model("score", seed=1), model("score", seed=2)
    ps = prompts(24, seed=6)
    lens = [int(x) for x in torch.randint(1, 120, (24,), generator=torch.Generator().manual_seed(7))]
    res = {}
    for overlap in (True, False):
        pool = pool_for(actor, 1024)
        eng = ActorEngine(actor, pool, EngineConfig(chunk_size=16, seed=1))
        scorers = [Scorer("reward", reward, pool, "reward", max_model_len=1024),
                   Scorer("critic", critic, pool, "critic", max_model_len=1024)]
        ro = Rollout(eng, scorers, overlap=overlap)
        ro.submit(ps, SamplingParams(max_new_tokens=128), target_lens=lens)
        res[overlap] = sorted(ro.collect(), key=lambda r: r.seq.sample_key)
        assert pool.num_free == pool.num_pages
    for a, b in zip(res[True], res[False]):
        assert a.seq.output_ids == b.seq.output_ids
        assert abs(a.score - b.score) <= 2e-2 * max(1.0, abs(b.score))
        va, vb = torch.tensor(a.values), torch.tensor(b.values)
        assert (va - vb).norm() <= 2e-2 * max(1e-3, float(vb.norm()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_scorers_on_a_second_gpu_score_as_beside_the_actor():
    """Placement: reward model and critic on cuda:1 with a pool of their own, driven by the scorer
    thread while the actor decodes on cuda:0; the timeline resolves each GPU's spans on its clock."""
    from oppo_runtime.engine.timeline import Timeline
    actor = model(seed=0, device="cuda:0")
    ps = prompts(24, seed=6)
    lens = [int(x) for x in torch.randint(1, 120, (24,), generator=torch.Generator().manual_seed(7))]
    res = {}
    for dev in ("cuda:0", "cuda:1"):
        reward, critic = model("score", seed=1, device=dev), model("score", seed=2, device=dev)
        pool = pool_for(actor, 1024)
        spool = pool if dev == "cuda:0" else pool_for(reward, 1024)
        eng = ActorEngine(actor, pool, EngineConfig(chunk_size=16, seed=1))
        scorers = [Scorer("reward", reward, spool, "reward", max_model_len=1024),
                   Scorer("critic", critic, spool, "critic", max_model_len=1024)]
        tl = Timeline()
        tl.mark_reference()
        ro = Rollout(eng, scorers, overlap=True, timeline=tl)
        ro.submit(ps, SamplingParams(max_new_tokens=128), target_lens=lens)
        res[dev] = sorted(ro.collect(), key=lambda r: r.seq.sample_key)
        ro.close()
        tl.resolve()
        assert {"actor", "reward", "critic"} <= set(tl.lanes)
        lo, hi = tl.extent()
        assert 0 <= hi - lo < 60 and all(sp.duration_s >= 0 for sp in tl.spans)
        assert pool.num_free == pool.num_pages and spool.num_free == spool.num_pages
    for a, b in zip(res["cuda:1"], res["cuda:0"]):
        assert a.seq.output_ids == b.seq.output_ids
        assert abs(a.score - b.score) <= 2e-2 * max(1.0, abs(b.score))
        va, vb = torch.tensor(a.values), torch.tensor(b.values)
        assert (va - vb).norm() <= 2e-2 * max(1e-3, float(vb.norm()))


def test_async_decode_equals_synchronous_decode_on_gpu():
    """Tokens read back one step late (the default on CUDA) change no token, log-prob or finish,
    with CUDA graphs, EOS ends (one wasted row) and a pool small enough to preempt."""
    m = model()
    ps = prompts(24, seed=4)
    sp = SamplingParams(temperature=1.0, max_new_tokens=48)
    probe = ActorEngine(m, pool_for(m, 256), EngineConfig(seed=3, async_decode=False)).generate(ps[:1], sp)[0]
    eos = probe.output_ids[10]
    outs = []
    for async_decode in (False, True):
        pool = pool_for(m, 48)
        eng = ActorEngine(m, pool, EngineConfig(seed=3, async_decode=async_decode, chunk_size=5), eos_token_id=eos)
        seqs = eng.generate(ps, sp)
        outs.append([(s.output_ids, s.logprobs, s.finish_reason) for s in seqs])
        assert pool.num_free == pool.num_pages
        pool.check()
    assert [(o, r) for o, _, r in outs[0]] == [(o, r) for o, _, r in outs[1]]
    # batch sizes differ by the wasted rows, so a GEMM may pick another kernel: log-probs to 1e-3
    torch.testing.assert_close(torch.tensor([x for _, lp, _ in outs[0] for x in lp]),
                               torch.tensor([x for _, lp, _ in outs[1] for x in lp]), atol=1e-3, rtol=0)
    assert any(r == "eos" for *_, r in outs[0])


@pytest.mark.parametrize("graph_sampling", [False, True])
def test_steady_decode_steps_never_sync_the_host_with_the_device(graph_sampling):
    """A decode step (CUDA graph, sampler, staging, read-back of the previous step) issues no
    synchronizing CUDA call: torch's sync debug mode raises on any (e.g. a pageable copy). With
    graph sampling the LM head and sampler are inside the graphs, all captured by warmup()."""
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    m = model()
    eng = ActorEngine(m, pool_for(m, 256), EngineConfig(seed=3, graph_sampling=graph_sampling))
    if graph_sampling:
        assert eng.warmup() == len(eng.runner.graph_batch_sizes)
    seqs = [eng.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=64), target_len=64)
            for p in prompts(8, seed=6)]
    while eng.scheduler.prefill_pending() or eng.stats["decode_steps"] < 4:
        eng.step()                                   # prefill, graph capture, first decode steps
    assert eng._inflight is not None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(16):
            eng.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while eng.has_unfinished():
        eng.step()
    assert all(len(s.output_ids) == 64 and s.finish_reason == "length" for s in seqs)


def test_reprefill_of_dropped_kv_is_not_waited_for():
    """After ``drop_kv`` (a weight update), the sequences' re-prefill samples nothing (their next
    decode step feeds the last token), so the engine leaves it unbooked and the step issues no
    synchronizing CUDA call (sync debug mode); the tokens equal a run without the drop."""
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    m = model()
    ps = prompts(6, seed=8)

    def run(drop):
        eng = ActorEngine(m, pool_for(m, 256), EngineConfig(seed=5))
        seqs = [eng.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=40), target_len=40) for p in ps]
        while eng.scheduler.prefill_pending() or eng.stats["decode_steps"] < 6:
            eng.step()
        if drop:
            assert eng.drop_kv() == len(ps)
            torch.cuda.set_sync_debug_mode("error")
            try:
                eng.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert eng._unbooked is not None and eng.stats["prefill_steps"] == 2
        while eng.has_unfinished():
            eng.step()
        return [s.output_ids for s in seqs]

    assert run(True) == run(False)


def _graph_sampling_runs(ps, sp, **cfg):
    """(tokens, log-probs, finish reasons) per sequence with the LM head and sampler in the decode
    graphs off and on, everything else equal."""
    m = model()
    outs = []
    for gs in (False, True):
        pool = pool_for(m, 256)
        eng = ActorEngine(m, pool, EngineConfig(seed=3, graph_sampling=gs, **cfg))
        assert eng.graph_sampling == gs and (eng.runner.decode_head is not None) == gs
        seqs = eng.generate(ps, sp)
        if gs:
            assert all("sampled" in st for _, st in eng.runner.graphs.values()), "a graph without the sampler"
        outs.append([(s.output_ids, s.logprobs, s.finish_reason) for s in seqs])
        assert pool.num_free == pool.num_pages
    return outs


@pytest.mark.parametrize("async_decode", [True, False])
def test_graph_sampling_equals_eager_sampling(async_decode):
    """The LM head and the Gumbel sampler captured in the decode graphs (EngineConfig.graph_sampling)
    sample the same tokens as the eager head (same kernels; the padded graph batch may split the
    vocabulary differently: log-probs to 1e-4), with a shrinking batch (graph buckets > B)."""
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    ps = prompts(21, seed=8)
    sp = SamplingParams(temperature=0.8, max_new_tokens=40)
    off, on = _graph_sampling_runs(ps, sp, async_decode=async_decode)
    assert [(o, r) for o, _, r in off] == [(o, r) for o, _, r in on]
    torch.testing.assert_close(torch.tensor([x for _, lp, _ in off for x in lp]),
                               torch.tensor([x for _, lp, _ in on for x in lp]), atol=1e-4, rtol=0)


def test_graph_sampling_falls_back_for_top_p_rows():
    """A batch with a top-p row cannot use the captured (filterless) sampler: that step runs the
    eager head; results equal the engine without graph sampling."""
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    ps = prompts(6, seed=9)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24)
    off, on = _graph_sampling_runs(ps, sp)
    assert [o for o, _, _ in off] == [o for o, _, _ in on]


def _rounds_beside_captures(one_round, captures: int, min_rounds: int) -> None:
    """Runs one_round(i, stream) -> next i over and over in a thread, on that thread's own stream,
    while this thread captures and replays `captures` CUDA graphs (thread_local mode, as the
    runner's decode and prefill captures do); at least min_rounds rounds. Fails on the thread's
    first error, or if a replay's result is wrong."""
    import threading
    dev = torch.device("cuda")
    stop, errors, done = threading.Event(), [], [0]

    def worker():
        s = torch.cuda.Stream(dev)
        with torch.cuda.stream(s):
            i, rounds = 0, 0
            while not stop.is_set() or rounds < min_rounds:
                try:
                    i = one_round(i, s)
                except Exception as e:  # noqa: BLE001  (reported by the main thread)
                    errors.append(e)
                    return
                rounds += 1
            done[0] = rounds

    th = threading.Thread(target=worker)
    th.start()
    try:
        x = torch.randn(256, 256, device=dev)
        for _ in range(captures):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                y = x @ x + 1
            g.replay()
    finally:
        stop.set()
        th.join()
    torch.cuda.synchronize()
    assert not errors, f"the staging thread failed beside the captures: {errors[0]!r}"
    assert done[0] >= max(1, min_rounds) and torch.allclose(y, x @ x + 1, rtol=1e-3, atol=1e-3)


def test_pinned_staging_beside_another_threads_capture():
    """The rollout's pattern without a model: one thread captures CUDA graphs while another pins
    host buffers and copies them to and from the device on its own stream (the scorer thread's
    staging before session 27). Session 20's whole suite failed once with "CUDA error: invalid
    argument" raised at a scorer thread's pin_memory() (test_scorer_graphs_gpu's overlapped rollout;
    it passed rerun alone): this runs the pattern many times on its own, so a race between
    PyTorch's pinned allocator and a capture on another thread shows here, where the cause is the
    only thing running."""
    dev = torch.device("cuda")

    def one_round(i, s):
        t = torch.as_tensor(list(range(1 + i % 97)), dtype=torch.int64).pin_memory().to(dev, non_blocking=True)
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t * 2, non_blocking=True)                   # a D2H into pinned memory, as the scorer's
        s.synchronize()
        assert int(h[-1]) == 2 * (i % 97), (i, h[-1])
        return i + 1

    _rounds_beside_captures(one_round, captures=200, min_rounds=0)


def test_runner_staging_keeps_every_copy_beside_another_threads_capture():
    """runner._Staging (the scorers' and the actor's eager input staging: a ring of pinned buffers
    it owns, each reused after the event behind its last copy) in one thread, many calls in flight
    between host syncs, while another thread captures CUDA graphs: every staged tensor holds its own
    call's values (a buffer reused under a copy still in flight would give another call's block
    tables to a kernel)."""
    from oppo_runtime.engine.runner import _Staging
    st = _Staging(torch.device("cuda"))

    def one_round(i, s):
        got = []
        for k in range(i, i + 32):          # 32 copies in flight (4 rounds of the ring)
            a, b = st.many([list(range(k, k + 1 + k % 61)), [k] * 3])
            torch.cuda._sleep(2000)         # the stream falls behind the host
            got.append((k, a.sum(), b.sum()))
        s.synchronize()
        for k, sa, sb in got:
            n = 1 + k % 61
            assert int(sa) == n * k + n * (n - 1) // 2 and int(sb) == 3 * k, k
        return i + 32

    _rounds_beside_captures(one_round, captures=100, min_rounds=2)
