"""Training fused ops (RMSNorm, silu*up, rotary; forward and backward) against their torch references:
in Triton's interpreter on the CPU, and on the GPU for real."""
import textwrap

import pytest
import torch

from _scripts import run_check

CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops.train_fused import rms_norm_train, silu_mul_train, silu_mul_ref
    from oppo_runtime.ops.norm_rope import rms_norm
    dev, dtype = "{dev}", torch.{dtype}
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    def both(fn_k, fn_r, inputs, dy):
        outs = []
        for fn in (fn_k, fn_r):
            xs = [t.detach().clone().requires_grad_(True) for t in inputs]
            y = fn(*xs)
            y.backward(dy)
            outs.append((y.detach(), [x.grad for x in xs]))
        return outs

    g = torch.Generator().manual_seed(0)
    for N, H in ((1, 8), (37, 96), (130, 200), (0, 64)):
        x = (torch.randn(N, H, generator=g) * 3).to(dev, dtype)
        w = (torch.randn(H, generator=g) + 1).to(dev, dtype)
        dy = torch.randn(N, H, generator=g).to(dev, dtype)
        (yk, gk), (yr, gr) = both(lambda a, b: rms_norm_train(a, b, 1e-6, backend="triton"),
                                  lambda a, b: rms_norm(a, b, 1e-6), [x, w], dy)
        if N:
            assert rel(yk, yr) < tol, ("rms y", N, H, rel(yk, yr))
            assert rel(gk[0], gr[0]) < 2 * tol, ("rms dx", N, H, rel(gk[0], gr[0]))
            assert rel(gk[1], gr[1]) < 2 * tol, ("rms dw", N, H, rel(gk[1], gr[1]))
        else:
            assert yk.shape == (0, H) and float(gk[1].abs().sum()) == 0
        # 3-D input (q/k norm over heads)
        if N:
            x3 = x.view(N, 1, H)
            (yk, gk), (yr, gr) = both(lambda a, b: rms_norm_train(a, b, 1e-6, backend="triton"),
                                      lambda a, b: rms_norm(a, b, 1e-6), [x3, w], dy.view(N, 1, H))
            assert yk.shape == (N, 1, H) and rel(gk[0], gr[0]) < 2 * tol
    for shape in ((5, 7), (64, 300), (3, 4097)):
        a = (torch.randn(*shape, generator=g) * 4).to(dev, dtype)
        b = torch.randn(*shape, generator=g).to(dev, dtype)
        dy = torch.randn(*shape, generator=g).to(dev, dtype)
        (yk, gk), (yr, gr) = both(lambda p, q: silu_mul_train(p, q, backend="triton"), silu_mul_ref, [a, b], dy)
        assert rel(yk, yr) < tol, ("silu y", shape, rel(yk, yr))
        assert rel(gk[0], gr[0]) < 2 * tol and rel(gk[1], gr[1]) < 2 * tol, ("silu grads", shape)
    from oppo_runtime.ops.train_fused import rotary_train, rotary_train_ref
    from oppo_runtime.ops.norm_rope import rotary_cos_sin
    for N, HQ, HK, D in ((1, 4, 1, 8), (23, 14, 2, 64), (9, 7, 7, 128), (0, 4, 2, 16)):
        pos = torch.randint(0, 5000, (N,), generator=g).to(dev)
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        cos, sin = rotary_cos_sin(pos, inv.to(dev))
        wide = torch.randn(N, HQ + 2 * HK, D, generator=g).to(dev, dtype)     # q and k as views of one buffer
        q, k = wide[:, :HQ], wide[:, HQ:HQ + HK]
        dq, dk = torch.randn(N, HQ, D, generator=g).to(dev, dtype), torch.randn(N, HK, D, generator=g).to(dev, dtype)
        outs = []
        for fn in (lambda a, b: rotary_train(a, b, cos, sin, backend="triton"), lambda a, b: rotary_train_ref(a, b, cos, sin)):
            a, b = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
            ya, yb = fn(a, b)
            torch.autograd.backward([ya, yb], [dq, dk])
            outs.append((ya.detach(), yb.detach(), a.grad, b.grad))
        (qk_, kk_, gqk, gkk), (qr, kr, gqr, gkr) = outs
        assert qk_.shape == (N, HQ, D) and kk_.shape == (N, HK, D) and qk_.dtype == dtype
        if N:
            for name, a, b in (("q", qk_, qr), ("k", kk_, kr), ("dq", gqk, gqr), ("dk", gkk, gkr)):
                assert rel(a, b) < tol, ("rotary " + name, N, HQ, HK, D, rel(a, b))
        # only q used downstream: k's gradient is zero, q's still right
        a, b = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
        ya, _ = rotary_train(a, b, cos, sin, backend="triton")
        ya.backward(dq)
        assert float(b.grad.abs().sum()) == 0 and (not N or rel(a.grad, gqr) < tol)
    print("ok")
""")


def test_training_fused_ops_equal_references_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(CHECK.format(dev="cpu", dtype="float32"), interpret=True, timeout=900)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_fused_ops_equal_references_on_gpu(dtype):
    run_check(CHECK.format(dev="cuda", dtype=dtype), timeout=600)


def test_cpu_tensors_take_the_reference_path_bit_for_bit():
    from oppo_runtime.ops.norm_rope import rms_norm
    from oppo_runtime.ops.train_fused import rms_norm_train, silu_mul_ref, silu_mul_train
    x, w = torch.randn(4, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert torch.equal(rms_norm_train(x, w, 1e-6), rms_norm(x, w, 1e-6))
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(silu_mul_train(a, b), silu_mul_ref(a, b))
    with pytest.raises(ValueError, match="silu_mul_train: gate"):
        silu_mul_train(a, b[:, :4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_training_step_with_fused_ops_matches_the_reference_path(monkeypatch):
    """A tiny Qwen2 in bf16: loss and every parameter's gradient with the training kernels equal
    those of the torch references (OPPO_OP_BACKEND=reference) within bf16 tolerance."""
    from oppo_runtime.models import DenseContext, ModelConfig, build_model
    cfg = ModelConfig.from_dict(dict(architectures=["Qwen2ForCausalLM"], vocab_size=96, hidden_size=64,
                                     intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                                     rms_norm_eps=1e-6, tie_word_embeddings=False))
    lens = [5, 33, 17]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (sum(lens),), generator=g).cuda()
    pos = torch.cat([torch.arange(n) for n in lens]).cuda()
    cu = torch.tensor([0, 5, 38, 55], dtype=torch.int32).cuda()
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("OPPO_OP_BACKEND", backend)
        model = build_model(cfg, "causal_lm", dtype=torch.bfloat16, device="cuda", seed=3)
        h = model(ids, pos, DenseContext(cu, max_seqlen=max(lens)))
        lp, ent = model.compute_token_logprobs(h, ids.roll(-1), with_entropy=True)
        loss = -(lp.mean() + 0.1 * ent.mean())
        loss.backward()
        results[backend] = (float(loss), {n: p.grad.float() for n, p in model.named_parameters()})
    (la, ga), (lb, gb) = results["triton"], results["reference"]
    assert abs(la - lb) < 2e-2 * abs(lb) + 1e-3
    for n in gb:
        err = float((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-12))
        assert err < 5e-2, (n, err)
