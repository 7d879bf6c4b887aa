"""Decode-layer GEMM fusion (``OPPO_DECODE_GEMM_FUSION=1``): add+RMSNorm as the prologue of the QKV
and gate_up projections, rotary + K/V append and silu*mul as their epilogues (ops.fused).

CPU: the references are the unfused ops; a decode step of the model with the switch on equals the
unfused step bit for bit on the references, and the Triton kernels (interpreted) equal the
references. GPU (``-m gpu``): the kernels against the references over real model shapes (outputs
poisoned, shuffled slots, several row blocks), and a decode step of a model, fused vs unfused.
"""
import textwrap

import pytest
import torch

from oppo_runtime.models import ModelConfig, PagedContext, build_model
from oppo_runtime.ops import backends

from _scripts import run_check  # noqa: E402
from test_models import LLAMA3_ROPE, TINY  # noqa: E402

DUAL_CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops import fused
    dev = "{dev}"
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    def poisoned(*shape, dtype):     # what the op does not write must stay as it was
        return torch.full(shape, float("nan"), dtype=dtype, device=dev)

    def close(a, b, tol, what):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (what, "NaN where the reference has none, or not")
        a, b = torch.nan_to_num(a.float()), torch.nan_to_num(b.float())
        if tol < 1e-3:      # float32: element by element
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)
        else:               # bf16/fp16: rounding differs (order of sums; the interpreter truncates)
            err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert err < tol, (what, err)

    for dtype in ({dtypes}):
        tol = {{torch.float32: 1e-4, torch.float16: {half_tol}, torch.bfloat16: {half_tol}}}[dtype]
        for H, I in ({mlp_shapes}):
            for M in ({rows}):
                x, h = randn(M, H, dtype=dtype), randn(M, H, dtype=dtype, scale=4.0)
                nw = randn(H, dtype=dtype, scale=0.1) + 1
                W = randn(2 * I, H, dtype=dtype, scale=H ** -0.5)
                for bias in (None, randn(2 * I, dtype=dtype)):
                    for res in (None, h):
                        got = fused.norm_gate_up_silu(x, res, nw, 1e-6, W, bias, backend="triton")
                        want = fused.norm_gate_up_silu_ref(x, res, nw, 1e-6, W, bias)
                        what = f"gate_up {{dtype}} H={{H}} I={{I}} M={{M}} bias={{bias is not None}} res={{res is not None}}"
                        close(got[0], want[0], tol, what)
                        close(got[1], want[1], tol, "residual " + what)
                        assert (got[1] is x) == (res is None), what
        for H, D, Hq, Hkv in ({attn_shapes}):
            inv = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))
            cache = fused.rotary_cos_sin_cache(inv, 40000, dev)
            for M in ({rows}):
                x, h = randn(M, H, dtype=dtype), randn(M, H, dtype=dtype, scale=4.0)
                nw = randn(H, dtype=dtype, scale=0.1) + 1
                W = randn((Hq + 2 * Hkv) * D, H, dtype=dtype, scale=H ** -0.5)
                pos = torch.randint(0, 40000, (M,), generator=g).to(dev)
                # pages of 16 tokens in a pool whose page stride is twice a page (K and V interleaved),
                # shuffled slots, every third one -1 (skipped)
                nblk, bs = M // 4 + 3, 16
                slots = torch.randperm(nblk * bs, generator=g)[:M].to(dev)
                slots[::3] = -1
                qkn = (randn(D, dtype=dtype, scale=0.1) + 1, randn(D, dtype=dtype, scale=0.1) + 1)
                for bias, res, norms in ((None, None, (None, None)), (None, h, qkn),
                                         (randn((Hq + 2 * Hkv) * D, dtype=dtype), h, (None, None)),
                                         (randn((Hq + 2 * Hkv) * D, dtype=dtype), None, qkn)):
                    if True:
                        outs = []
                        for fn, kw in ((fused.norm_qkv_rotary, dict(backend="triton")), (fused.norm_qkv_rotary_ref, {{}})):
                            pool = poisoned(nblk, 2 * bs * Hkv * D, dtype=dtype)
                            shape, stride = (nblk, bs, Hkv, D), (2 * bs * Hkv * D, Hkv * D, D, 1)
                            kc, vc = pool.as_strided(shape, stride, 0), pool.as_strided(shape, stride, bs * Hkv * D)
                            q, r = fn(x, res, nw, 1e-6, W, bias, Hq, Hkv, cache, pos, kc, vc, slots, *norms, 1e-5, **kw)
                            outs.append((q, r, pool))
                        what = (f"qkv {{dtype}} H={{H}} D={{D}} Hq={{Hq}} Hkv={{Hkv}} M={{M}} bias={{bias is not None}} "
                                f"res={{res is not None}} qk_norm={{norms[0] is not None}}")
                        close(outs[0][0], outs[1][0], tol, "q " + what)
                        assert outs[0][0].is_contiguous(), what
                        close(outs[0][1], outs[1][1], tol, "residual " + what)
                        close(outs[0][2], outs[1][2], tol, "pages " + what)
    b = fused.__dict__["record_backend"].__globals__["_seen"]
    assert b["norm_gate_up_silu"] == "triton" and b["norm_qkv_rotary"] == "triton", b
    print("ok")
""")


def test_dual_gemm_kernels_equal_references_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(DUAL_CHECK.format(dev="cpu", dtypes="torch.float32, torch.bfloat16", half_tol=3e-2,
                                mlp_shapes="(64, 96), (96, 80)", rows="1, 5, 33, 70",
                                attn_shapes="(64, 32, 4, 2), (96, 64, 3, 1)"), interpret=True)


# ----------------------------------------------------------------------------- a model's decode step
FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "llama-bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32)),      # q/k norm in the QKV epilogue
}


SHAPE = {**TINY, "num_attention_heads": 2, "num_key_value_heads": 1}    # head_dim 32 (the kernel: >= 32)


def _model(family, dtype, device="cpu", seed=3):
    arch, extra = FAMILIES[family]
    model = build_model(ModelConfig.from_dict({"architectures": [arch], **SHAPE, **extra}), seed=seed, dtype=dtype,
                        device=device)
    with torch.no_grad():     # norms and biases away from 1 and 0: every weight matters
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.05).to(device, dtype))
    return model.eval()


def ragged_decode_pages(B: int, bs: int, g: torch.Generator, spare: int = 2):
    """A decode step's paging on the CPU: B contexts of 1..3 bs + 1 tokens on shuffled pages of bs
    tokens. Returns (context lengths, block tables [B, max pages] int32, pages in all, positions of
    the new rows (ctx - 1), their slots)."""
    ctx_lens = torch.randint(1, 3 * bs + 2, (B,), generator=g)
    pages_per = (ctx_lens + bs - 1) // bs
    nblk = int(pages_per.sum()) + spare
    perm = torch.randperm(nblk, generator=g)
    tables = torch.zeros(B, int(pages_per.max()), dtype=torch.int32)
    o = 0
    for b in range(B):
        tables[b, :pages_per[b]] = perm[o:o + pages_per[b]]
        o += int(pages_per[b])
    pos = ctx_lens - 1
    slots = tables[torch.arange(B), pos // bs].long() * bs + pos % bs
    return ctx_lens, tables, nblk, pos, slots


def decode_step(model, B=5, bs=4, seed=7, fused=False, monkeypatch=None):
    """One decode step of B sequences with ragged contexts over shuffled pages (K/V random):
    (logits [B, V], K and V caches after the step)."""
    L, Hkv, D = model.kv_geometry()
    dev, dtype = model.device, model.dtype
    g = torch.Generator().manual_seed(seed)
    ctx_lens, tables, nblk, pos, slots = ragged_decode_pages(B, bs, g)
    caches = [tuple((torch.randn(nblk, bs, Hkv, D, generator=g) * 0.5).to(dev, dtype) for _ in range(2))
              for _ in range(L)]
    ctx = PagedContext(caches, slots.to(dev), tables.to(dev), ctx_lens.to(dev, torch.int32),
                       torch.arange(B + 1, dtype=torch.int32, device=dev), 1, True)
    ids = torch.randint(1, TINY["vocab_size"], (B,), generator=g).to(dev)
    monkeypatch.setenv("OPPO_DECODE_GEMM_FUSION", "1" if fused else "0")
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, pos.to(dev), ctx))
    return logits, caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_decode_step_equals_the_unfused_one_bit_for_bit_on_cpu(family, dtype, monkeypatch):
    model = _model(family, dtype)
    model.fuse_projections()
    want, want_caches = decode_step(model, fused=False, monkeypatch=monkeypatch)
    got, got_caches = decode_step(model, fused=True, monkeypatch=monkeypatch)
    assert torch.equal(got, want)
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches):
        assert torch.equal(gk, wk) and torch.equal(gv, wv)
    assert backends().get("decode_layer") == "gemm-fused (5 launches)", backends()


def test_fusion_needs_fused_projections(monkeypatch):
    """Without fuse_projections() (the runner fuses them on CUDA) the layer keeps the unfused path."""
    model = _model("qwen2", torch.float32)
    decode_step(model, fused=True, monkeypatch=monkeypatch)
    assert backends()["decode_layer"] == "unfused (9 launches: projections not fused)"
    model.fuse_projections()
    decode_step(model, fused=True, monkeypatch=monkeypatch)
    assert backends()["decode_layer"] == "gemm-fused (5 launches)"


# A model's decode step with a layer switch on against it off (``switch``: OPPO_DECODE_GEMM_FUSION or
# OPPO_DECODE_NORM_FOLD), logits and pages; on a CPU the switch's ``kernel_ops`` run interpreted.
MODEL_DECODE_CHECK = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, "tests")
    from oppo_runtime.ops import fused
    from test_decode_gemm_fusion import _model, decode_step

    class Env:                     # decode_step's monkeypatch, outside pytest
        def setenv(self, k, v):
            os.environ[k] = v

    dev, dtype, switch, kernel_ops = "{dev}", torch.{dtype}, "{switch}", {kernel_ops}
    if dev == "cpu":       # the interpreted kernels for the switch's ops
        choose = fused._choose
        fused._choose = lambda op, tensors, backend: choose(op, tensors, backend or (
            "triton" if op in kernel_ops else None))
    for family in {families}:
        model = _model(family, dtype, device=dev)
        model.fuse_projections()
        for B in ({batches}):
            outs = []
            for on in (False, True):
                os.environ[switch] = "1" if on else "0"      # (decode_step sets the GEMM fusion's itself)
                outs.append(decode_step(model, B=B, fused=on and switch == "OPPO_DECODE_GEMM_FUSION",
                                        monkeypatch=Env()))
            (want, want_caches), (got, got_caches) = outs
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < {tol}, (family, B, err)
            for (gk, gv), (wk, wv) in zip(got_caches, want_caches):
                for a, b in ((gk, wk), (gv, wv)):
                    e = ((a.float() - b.float()).norm() / b.float().norm()).item()
                    assert e < {tol}, (family, B, "pages", e)
    seen = fused.record_backend.__globals__["_seen"]
    assert seen[kernel_ops[0]] == "triton" and seen["decode_layer"] == "{layer}", seen
    print("ok")
""")
GEMM_FUSION_CHECK = dict(switch="OPPO_DECODE_GEMM_FUSION", kernel_ops=("norm_qkv_rotary", "norm_gate_up_silu"),
                         families=("qwen2", "llama-bias", "llama3-rope", "qwen3"), layer="gemm-fused (5 launches)")



def test_fused_decode_step_runs_the_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(MODEL_DECODE_CHECK.format(dev="cpu", dtype="float32", tol=1e-5, batches="1, 5", **GEMM_FUSION_CHECK),
              interpret=True)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float16", "torch.float32"])
def test_dual_gemm_kernels_equal_references_on_gpu(dtype):
    run_check(DUAL_CHECK.format(dev="cuda", dtypes=dtype + ",", half_tol=1e-2,
                                mlp_shapes="(896, 4864), (1536, 8960)", rows="1, 7, 64, 65, 257",
                                attn_shapes="(896, 64, 14, 2), (1536, 128, 12, 2), (2048, 128, 32, 8)"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("float16", 5e-3), ("float32", 1e-5)])
def test_fused_decode_step_matches_the_unfused_one_on_gpu(dtype, tol):
    run_check(MODEL_DECODE_CHECK.format(dev="cuda", dtype=dtype, tol=tol, batches="1, 5, 64, 200", **GEMM_FUSION_CHECK))


# the GPU engine tests' model (head_dim 64: the decode kernels and graphs) and 24 ragged prompts
ENGINE_CFG = dict(architectures=["Qwen2ForCausalLM"], vocab_size=512, hidden_size=512, intermediate_size=1024,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True)


def engine_prompts(n: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 512, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine_after_first_decode(dtype):
    """(engine, model) after the first decode step of engine_prompts()'s 24 sequences (greedy, after
    the eager prefill), in its decode graph of batch 24; the engine is built under the caller's
    switches and must capture its graphs."""
    from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams
    from oppo_runtime.memory import KVGeometry, PagePool
    m = build_model(ModelConfig.from_dict(ENGINE_CFG), seed=0, dtype=dtype, device="cuda").eval()
    geo = KVGeometry(*m.kv_geometry(), dtype)
    eng = ActorEngine(m, PagePool(400, PagePool.page_bytes_for([geo], 16), "cuda"),
                      EngineConfig(max_num_seqs=32, async_decode=False))
    assert eng.warmup() > 0 and eng.runner.use_graphs
    for p in engine_prompts():
        eng.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=8), target_len=8)
    while eng.stats["decode_steps"] == 0:
        eng.step()
    return eng, m


def engine_first_decode_hidden(dtype) -> torch.Tensor:
    """The engine's hidden states [24, H] (float32) after its first decode step (engine_after_first_decode)."""
    eng, _ = engine_after_first_decode(dtype)
    return eng.runner.graphs[24][1]["hidden"][:24].float().clone()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_decode_step_in_cuda_graphs_with_the_fused_layer(dtype, monkeypatch):
    """The fused decode layer captured in the engine's decode graphs: the first decode step of 24
    sequences (after the same eager prefill) gives the unfused engine's hidden states within the
    dtype's rounding, and each run logs the layer it ran."""
    from oppo_runtime import ops
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    hidden = []
    for fused in ("0", "1"):
        monkeypatch.setenv("OPPO_DECODE_GEMM_FUSION", fused)
        hidden.append(engine_first_decode_hidden(dtype))
        assert backends()["decode_layer"] == ("gemm-fused (5 launches)" if fused == "1" else "unfused (9 launches)")
    err = ((hidden[1] - hidden[0]).norm() / hidden[0].norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), err


def test_qkv_kernel_refuses_what_it_cannot_serve():
    """The model keeps the unfused decode layer on CUDA for these (the references sync: no graph)."""
    from oppo_runtime.ops.fused import qkv_kernel_refuses
    kc = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    assert qkv_kernel_refuses(torch.bfloat16, 64, 2, kc, kc.clone()) is None
    assert "head_dim 80" in qkv_kernel_refuses(torch.bfloat16, 80, 2, torch.zeros(4, 16, 2, 80), torch.zeros(4, 16, 2, 80))
    assert "head_dim 16" in qkv_kernel_refuses(torch.bfloat16, 16, 2, torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16))
    assert "dtype" in qkv_kernel_refuses(torch.float16, 64, 2, kc, kc.clone())
    head_major = torch.zeros(4, 2, 16, 64, dtype=torch.bfloat16).transpose(1, 2)     # [pages, 16, Hkv, D] view
    assert "layout" in qkv_kernel_refuses(torch.bfloat16, 64, 2, head_major, head_major.clone().transpose(1, 2))
