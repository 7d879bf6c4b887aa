"""``ops.logprobs.linear_token_logprobs`` (LM head -> token log-prob and entropy in one autograd op)
against the reference composition ``log_softmax(F.linear(h, W).float() / T)`` under autograd:
values and gradients w.r.t. hidden and weight through both outputs, over chunk boundaries,
temperatures, dtypes, frozen weight, non-contiguous hidden, autocast; that no [N, V] tensor is
saved for backward; and ``CausalLM.compute_token_logprobs`` against ``token_logprobs`` of
``compute_logits`` on a tiny model (tied and untied head, all parameters' gradients).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oppo_runtime.models import DenseContext, ModelConfig, build_model
from oppo_runtime.ops import entropy_from_logits, token_logprobs
from oppo_runtime.ops.logprobs import linear_token_logprobs

from test_models import LENGTHS, TINY, ragged_batch  # noqa: E402  (the model tests' tiny shapes)

V, H = 97, 24
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def reference(hidden, weight, tokens, temperature):
    """The composition the fused op replaces, in plain autograd (logits saved for backward)."""
    z = F.linear(hidden, weight)
    z = (z.double() if z.dtype == torch.float64 else z.float()) / temperature
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(-1, tokens[:, None].long())[:, 0], -(logp.exp() * logp).sum(-1)


def inputs(n, dtype, seed=0, weight_grad=True, hidden_grad=True):
    g = torch.Generator().manual_seed(seed)
    # logits of order 1-5: a peaked but not one-hot softmax, so every term of the gradient matters
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(hidden_grad)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(weight_grad)
    tokens = torch.randint(0, V, (n,), generator=g)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_ent = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, tokens, g_lp, g_ent


def grads(outs, g_lp, g_ent, leaves):
    """d(sum g_lp * lp + sum g_ent * ent) / d leaves (None for a leaf that needs no grad)."""
    loss = (outs[0] * g_lp.to(outs[0].dtype)).sum()
    if outs[1] is not None:
        loss = loss + (outs[1] * g_ent.to(outs[1].dtype)).sum()
    needs = [x for x in leaves if x.requires_grad]
    got = iter(torch.autograd.grad(loss, needs, allow_unused=False)) if loss.requires_grad else iter([])
    return [next(got) if x.requires_grad else None for x in leaves]


def assert_near(got, ref, tol):
    """Elementwise, relative to the reference's largest magnitude (gradients have entries near 0)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * max(scale, 1e-30))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, chunk_rows", [(0, None), (1, None), (7, None), (7, 3), (50, 16), (50, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_values_and_grads_equal_reference(dtype, n, chunk_rows, temperature, with_entropy, weight_grad):
    tol = TOL[dtype]
    hidden, weight, tokens, g_lp, g_ent = inputs(n, dtype, seed=n, weight_grad=weight_grad)
    lp, ent = linear_token_logprobs(hidden, weight, tokens, temperature, with_entropy=with_entropy,
                                    chunk_rows=chunk_rows)
    ref_lp, ref_ent = reference(hidden, weight, tokens, temperature)
    assert_near(lp, ref_lp, tol)
    if with_entropy:
        assert_near(ent, ref_ent, tol)
    else:
        assert ent is None
        ref_ent = None
    got = grads((lp, ent), g_lp, g_ent, [hidden, weight])
    if n == 0:   # the reference is not connected to the graph at N = 0; ours gives zero gradients
        assert got[0].shape == (0, H) and (weight_grad is False or (got[1] == 0).all())
        return
    want = grads((ref_lp, ref_ent), g_lp, g_ent, [hidden, weight])
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.abs().max() > 0
            assert_near(a, b, tol)
    assert got[1] is None if not weight_grad else got[1].dtype == dtype


def test_entropy_gradient_is_not_dropped():
    """Only the entropy has an upstream gradient: the op must not treat it as a constant."""
    hidden, weight, tokens, _, g_ent = inputs(9, torch.float64, seed=5)
    _, ent = linear_token_logprobs(hidden, weight, tokens, 0.7, with_entropy=True, chunk_rows=4)
    gh, gw = torch.autograd.grad((ent * g_ent).sum(), [hidden, weight])
    _, ref_ent = reference(hidden, weight, tokens, 0.7)
    rh, rw = torch.autograd.grad((ref_ent * g_ent).sum(), [hidden, weight])
    assert rh.abs().max() > 1e-3
    assert_near(gh, rh, 1e-10)
    assert_near(gw, rw, 1e-10)


def test_hidden_without_grad_and_non_contiguous_hidden():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(H, 2 * 23, generator=g, dtype=torch.float64)
    hidden = big.t()[::2]                        # [23, H], strides (2, 46): neither row- nor column-major
    assert hidden.shape == (23, H) and not hidden.is_contiguous()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (23,), generator=g, dtype=torch.int32)
    lp, ent = linear_token_logprobs(hidden, weight, tokens, 1.3, with_entropy=True, chunk_rows=5)
    ref_lp, ref_ent = reference(hidden, weight, tokens, 1.3)
    assert_near(lp, ref_lp, 1e-10)
    assert_near(ent, ref_ent, 1e-10)
    (gw,) = torch.autograd.grad(lp.sum() - 0.3 * ent.sum(), [weight])
    (rw,) = torch.autograd.grad(ref_lp.sum() - 0.3 * ref_ent.sum(), [weight])
    assert_near(gw, rw, 1e-10)


def test_values_equal_the_existing_ops():
    hidden, weight, tokens, _, _ = inputs(11, torch.float64, seed=2)
    with torch.no_grad():
        lp, ent = linear_token_logprobs(hidden, weight, tokens, 0.7, with_entropy=True, chunk_rows=4)
        logits = F.linear(hidden, weight)
        assert_near(lp, token_logprobs(logits, tokens, 0.7), 1e-12)
        assert_near(ent, entropy_from_logits(logits, 0.7), 1e-12)
    assert not lp.requires_grad and not ent.requires_grad and lp.grad_fn is None


def test_no_logits_are_saved_for_backward():
    n = 40
    hidden, weight, tokens, _, _ = inputs(n, torch.float32, seed=3)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref = reference(hidden, weight, tokens, 0.7)
    assert max(saved) >= n * V        # the hook sees the reference's logits: the check can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = linear_token_logprobs(hidden, weight, tokens, 0.7, with_entropy=True, chunk_rows=8)
    assert saved and max(saved) == V * H      # hidden, weight, tokens, lse, entropy: nothing [N, V]
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad is not None and weight.grad is not None
    assert_near(lp, ref[0], 1e-5)


def test_bfloat16_inputs_and_cpu_autocast():
    """bf16: GEMM in bf16, softmax math in float32, grads back in bf16; fp32 params under autocast."""
    hidden, weight, tokens, g_lp, g_ent = inputs(30, torch.bfloat16, seed=4)
    lp, ent = linear_token_logprobs(hidden, weight, tokens, 0.7, with_entropy=True, chunk_rows=7)
    ref = reference(hidden, weight, tokens, 0.7)
    assert lp.dtype == ent.dtype == torch.float32
    assert_near(lp, ref[0], 1e-5)             # the same bf16 logits, upcast: float32 math only
    assert_near(ent, ref[1], 1e-5)
    got = grads((lp, ent), g_lp, g_ent, [hidden, weight])
    want = grads(ref, g_lp, g_ent, [hidden, weight])
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert_near(a.float(), b.float(), 3e-2)

    hidden, weight, tokens, g_lp, g_ent = inputs(30, torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = linear_token_logprobs(hidden, weight, tokens, 0.7, with_entropy=True, chunk_rows=7)
        ref = reference(hidden, weight, tokens, 0.7)
    assert_near(lp, ref[0], 1e-5)             # autocast's bf16 GEMM, not a float32 one
    assert (lp - reference(hidden, weight, tokens, 0.7)[0]).abs().max() > 1e-4
    got = grads((lp, ent), g_lp, g_ent, [hidden, weight])
    want = grads(ref, g_lp, g_ent, [hidden, weight])
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert_near(a, b, 3e-2)


def test_bad_arguments():
    hidden, weight, tokens, _, _ = inputs(4, torch.float32)
    with pytest.raises(ValueError):
        linear_token_logprobs(hidden, weight, tokens[:3])
    with pytest.raises(ValueError):
        linear_token_logprobs(hidden, weight[:, :5], tokens)
    with pytest.raises(ValueError):
        linear_token_logprobs(hidden, weight, tokens, chunk_rows=0)
    with pytest.raises(TypeError):
        linear_token_logprobs(hidden.double(), weight, tokens)


# ----------------------------------------------------------------------------- the model method
@pytest.mark.parametrize("tied", [False, True])
def test_model_method_equals_logprobs_of_logits(tied):
    config = ModelConfig.from_dict({"architectures": ["Qwen3ForCausalLM"], **TINY, "tie_word_embeddings": tied})
    model = build_model(config, seed=3).double()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _, _, packed, positions, cu = ragged_batch(LENGTHS)
    targets = torch.roll(packed, -1)
    g = torch.Generator().manual_seed(0)
    g_lp, g_ent = torch.randn(len(packed), generator=g, dtype=torch.float64), torch.randn(
        len(packed), generator=g, dtype=torch.float64)
    params = [p for p in model.parameters()]

    def run(fused):
        hidden = model(packed, positions, DenseContext(cu))
        if fused:
            lp, ent = model.compute_token_logprobs(hidden, targets, 0.7, with_entropy=True, chunk_rows=5)
        else:
            logits = model.compute_logits(hidden)
            lp, ent = token_logprobs(logits, targets, 0.7), entropy_from_logits(logits, 0.7)
        return lp, ent, torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), params)

    lp, ent, got = run(True)
    ref_lp, ref_ent, want = run(False)
    assert lp.dtype == torch.float64
    assert_near(lp, ref_lp, 1e-10)
    assert_near(ent, ref_ent, 1e-10)
    for p, a, b in zip(params, got, want):
        assert_near(a, b, 1e-9)
    lp2, ent2 = model.compute_token_logprobs(model(packed, positions, DenseContext(cu)), targets, 0.7)
    assert ent2 is None
    assert_near(lp2, ref_lp, 1e-10)


def test_model_method_with_a_head_bias_falls_back_to_the_reference():
    model = build_model(ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **TINY}), seed=3).double()
    model.lm_head.bias = nn.Parameter(torch.linspace(-2, 2, TINY["vocab_size"], dtype=torch.float64))
    _, _, packed, positions, cu = ragged_batch(LENGTHS)
    with torch.no_grad():
        hidden = model(packed, positions, DenseContext(cu))
        lp, ent = model.compute_token_logprobs(hidden, packed, with_entropy=True)
        logits = model.compute_logits(hidden)
    assert_near(lp, token_logprobs(logits, packed), 1e-12)
    assert_near(ent, entropy_from_logits(logits), 1e-12)
    no_bias = linear_token_logprobs(hidden, model.lm_head.weight.detach(), packed)[0]
    assert (lp - no_bias).abs().max() > 1e-3   # the bias matters: the fallback is what made it right


# ----------------------------------------------------------------------------- Triton kernels
# The kernel path (ops.logprobs_triton: log-sum-exp / log-prob / entropy in one pass over the
# logits, and the logits' gradient in place) against the torch reference path of the same ops, on
# the same inputs: forward values and both gradients, ragged row counts, chunk boundaries, V not a
# multiple of the kernel's block, temperatures, an out-of-range token (NaN, not a wild read),
# logits with -inf entries, and the plain token_logprobs / entropy_from_logits on strided rows.
KERNEL_CHECK = r"""
import math, torch
from oppo_runtime.ops.logprobs import linear_token_logprobs, token_logprobs, entropy_from_logits
dev, dt = "{dev}", getattr(torch, "{dtype}")
if dev == "cpu":   # one thread: the grad and no-grad calls below must agree bit for bit, and a CPU
    torch.set_num_threads(1)   # BLAS free to pick its thread count per call (MKL_DYNAMIC) need not
tol = dict(rtol=2e-5, atol=2e-5) if dt == torch.float32 else dict(rtol=2e-2, atol=2e-2)
g = torch.Generator().manual_seed(0)
for (N, V, H, rows, T, ent) in [(5, 4500, 24, None, 1.0, True), (9, 2048, 16, 4, 0.7, True),
                                 (3, 97, 8, 2, 1.3, False), (1, 3000, 8, None, 1.0, True), (0, 50, 8, None, 1.0, True)]:
    h0 = (torch.randn(N, H, generator=g) * 2).to(dt).to(dev)
    w0 = (torch.randn(V, H, generator=g) * 0.5).to(dt).to(dev)
    tok = torch.randint(0, V, (N,), generator=g).to(dev)
    glp, gent = torch.randn(N, generator=g).to(dev), torch.randn(N, generator=g).to(dev)
    res = {{}}
    for be in ("reference", "triton"):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        lp, en = linear_token_logprobs(h, w, tok, T, ent, chunk_rows=rows, backend=be)
        loss = (lp * glp).sum() + ((en * gent).sum() if ent else 0)
        if N:
            loss.backward()
        res[be] = (lp.detach(), None if en is None else en.detach(), h.grad, w.grad)
        with torch.no_grad():
            lp2, en2 = linear_token_logprobs(h0, w0, tok, T, ent, chunk_rows=rows, backend=be)
        torch.testing.assert_close(lp2, lp.detach(), rtol=0, atol=0)
    for a, b, what in zip(res["triton"], res["reference"], ("logprobs", "entropy", "grad hidden", "grad weight")):
        if b is None:
            assert a is None, what
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, what
        scale = max(b.abs().max().item(), 1e-6) if b.numel() else 1.0
        torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: what + ": " + m)
# plain logits: strided rows (a column slice of a wider buffer), -inf entries, a bad token
z = torch.randn(6, 2600, generator=g).to(dt).to(dev)
wide = torch.full((6, 2700), 7.0, dtype=dt, device=dev)
wide[:, :2600] = z
wide[2, 5:900] = float("-inf")
zs = wide[:, :2600]
assert zs.stride(0) == 2700
tok = torch.randint(0, 2600, (6,), generator=g).to(dev)
tok[2] = 3
for T in (1.0, 0.6):
    torch.testing.assert_close(token_logprobs(zs, tok, T, backend="triton"), token_logprobs(zs, tok, T, backend="reference"), **tol)
    torch.testing.assert_close(entropy_from_logits(zs, T, backend="triton"), entropy_from_logits(zs, T, backend="reference"), **tol)
bad = tok.clone(); bad[4] = 2600
out = token_logprobs(zs, bad, 1.0, backend="triton")
assert math.isnan(out[4].item()) and torch.isfinite(out[torch.arange(6, device=dev) != 4]).all()
print("ok")
"""


def test_logprob_kernels_equal_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    from _scripts import run_check
    run_check(KERNEL_CHECK.format(dev="cpu", dtype="float32"), interpret=True, timeout=900)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprob_kernels_equal_the_reference_on_gpu(dtype):
    from _scripts import run_check
    run_check(KERNEL_CHECK.format(dev="cuda", dtype=dtype), timeout=600)
