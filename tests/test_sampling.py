"""Sampling: the fused Triton kernel equals the reference (run by Triton's interpreter on the CPU,
on the GPU for real), and the reference's distribution is the one it claims."""
import textwrap

import pytest
import torch

from _scripts import run_check

from oppo_runtime.ops import process_logits, sample_tokens

CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops import sampling_triton
    from oppo_runtime.ops.sampling import sample_tokens
    dev = "{dev}"
    g = torch.Generator().manual_seed(0)
    B, V = 12, 5000
    logits = (torch.randn(B, V, generator=g) * 3).to(dev, torch.{dtype})
    logits[3, 17] = float("nan")
    temp = torch.tensor([1.0, 0.7, 0.0, 1.3] * 3, device=dev)
    keys = torch.arange(B, device=dev) * 7919 + 5
    pos = torch.arange(B, device=dev) + 100
    zk, op = torch.zeros(B, dtype=torch.long, device=dev), torch.ones(B, device=dev)
    for seed in (1, 1234):
        t1, l1, b1 = sampling_triton.gumbel_sample(logits, temp, seed, keys, pos)
        t2, l2, b2 = sample_tokens(logits, temp, zk, op, seed, keys, pos, needs_filter=False, backend="reference")
        ok = ~b2
        assert torch.equal(b1.cpu(), b2.cpu()), (b1, b2)
        assert torch.equal(t1[ok].cpu(), t2[ok].cpu()), (t1, t2)
        assert torch.allclose(l1[ok].cpu(), l2[ok].cpu(), atol=1e-4), (l1 - l2).abs().max()
    print("ok")
""")


def test_triton_sampler_equals_reference_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(CHECK.format(dev="cpu", dtype="float32"), interpret=True, timeout=600)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_sampler_equals_reference_on_gpu(dtype):
    run_check(CHECK.format(dev="cuda", dtype=dtype), timeout=600)


def test_reference_sampler_follows_the_processed_distribution():
    V = 6
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temp, top_k, top_p = torch.tensor([0.8]), torch.tensor([4]), torch.tensor([0.9])
    n = 20000
    toks, lps, bad = sample_tokens(logits.expand(n, V), temp.expand(n), top_k.expand(n), top_p.expand(n), 3,
                                   torch.arange(n), torch.zeros(n, dtype=torch.long))
    want = process_logits(logits, temp, top_k, top_p).exp()[0]
    freq = torch.bincount(toks, minlength=V).float() / n
    assert torch.allclose(freq, want, atol=0.015), (freq, want)
    assert not bad.any()
    torch.testing.assert_close(lps, want.log()[toks], atol=1e-5, rtol=0)
