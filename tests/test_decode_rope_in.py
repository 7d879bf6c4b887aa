"""``OPPO_DECODE_ROPE_IN=1``: a decode layer's rotary and K/V append as the decode attention kernel's
prologue (``ops.attention.paged_decode_attention_rope``; the kernel's ``kRope`` form), one launch a
layer fewer.

CPU: the op's reference against the rotation, append and attention done by hand; the model's decode
step bit for bit with and without the switch, and what it logs (Qwen3's q_norm/k_norm keep the
rotary kernel); what the CUDA kernel refuses and the argument errors. GPU (``-m gpu``): the kernel
against the rotary kernel + attention kernel (pages bit for bit, output equal) in
tests/test_attention_gpu.py; below, the engine's model one decode step eagerly (each layer's pages,
then the logits, bit for bit) and the engine's decode graphs. Both paths rotate in one form
(ops/fused_triton.py _rope_pair), which is what makes bit-equality the contract.
"""
import pytest
import torch

from oppo_runtime.ops import attention as A
from oppo_runtime.ops import backends
from oppo_runtime.ops.fused import rotary_cos_sin_cache

from test_decode_gemm_fusion import _model, decode_step, engine_first_decode_hidden, ragged_decode_pages  # noqa: E402


def _case(B=5, Hq=8, Hkv=2, D=64, bs=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lens, tables, nblk, pos, slots = ragged_decode_pages(B, bs, g, spare=3)
    slots[1] = -1                                           # a row the step does not write
    kc = torch.randn(nblk, bs, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(nblk, bs, Hkv, D, generator=g).to(dtype)
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cache = rotary_cos_sin_cache(inv, 64, "cpu")
    return qkv, kc, vc, tables, lens.to(torch.int32), pos, slots, cache


def test_the_reference_rotates_appends_and_attends():
    Hq, Hkv, D = 8, 2, 64
    qkv, kc, vc, tables, lens, pos, slots, cache = _case(Hq=Hq, Hkv=Hkv, D=D)
    kc0, vc0 = kc.clone(), vc.clone()
    out = A.paged_decode_attention_rope(qkv, Hq, kc, vc, tables, lens, 0.125, cache, pos, slots)
    # by hand: half-split rotation at each position, rows written at the slots, attention over the pages
    B = qkv.shape[0]
    x = qkv.view(B, Hq + 2 * Hkv, D)
    c, s = cache[pos, :D // 2], cache[pos, D // 2:]
    cos, sin = torch.cat((c, c), -1)[:, None], torch.cat((s, s), -1)[:, None]

    def rot(t):
        return t * cos + torch.cat((-t[..., D // 2:], t[..., :D // 2]), -1) * sin

    q, k, v = rot(x[:, :Hq]), rot(x[:, Hq:Hq + Hkv]), x[:, Hq + Hkv:]
    for b in range(B):
        if slots[b] >= 0:
            kc0[slots[b] // 4, slots[b] % 4], vc0[slots[b] // 4, slots[b] % 4] = k[b], v[b]
    torch.testing.assert_close(kc, kc0, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc, vc0)
    want = A.paged_decode_attention_ref(q, kc0, vc0, tables, lens, 0.125)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "llama3-rope", "qwen3"])
def test_decode_step_is_the_same_with_the_rope_in_the_attention(family, monkeypatch):
    model = _model(family, torch.float32)
    model.fuse_projections()
    monkeypatch.setenv("OPPO_DECODE_ROPE_IN", "0")
    want, want_caches = decode_step(model, monkeypatch=monkeypatch)
    monkeypatch.setenv("OPPO_DECODE_ROPE_IN", "1")
    got, got_caches = decode_step(model, monkeypatch=monkeypatch)
    assert torch.equal(got, want)
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches):
        assert torch.equal(gk, wk) and torch.equal(gv, wv)
    if family == "qwen3":
        assert backends()["decode_rope"] == "rotary kernel (not in the attention: q_norm/k_norm)"
    else:
        assert backends()["decode_rope"] == "in the attention"


def test_the_switch_and_the_arguments(monkeypatch):
    monkeypatch.setenv("OPPO_DECODE_ROPE_IN", "2")
    with pytest.raises(ValueError, match="OPPO_DECODE_ROPE_IN"):
        A.decode_rope_in()
    qkv, kc, vc, tables, lens, pos, slots, cache = _case()
    with pytest.raises(ValueError, match="qkv must be"):
        A.paged_decode_attention_rope(qkv[:, 1:], 8, kc, vc, tables, lens, 0.1, cache, pos, slots)
    with pytest.raises(ValueError, match="positions and slot_mapping"):
        A.paged_decode_attention_rope(qkv, 8, kc, vc, tables, lens, 0.1, cache, pos[1:], slots)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        A.paged_decode_attention_rope(qkv, 8, kc, vc, tables, lens, 0.1, cache.double(), pos, slots)


def test_what_the_kernel_refuses(monkeypatch):
    for name in ("OPPO_DECODE_PLAN", "OPPO_DECODE_REG_STAGE", "OPPO_DECODE_REFILL", "OPPO_DECODE_HEADS_AS_N"):
        monkeypatch.delenv(name, raising=False)
    refuses = A.paged_decode_attention_rope_refuses
    bf = torch.bfloat16
    qkv = torch.zeros(3, (14 + 4) * 64, dtype=bf)
    kc = torch.zeros(5, 16, 2, 64, dtype=bf)
    assert refuses(14, qkv, kc, kc.clone()) is None
    assert "float32" in refuses(14, qkv.float(), kc.float(), kc.float())
    assert "groups of 1-8" in refuses(18, torch.zeros(3, 22 * 64, dtype=bf), kc, kc.clone())
    head_major = torch.zeros(5, 2, 16, 64, dtype=bf).transpose(1, 2)
    assert "token-major" in refuses(14, qkv, head_major, head_major.clone().transpose(1, 2).transpose(1, 2))
    assert "rows are not contiguous" in refuses(14, torch.zeros(18 * 64, 3, dtype=bf).t(), kc, kc.clone())
    monkeypatch.setenv("OPPO_DECODE_PLAN", "v4")
    assert refuses(14, qkv, kc, kc.clone()) == "plan v4"
    monkeypatch.setenv("OPPO_DECODE_PLAN", "v7")
    monkeypatch.setenv("OPPO_DECODE_REFILL", "1")
    assert refuses(14, qkv, kc, kc.clone()) == "OPPO_DECODE_REFILL"


@pytest.mark.gpu
def test_engine_decode_graphs_with_the_rope_in_the_attention(monkeypatch):
    """The engine's decode graphs captured with the rotary in the attention: the first decode step of
    24 sequences gives the same hidden states bit for bit as with the rotary kernel (the prologue
    rounds as that kernel does), and the run logs where the rotary ran."""
    from oppo_runtime import ops
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    hidden = []
    for on in ("0", "1"):
        monkeypatch.setenv("OPPO_DECODE_ROPE_IN", on)
        hidden.append(engine_first_decode_hidden(torch.bfloat16))
        if on == "1":
            assert ops.backends()["decode_rope"] == "in the attention"
    assert torch.isfinite(hidden[0]).all()
    assert torch.equal(hidden[1], hidden[0]), _where_they_differ(hidden[1], hidden[0])


def _where_they_differ(got: torch.Tensor, want: torch.Tensor) -> str:
    """A failure message that says how two tensors differ: how many elements, the largest difference
    and the first differing element's index and values (the first thing to read on a mismatch)."""
    bad = (got != want) & ~(got.isnan() & want.isnan())
    if not bad.any():
        return "equal"
    idx = tuple(int(i) for i in bad.nonzero()[0])
    diff = (got.float() - want.float()).abs()[bad]
    return (f"{int(bad.sum())} of {bad.numel()} elements differ, largest {float(diff.max()):.3g}, first at {idx}: "
            f"{float(got[idx])} against {float(want[idx])}")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [5, 24])
def test_engine_model_decode_step_eagerly_with_the_rope_in_the_attention(monkeypatch, B):
    """The engine test's model (head dim 64, 4 query heads a kv head, QKV bias) on the GPU in bf16, one
    decode step eagerly (no graph) over shuffled pages with ragged contexts, with and without the
    rotary in the attention: each layer's K/V pages bit for bit, then the logits (the engine test's
    graphs add nothing this leaves out but the capture)."""
    from oppo_runtime import ops
    from oppo_runtime.models import ModelConfig, build_model
    from test_decode_gemm_fusion import ENGINE_CFG
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    model = build_model(ModelConfig.from_dict(ENGINE_CFG), seed=0, dtype=torch.bfloat16, device="cuda").eval()
    model.fuse_projections()
    monkeypatch.setenv("OPPO_DECODE_ROPE_IN", "0")
    want, want_caches = decode_step(model, B=B, bs=16, monkeypatch=monkeypatch)
    monkeypatch.setenv("OPPO_DECODE_ROPE_IN", "1")
    got, got_caches = decode_step(model, B=B, bs=16, monkeypatch=monkeypatch)
    assert backends()["decode_rope"] == "in the attention"
    for layer, ((gk, gv), (wk, wv)) in enumerate(zip(got_caches, want_caches)):
        assert torch.equal(gk, wk), f"layer {layer} K pages: " + _where_they_differ(gk, wk)
        assert torch.equal(gv, wv), f"layer {layer} V pages: " + _where_they_differ(gv, wv)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want), "logits: " + _where_they_differ(got, want)
