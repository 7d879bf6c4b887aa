"""The split-K GEMM of the decode projections (ops.gemm, ops.gemm_triton).

CPU: the plan's arithmetic; argument errors; the kernel under Triton's interpreter (a subprocess with
TRITON_INTERPRET=1) against a float32 product over ragged shapes, bias, residual (in place), split
and unsplit configs, outputs poisoned first, the counters back at zero, two calls bit-equal; a
model's decode step through a context that carries a workspace. GPU (``-m gpu``): the kernel against
the float32 product at the projections of Qwen2.5-0.5B/1.5B and ragged batches, each output poisoned
with NaN first, deterministic, in a CUDA graph replayed twice (the counters must be back at zero),
on rows with a stride; and the engine's decode with ``OPPO_DECODE_GEMM=splitk`` against cuBLAS.
"""
import textwrap

import pytest
import torch

from oppo_runtime.ops import MissingKernelError
from oppo_runtime.ops.gemm import SplitKWorkspace, decode_gemm, linear, splitk_config

from _scripts import run_check  # noqa: E402

PROJECTIONS = [(896, 1152), (896, 896), (896, 9728), (4864, 896),        # Qwen2.5-0.5B: qkv, o, gate_up, down
               (1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536)]  # Qwen2.5-1.5B


@pytest.mark.parametrize("M", [1, 7, 64, 100, 256, 512])
@pytest.mark.parametrize("K,N", PROJECTIONS)
def test_splitk_config_covers_k_once_and_fills_the_card(M, K, N):
    bm, bn, bk, k_split, warps, stages = splitk_config(M, N, K, 132)
    assert bm >= 16 and bm >= min(M, 64) or bm == 128
    assert k_split % bk == 0 and k_split > 0
    splits = -(-K // k_split)
    assert (splits - 1) * k_split < K <= splits * k_split          # no empty split, all of K
    tiles = -(-M // bm) * -(-N // bn)
    if splits > 1:
        assert tiles * splits <= 132 and k_split >= 4 * bk and tiles < 132
    assert warps in (4, 8) and stages >= 2


def test_decode_gemm_switch(monkeypatch):
    monkeypatch.delenv("OPPO_DECODE_GEMM", raising=False)
    assert decode_gemm() == "cublas"
    for v in ("splitk", "splitk-silu-apart", "cublas"):
        monkeypatch.setenv("OPPO_DECODE_GEMM", v)
        assert decode_gemm() == v
    monkeypatch.setenv("OPPO_DECODE_GEMM", "cutlass")
    with pytest.raises(ValueError, match="OPPO_DECODE_GEMM"):
        decode_gemm()


def test_reference_is_torch_and_arguments_are_checked(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((5, 24), (12, 24), (12,), (5, 12)))
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.allclose(linear(x, w, b, r), r + x @ w.t() + b, atol=1e-5)
    r2 = r.clone()
    assert linear(x, w, None, r2, out=r2) is r2 and torch.allclose(r2, r + x @ w.t(), atol=1e-5)
    with pytest.raises(ValueError, match="bias must be"):
        linear(x, w, b[:5])
    with pytest.raises(ValueError, match="residual must be"):
        linear(x, w, None, r[:, :5])
    with pytest.raises(MissingKernelError, match="not on a CUDA device"):
        linear(x.bfloat16(), w.bfloat16(), backend="triton")
    with pytest.raises(MissingKernelError, match="float16/bfloat16"):
        linear(x, w, backend="triton")
    with pytest.raises(MissingKernelError, match="unit stride"):
        linear(x.bfloat16().t().contiguous().t(), w.bfloat16(), backend="triton")


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops.gemm import SplitKWorkspace, gate_up_silu, gate_up_silu_ref, linear, linear_ref
    from oppo_runtime.ops import backends
    dev = "{dev}"
    g = torch.Generator(device=dev).manual_seed(0)
    ws = SplitKWorkspace(dev)
    cases = {cases}
    for (M, K, N), dtype, config, has_bias, has_res in cases:
        dtype = getattr(torch, dtype)
        base = torch.randn(M, K + 8, generator=g, device=dev).to(dtype)
        x = base[:, 3:K + 3]                           # rows with a stride (a view), unit stride along K
        w = (torch.randn(N, K, generator=g, device=dev) * K ** -0.5).to(dtype)
        b = torch.randn(N, generator=g, device=dev).to(dtype) if has_bias else None
        r = torch.randn(M, N, generator=g, device=dev).to(dtype) if has_res else None
        want = x.float() @ w.float().t() + (b.float() if has_bias else 0) + (r.float() if has_res else 0)
        outs = []
        for rep in range(2):
            out = torch.full((M, N), float("nan"), dtype=dtype, device=dev)
            got = linear(x, w, b, r, out=out, workspace=ws, backend="triton", config=config)
            assert got is out
            outs.append(got.clone())
            err = ((got.float() - want).norm() / want.norm()).item()
            assert torch.isfinite(got).all() and err < {tol}, ((M, K, N), dtype, config, err)
            assert int(ws.counters.abs().sum()) == 0, "a tile counter was not reset"
        assert torch.equal(outs[0], outs[1]), "two calls differ: the split sum is not in a fixed order"
        ref = linear_ref(x, w, b, r).float()            # torch's own rounding: within a unit or two of ours
        assert ((outs[0].float() - ref).abs() <= 2 * ref.abs() * 2.0 ** -7 + 1e-2).all(), ((M, K, N), config)
        if has_res:                                     # in place on the residual
            r2 = r.clone()
            assert linear(x, w, b, r2, out=r2, workspace=ws, backend="triton", config=config) is r2
            assert torch.equal(r2, outs[0])
    assert backends()["linear"] == "triton", backends()
    for (M, K, I), dtype, config, has_bias in {dual_cases}:   # gate_up + silu*mul in one launch
        dtype = getattr(torch, dtype)
        x = torch.randn(M, K, generator=g, device=dev).to(dtype)
        w = (torch.randn(2 * I, K, generator=g, device=dev) * K ** -0.5).to(dtype)
        b = torch.randn(2 * I, generator=g, device=dev).to(dtype) if has_bias else None
        y = (x.float() @ w.float().t() + (b.float() if has_bias else 0))
        want = torch.nn.functional.silu(y[:, :I]) * y[:, I:]
        outs = []
        for rep in range(2):
            out = torch.full((M, I), float("nan"), dtype=dtype, device=dev)
            got = gate_up_silu(x, w, b, out=out, workspace=ws, backend="triton", config=config)
            assert got is out
            outs.append(got.clone())
            err = ((got.float() - want).norm() / want.norm()).item()
            assert torch.isfinite(got).all() and err < {dual_tol}, ("dual", (M, K, I), dtype, config, err)
            assert int(ws.counters.abs().sum()) == 0, "a tile counter was not reset"
        assert torch.equal(outs[0], outs[1])
        ref = gate_up_silu_ref(x, w, b).float()        # torch's rounding of the two kernels it replaces
        assert ((outs[0].float() - ref).abs() <= {dual_ulps} * ref.abs() * 2.0 ** -7 + 2e-2).all(), ("dual", (M, K, I), config)
    assert backends()["gate_up_silu"] == "triton", backends()
    print("ok")
""")

CPU_DUAL = [((37, 200, 40), "bfloat16", (16, 16, 32, 64, 4, 2), True),      # 4 splits, ragged, bias
            ((20, 128, 24), "float16", (16, 16, 32, 128, 4, 2), False),      # one split
            ((9, 96, 48), "bfloat16", None, False)]                           # the plan's own config

CPU_CASES = [((37, 200, 70), "bfloat16", (16, 32, 32, 64, 4, 2), True, False),    # ragged, K % BK != 0, 4 splits
             ((64, 256, 96), "float16", (32, 32, 32, 64, 4, 2), False, True),     # residual
             ((20, 128, 40), "bfloat16", (16, 16, 32, 128, 4, 2), True, True),    # one split, both
             ((5, 96, 24), "bfloat16", None, False, False),                       # the plan's own config
             ((33, 256, 48), "bfloat16", (16, 32, 64, 64, 4, 2), False, True)]    # 4 splits, residual


def test_kernel_equals_the_product_in_the_interpreter():
    pytest.importorskip("triton")
    # the interpreter truncates float32 -> bfloat16 (no round to nearest): the three roundings of the
    # silu*mul epilogue then drift ~1% from the float32 product, where the GPU's rounding stays at ~0.4%
    run_check(KERNEL_CHECK.format(dev="cpu", cases=CPU_CASES, dual_cases=CPU_DUAL, tol=1e-2, dual_tol=3e-2,
                                  dual_ulps=8), interpret=True)


MODEL_CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.models import ModelConfig, PagedContext, build_model
    from oppo_runtime.ops import backends, gemm
    linear = gemm.linear
    calls = []
    def forced(*a, **k):
        calls.append(1)
        return linear(*a, **{**k, "backend": "triton"})
    import oppo_runtime.models.transformer as tr
    tr.splitk_linear = forced
    dual = gemm.gate_up_silu
    def forced_dual(*a, **k):
        calls.append(2)
        return dual(*a, **{**k, "backend": "triton"})
    tr.gate_up_silu = forced_dual
    TINY = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, pad_token_id=0)
    for fold in ("0", "1"):
        import os
        os.environ["OPPO_DECODE_NORM_FOLD"] = fold
        model = build_model(ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], **TINY}), seed=3,
                            dtype=torch.bfloat16)
        model.fuse_projections()
        L, Hkv, D = model.kv_geometry()
        B = 3
        def step(ws):
            caches = [(torch.zeros(4, 4, Hkv, D, dtype=torch.bfloat16), torch.zeros(4, 4, Hkv, D, dtype=torch.bfloat16))
                      for _ in range(L)]
            ctx = PagedContext(caches, torch.tensor([0, 4, 8]), torch.arange(3, dtype=torch.int32)[:, None],
                               torch.ones(B, dtype=torch.int32), torch.arange(B + 1, dtype=torch.int32), 1, True,
                               gemm_workspace=ws)
            with torch.inference_mode():
                return model.compute_logits(model(torch.tensor([5, 9, 11]), torch.zeros(B, dtype=torch.long), ctx))
        want = step(None)
        for silu_in in (True, False):
            n = len(calls)
            got = step(gemm.SplitKWorkspace("cpu", silu_in_gate_up=silu_in))
            # qkv, o_proj, gate_up, down a layer; gate_up with silu*mul in the unfolded layer
            dual = silu_in and fold == "0"
            assert calls[n:] == [1, 1, 2 if dual else 1, 1] * L, (fold, silu_in, calls[n:])
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 2e-2, (fold, silu_in, err)
    assert backends()["linear"] == "triton" and backends()["gate_up_silu"] == "triton"
    print("ok")
""")


def test_model_decode_step_runs_the_kernel_through_the_context_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(MODEL_CHECK, interpret=True)


# ----------------------------------------------------------------------------- GPU
GPU_CASES = [((M, K, N), "bfloat16", None, bias, False) for M in (1, 7, 64, 256, 300)
             for (K, N), bias in zip(PROJECTIONS[:4], (True, False, False, False))]
GPU_CASES += [((256, K, N), "float16", None, False, True) for K, N in PROJECTIONS[4:]]
GPU_CASES += [((256, 4864, 896), "bfloat16", cfg, False, True)
              for cfg in [(128, 64, 64, 640, 4, 3), (64, 64, 64, 320, 4, 4), (128, 128, 64, 4864, 8, 3)]]

GPU_DUAL = [((M, 896, 4864), "bfloat16", None, False) for M in (1, 7, 64, 256, 300)]
GPU_DUAL += [((256, 1536, 8960), "bfloat16", None, True), ((256, 896, 4864), "bfloat16", (128, 64, 64, 448, 4, 3), False)]


@pytest.mark.gpu
def test_kernel_equals_the_product_on_the_gpu():
    pytest.importorskip("triton")
    run_check(KERNEL_CHECK.format(dev="cuda", cases=GPU_CASES, dual_cases=GPU_DUAL, tol=1e-2, dual_tol=1e-2,
                                  dual_ulps=4))


@pytest.mark.gpu
def test_kernel_in_a_cuda_graph_resets_its_counters():
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(1)
    ws = SplitKWorkspace("cuda")
    x = torch.randn(256, 4864, generator=g, device="cuda").bfloat16()
    w = (torch.randn(896, 4864, generator=g, device="cuda") * 4864 ** -0.5).bfloat16()
    out = torch.empty(256, 896, dtype=torch.bfloat16, device="cuda")
    linear(x, w, out=out, workspace=ws)                  # eager first: the workspace is reserved
    want = out.clone()
    assert -(-4864 // splitk_config(256, 896, 4864, torch.cuda.get_device_properties(0).multi_processor_count)[3]) > 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear(x, w, out=out, workspace=ws)
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want) and int(ws.counters.abs().sum()) == 0
    fresh = SplitKWorkspace("cuda")
    with torch.cuda.graph(torch.cuda.CUDAGraph()), pytest.raises(RuntimeError, match="run the step once eagerly"):
        linear(x, w, out=out, workspace=fresh)


@pytest.mark.gpu
@pytest.mark.parametrize("fold", ["0", "1"])
def test_engine_decode_graphs_with_the_splitk_gemm_match_cublas(monkeypatch, fold):
    """Two bf16 engines, one per decode GEMM (``OPPO_DECODE_GEMM``: cublas, splitk), each with its
    decode steps in CUDA graphs, unfolded and norm-folded: the same greedy prompts, three decode
    steps; where the rows' inputs agree, the hidden states agree within bf16 rounding."""
    from oppo_runtime import ops
    from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams
    from oppo_runtime.memory import KVGeometry, PagePool
    from oppo_runtime.models import ModelConfig, build_model
    from test_decode_gemm_fusion import ENGINE_CFG, engine_prompts
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    monkeypatch.setenv("OPPO_DECODE_NORM_FOLD", fold)

    def run(gemm: str):
        monkeypatch.setenv("OPPO_DECODE_GEMM", gemm)
        m = build_model(ModelConfig.from_dict(ENGINE_CFG), seed=0, dtype=torch.bfloat16, device="cuda").eval()
        geo = KVGeometry(*m.kv_geometry(), torch.bfloat16)
        eng = ActorEngine(m, PagePool(400, PagePool.page_bytes_for([geo], 16), "cuda"),
                          EngineConfig(max_num_seqs=32, async_decode=False))
        assert eng.warmup() > 0 and eng.runner.use_graphs
        assert (eng.runner.gemm_workspace is not None) == (gemm == "splitk")
        for p in engine_prompts():
            eng.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=8), target_len=8)
        while eng.stats["decode_steps"] < 3:
            eng.step()
        st = eng.runner.graphs[24][1]
        return st["input_ids"][:24].clone(), st["hidden"][:24].float().clone()

    ids, want = run("cublas")
    sids, got = run("splitk")
    assert ops.backends()["linear"] == "triton" and ops.backends()["decode_gemm"].startswith("splitk")
    same = ids == sids
    assert same.sum() >= 12, same
    err = ((got[same] - want[same]).norm() / want[same].norm()).item()
    assert err < 2e-2, err
