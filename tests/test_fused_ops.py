"""Fused inference ops (add+RMSNorm, rotary q/k, silu*mul) and fused projections.

CPU: each reference equals the unfused autograd math bit for bit; the Triton kernels equal their
references under Triton's interpreter (a subprocess with TRITON_INTERPRET=1); a model's inference
path (fused ops, fused QKV / gate_up) equals its autograd path; fused projections survive
optimizer updates, ``.to()``, save/load. GPU (``-m gpu``): each Triton kernel against its
reference over the shapes of real models, outputs poisoned with NaN first.
"""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from oppo_runtime.models import DenseContext, ModelConfig, PagedContext, build_model, load_model, save_model
from oppo_runtime.models.transformer import rotary_inv_freq
from oppo_runtime.ops import MissingKernelError, apply_rotary, backends, rms_norm, rotary_cos_sin
from oppo_runtime.ops.fused import fused_add_rms_norm, rotary_cos_sin_cache, rotary_qk, silu_mul, silu_mul_ref

from _scripts import run_check  # noqa: E402
from test_models import LLAMA3_ROPE, TINY  # noqa: E402  (the same tiny shapes as the model tests)
FAMILIES = {
    "llama-bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32)),
}


# ----------------------------------------------------------------------------- references == unfused math
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_add_rms_norm_reference_is_the_residual_add_then_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    h, x = (torch.randn(9, 96, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    summed = h + x                                        # the layer's ``h = h + sublayer(...)``
    normed, residual = fused_add_rms_norm(x, h, w, 1e-6)
    assert torch.equal(residual, summed) and torch.equal(normed, rms_norm(summed, w, 1e-6))
    normed, residual = fused_add_rms_norm(x, None, w, 1e-6)
    assert residual is x and torch.equal(normed, rms_norm(x, w, 1e-6))
    assert backends()["fused_add_rms_norm"] == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE])
def test_rotary_reference_equals_apply_rotary_with_cos_sin_per_position(dtype, rope):
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **TINY,
                                    **({"rope_scaling": rope} if rope else {})})
    inv = rotary_inv_freq(config)
    cache = rotary_cos_sin_cache(inv, 4096, "cpu")
    g = torch.Generator().manual_seed(1)
    for n in (1, 5, 64):
        pos = torch.randint(0, 4096, (n,), generator=g)
        qkv = torch.randn(n, 8 * 16, generator=g).to(dtype)
        q, k = qkv[:, :4 * 16].view(n, 4, 16), qkv[:, 4 * 16:6 * 16].view(n, 2, 16)   # strided views
        cos, sin = rotary_cos_sin(pos, inv)
        got_q, got_k = rotary_qk(q, k, cache, pos)
        assert torch.equal(got_q, apply_rotary(q, cos, sin)) and torch.equal(got_k, apply_rotary(k, cos, sin))
        wq, wk = (1 + 0.1 * torch.randn(16, generator=g)).to(dtype), (1 + 0.1 * torch.randn(16, generator=g)).to(dtype)
        got_q, got_k = rotary_qk(q, k, cache, pos, wq, wk, 1e-6)
        assert torch.equal(got_q, apply_rotary(rms_norm(q, wq, 1e-6), cos, sin))
        assert torch.equal(got_k, apply_rotary(rms_norm(k, wk, 1e-6), cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_reference_is_silu_of_gate_times_up(dtype):
    g = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(7, 40, generator=g).to(dtype) for _ in range(2))
    assert torch.equal(silu_mul(torch.cat([gate, up], -1)), F.silu(gate) * up)


def test_kernel_requested_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8)
    with pytest.raises(MissingKernelError, match="fused_add_rms_norm"):
        fused_add_rms_norm(x, None, torch.ones(8), 1e-6, backend="triton")
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        silu_mul(x.double(), backend="triton")
    monkeypatch.setenv("OPPO_REQUIRE_KERNELS", "1")      # applies to CUDA tensors only: CPU keeps the reference
    assert torch.equal(silu_mul(x), silu_mul_ref(x))


# ----------------------------------------------------------------------------- Triton kernels (interpreter)
KERNEL_CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops import fused
    dev = "{dev}"
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    def poison():   # the caching allocator hands this NaN memory to the op's outputs
        if dev == "cuda":
            del_me = torch.full((1 << 24,), float("nan"), device=dev)
            del del_me

    def close(a, b, dtype, what, exact=False):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
        assert not torch.isnan(a).any(), (what, "NaN in the output")
        if exact:
            assert torch.equal(a, b), (what, (a.float() - b.float()).abs().max())
        tol = {{torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: {bf16_tol}}}[dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=what)

    # exact: bf16/fp16 rotary and the residual sums round like torch. The interpreter truncates when
    # it rounds to bf16 (the GPU rounds to nearest even): its bf16 results get a looser tolerance
    exact = dev == "cuda"
    for dtype in ({dtypes}):
        for H in ({hiddens}):
            for N in ({rows}):
                x, h = randn(N, H, dtype=dtype), randn(N, H, dtype=dtype, scale=4.0)
                w = randn(H, dtype=dtype, scale=0.1) + 1
                for res in (None, h):
                    poison()
                    got = fused.fused_add_rms_norm(x, res, w, 1e-6, backend="triton")
                    want = fused.fused_add_rms_norm_ref(x, res, w, 1e-6)
                    close(got[1], want[1], dtype, f"residual {{dtype}} H={{H}} N={{N}}", exact=exact)
                    close(got[0], want[0], dtype, f"add_rms_norm {{dtype}} H={{H}} N={{N}} res={{res is not None}}")
            inter = H * 2 + 64
            for N in ({rows}):
                gu = randn(N, 2 * inter, dtype=dtype, scale=3.0)
                poison()
                close(fused.silu_mul(gu, backend="triton"), fused.silu_mul_ref(gu), dtype, f"silu_mul {{dtype}} I={{inter}} N={{N}}")
        for D in ({head_dims}):
            inv = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))
            cache = fused.rotary_cos_sin_cache(inv, 40000, dev)
            for Hq, Hkv in ({heads}):
                for N in ({rows}):
                    qkv = randn(N, (Hq + 2 * Hkv) * D, dtype=dtype)
                    q = qkv[:, :Hq * D].view(N, Hq, D)
                    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(N, Hkv, D)
                    pos = torch.randint(0, 40000, (N,), generator=g).to(dev)
                    for norm in (False, True):
                        wq = randn(D, dtype=dtype, scale=0.1) + 1 if norm else None
                        wk = randn(D, dtype=dtype, scale=0.1) + 1 if norm else None
                        poison()
                        got = fused.rotary_qk(q, k, cache, pos, wq, wk, 1e-6, backend="triton")
                        want = fused.rotary_qk_ref(q, k, cache, pos, wq, wk, 1e-6)
                        what = f"rotary {{dtype}} D={{D}} Hq={{Hq}} Hkv={{Hkv}} N={{N}} norm={{norm}}"
                        # not bit-exact on the GPU: the kernel rounds x*cos + rot*sin once, in float32
                        # (fused_triton._rope_pair); torch rounds each product to the dtype first (1 ulp)
                        close(got[0], want[0], dtype, "q " + what)
                        close(got[1], want[1], dtype, "k " + what)
                        assert got[0].is_contiguous() and got[1].is_contiguous()
                        # with the K/V append fused: pages of 4 tokens in a pool whose page stride is
                        # twice a page (K and V interleaved), shuffled slots, some -1 (skipped)
                        v = qkv[:, (Hq + Hkv) * D:].view(N, Hkv, D)
                        nblk, bs = N + 3, 4
                        pool = randn(nblk, 2 * bs * Hkv * D, dtype=dtype, scale=50.0)
                        shape, stride = (nblk, bs, Hkv, D), (2 * bs * Hkv * D, Hkv * D, D, 1)
                        kc, vc = pool.as_strided(shape, stride, 0), pool.as_strided(shape, stride, bs * Hkv * D)
                        slots = torch.randperm(nblk * bs, generator=g)[:N].to(dev)
                        slots[::3] = -1
                        want_pool = pool.clone()
                        wkc, wvc = want_pool.as_strided(shape, stride, 0), want_pool.as_strided(shape, stride, bs * Hkv * D)
                        got = fused.rotary_qk(q, k, cache, pos, wq, wk, 1e-6, backend="triton", kv=(v, kc, vc, slots))
                        want = fused.rotary_qk_ref(q, k, cache, pos, wq, wk, 1e-6)
                        __import__("oppo_runtime").ops.attention.kv_append_ref(want[1], v, wkc, wvc, slots)
                        close(got[1], want[1], dtype, "k (kv fused) " + what)
                        close(pool, want_pool, dtype, "pages (kv fused) " + what)
    assert all(fused_backend == "triton" for op, fused_backend in __import__("oppo_runtime").ops.backends().items()
               if op in ("fused_add_rms_norm", "rotary_qk", "silu_mul")), __import__("oppo_runtime").ops.backends()
    assert __import__("oppo_runtime").ops.backends().get("rotary_qk+kv_append") == "one kernel"
    print("ok")
""")


def test_triton_kernels_equal_references_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(KERNEL_CHECK.format(dev="cpu", dtypes="torch.float32, torch.float16, torch.bfloat16",
                             hiddens="96, 896", rows="1, 5", head_dims="64, 128", heads="(14, 2), (4, 4)",
                             bf16_tol=6e-2),
         interpret=True)


MODEL_CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops import fused
    from oppo_runtime.models import DenseContext, ModelConfig, PagedContext, build_model
    dev, dtype = "{dev}", torch.{dtype}
    if dev == "cpu":       # force the kernels (interpreted) for every fused op
        choose = fused._choose
        fused._choose = lambda op, tensors, backend: choose(op, tensors, backend or "triton")
    TINY = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)
    for arch, extra in [("Qwen2ForCausalLM", {{}}), ("Qwen3ForCausalLM", {{"head_dim": 128}}),
                        ("LlamaForCausalLM", {{"attention_bias": True, "mlp_bias": True}})]:
        model = build_model(ModelConfig.from_dict({{"architectures": [arch], **TINY, **extra}}), seed=3,
                            dtype=dtype, device=dev)
        L, Hkv, D = model.kv_geometry()
        n = 11
        ids = torch.randint(1, 128, (n,), device=dev)
        pos = torch.arange(n, device=dev)

        def paged():
            caches = [(torch.zeros(4, 4, Hkv, D, dtype=dtype, device=dev),
                       torch.zeros(4, 4, Hkv, D, dtype=dtype, device=dev)) for _ in range(L)]
            ctx = PagedContext(caches, torch.arange(n, device=dev), torch.arange(4, dtype=torch.int32, device=dev)[None],
                               torch.tensor([n], dtype=torch.int32, device=dev),
                               torch.tensor([0, n], dtype=torch.int32, device=dev), n, False)
            with torch.inference_mode():
                return model.compute_logits(model(ids, pos, ctx))

        with torch.no_grad():   # DenseContext: the autograd path's math
            want = model.compute_logits(model(ids, pos, DenseContext(torch.tensor([0, n], dtype=torch.int32, device=dev))))
        unfused = paged()
        model.fuse_projections()
        got = paged()
        err = ((unfused.float() - want.float()).norm() / want.float().norm()).item()
        assert err < {tol}, (arch, "unfused projections", err)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < {tol}, (arch, err)
    print("ok")
""")


def test_model_inference_path_runs_the_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(MODEL_CHECK.format(dev="cpu", dtype="float32", tol=1e-5), interpret=True)


# ----------------------------------------------------------------------------- the model's inference path
def _model(family, dtype=torch.float32, seed=3):
    arch, extra = FAMILIES[family]
    model = build_model(ModelConfig.from_dict({"architectures": [arch], **TINY, **extra}), seed=seed, dtype=dtype)
    with torch.no_grad():     # norms and biases away from 1 and 0: every weight matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(dtype) * 0.05)
    return model


def _paged_logits(model, n=13, grad=False, seed=5):
    L, Hkv, D = model.kv_geometry()
    g = torch.Generator().manual_seed(seed)
    ids, pos = torch.randint(1, 128, (n,), generator=g), torch.arange(n)
    caches = [(torch.zeros(4, 4, Hkv, D, dtype=model.dtype), torch.zeros(4, 4, Hkv, D, dtype=model.dtype))
              for _ in range(L)]
    ctx = PagedContext(caches, torch.arange(n), torch.arange(4, dtype=torch.int32)[None],
                       torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32), n, False)
    with torch.set_grad_enabled(grad):
        return model.compute_logits(model(ids, pos, ctx)).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_inference_path_equals_autograd_path_bit_for_bit_on_cpu(family, dtype):
    model = _model(family, dtype)
    autograd = _paged_logits(model, grad=True)
    assert torch.equal(_paged_logits(model), autograd)
    model.fuse_projections()
    assert torch.equal(_paged_logits(model), autograd)
    assert torch.equal(_paged_logits(model, grad=True), autograd)


def test_fusing_keeps_names_shapes_and_the_parameter_objects():
    model = _model("llama-bias")
    before = [(n, p.shape, id(p)) for n, p in model.named_parameters()]
    keys = list(model.state_dict())
    model.fuse_projections()
    assert [(n, p.shape, id(p)) for n, p in model.named_parameters()] == before
    assert list(model.state_dict()) == keys
    attn = model.model.layers[0].self_attn
    q_rows = attn.q_proj.weight.shape[0]
    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    assert torch.equal(attn.qkv.weight[q_rows:q_rows + attn.k_proj.weight.shape[0]], attn.k_proj.weight)
    assert torch.equal(attn.qkv.bias[:q_rows], attn.q_proj.bias)


def test_optimizer_updates_of_named_parameters_reach_the_fused_weights():
    model, twin = _model("qwen3"), _model("qwen3")
    model.fuse_projections()
    for m in (model, twin):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        cu = torch.tensor([0, 6, 13], dtype=torch.int32)
        ids = torch.randint(1, 128, (13,), generator=torch.Generator().manual_seed(9))
        pos = torch.cat([torch.arange(6), torch.arange(7)])
        m.compute_logprobs(m(ids, pos, DenseContext(cu)), ids).mean().backward()
        opt.step()
        m.eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(1.5)           # an in-place update by name
        twin.model.layers[1].self_attn.q_proj.weight.mul_(1.5)
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)
        twin.model.layers[0].mlp.up_proj.weight.add_(0.01)
    assert torch.equal(_paged_logits(model), _paged_logits(twin))


def test_update_weights_style_copy_reaches_the_fused_weights():
    model, other = _model("llama-bias", seed=3), _model("llama-bias", seed=4)
    model.fuse_projections()
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for k, v in other.state_dict().items():
            params[k].copy_(v)
    assert torch.equal(_paged_logits(model), _paged_logits(other))


def test_fused_model_saves_and_reloads(tmp_path):
    model = _model("qwen2")
    model.fuse_projections()
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert torch.equal(_paged_logits(again), _paged_logits(model))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_to_after_fusing_fuses_again():
    model = _model("llama-bias")
    model.fuse_projections()
    model.to(torch.float64)
    attn = model.model.layers[0].self_attn
    assert attn.qkv.weight.dtype == torch.float64 and attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    # float64: the CPU GEMM of the concatenated weight may round differently from the separate ones
    torch.testing.assert_close(_paged_logits(model), _paged_logits(model, grad=True), rtol=1e-12, atol=1e-12)


def test_fusing_again_keeps_intact_fused_weights():
    model = _model("qwen2")
    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv, gate_up = attn.qkv.weight, mlp.gate_up.weight
    model.fuse_projections()                   # e.g. a second engine on the same model
    assert attn.qkv.weight is qkv and mlp.gate_up.weight is gate_up


def test_parameters_replaced_after_fusing_are_refused():
    model = _model("qwen2")
    model.fuse_projections()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    with pytest.raises(RuntimeError, match="fuse_projections"):
        _paged_logits(model)
    model.fuse_projections()
    assert torch.equal(_paged_logits(model), _paged_logits(model, grad=True))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float16", "torch.float32"])
def test_triton_kernels_equal_references_on_gpu(dtype):
    run_check(KERNEL_CHECK.format(dev="cuda", dtypes=dtype + ",", hiddens="896, 1536, 4096", rows="1, 7, 64, 257",
                             head_dims="64, 128", heads="(14, 2), (32, 8)", bf16_tol=1.6e-2), interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("float16", 5e-3), ("float32", 1e-5)])
def test_model_inference_path_with_kernels_matches_autograd_path_on_gpu(dtype, tol):
    run_check(MODEL_CHECK.format(dev="cuda", dtype=dtype, tol=tol), interpret=False)
