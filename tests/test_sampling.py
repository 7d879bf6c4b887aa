"""Sampling: the fused Triton kernel equals the reference (run by Triton's interpreter on the CPU,
on the GPU for real), the noise stream is what it claims (a defined function of (seed, key,
position, column), uniform, without visible correlation), and the reference's distribution is
the one it claims."""
import math
import textwrap

import pytest
import torch

from _scripts import run_check

from oppo_runtime.ops import hash_uniform, process_logits, sample_tokens

# Cases: (B, V, dtype): V not a multiple of the kernel's 4096-column block, V below one block, V odd
# (bf16 then takes the plain path, even V the uint32-pair path); in every case a NaN row, a +inf row,
# a row half -inf, a greedy row whose maximum is tied 2 or 3 times (first index wins), temperatures 1, 0.7, 0, 1.3;
# the default splits (3 in the interpreter) and 1 split. Tokens must be identical; the behaviour
# log-probs within 1e-4 (they are within ~3e-6 in practice).
CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops import sampling_triton
    from oppo_runtime.ops.sampling import sample_tokens
    dev = "{dev}"
    for B, V, dtype in {cases}:
        g = torch.Generator().manual_seed(V)
        logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
        logits[3, 17] = float("nan")
        logits[4, V // 3] = float("inf")
        logits[5, : V // 2] = float("-inf")
        tied = [1, V - 2] + ([1 + 4096] if V > 4097 else [])     # other tile slots, and the same slot a block on
        logits[6, tied] = (logits[6].float().max() + 1).to(dtype)
        logits = logits.to(dev)
        temp = torch.tensor([1.0, 0.7, 0.0, 1.3] * (B // 4), device=dev)
        keys = torch.arange(B, device=dev) * 7919 + 5
        pos = torch.arange(B, device=dev) + 100
        zk, op = torch.zeros(B, dtype=torch.long, device=dev), torch.ones(B, device=dev)
        for seed in (1, 1234):
            t2, l2, b2 = sample_tokens(logits, temp, zk, op, seed, keys, pos, needs_filter=False, backend="reference")
            assert int(t2[6]) == 1 and b2[3] and b2[4] and not b2[5]
            for splits in (None, 1):
                t1, l1, b1 = sampling_triton.gumbel_sample(logits, temp, seed, keys, pos, splits=splits)
                ok = ~b2
                assert torch.equal(b1.cpu(), b2.cpu()), (b1, b2)
                assert torch.equal(t1[ok].cpu(), t2[ok].cpu()), (B, V, dtype, seed, splits, t1, t2)
                assert ((t1 >= 0) & (t1 < V)).all()
                assert torch.allclose(l1[ok].cpu(), l2[ok].cpu(), atol=1e-4), (l1 - l2).abs().max()
    print("ok")
""")
CPU_CASES = "[(12, 5000, torch.float32), (12, 5000, torch.bfloat16), (8, 1000, torch.bfloat16), (8, 4097, torch.bfloat16)]"
GPU_CASES = ("[(12, 5000, torch.{dtype}), (8, 1000, torch.{dtype}), (8, 4097, torch.{dtype}), "
             "(256, 151936, torch.{dtype})]")


def test_triton_sampler_equals_reference_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(CHECK.format(dev="cpu", cases=CPU_CASES), interpret=True, timeout=600)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_sampler_equals_reference_on_gpu(dtype):
    run_check(CHECK.format(dev="cuda", cases=GPU_CASES.format(dtype=dtype)), timeout=600)


# The kernel's exponential noise E = -log2(u) against float64, relative error. In the interpreter the
# logs are numpy's (the polynomial near u = 1 is what is checked); on the GPU, MUFU lg2.approx, over
# all 2^23 values of u (its absolute error near 1 is why the polynomial is there).
NOISE = textwrap.dedent("""
    import torch
    from oppo_runtime.ops import sampling_triton
    k = {k}
    e = sampling_triton.neg_log2_uniform(k.to("{dev}")).cpu().double()
    want = -torch.log2((2 * k.double() + 1) / 2 ** 24)
    rel = (e / want - 1).abs()
    assert (e > 0).all() and rel.max() < {bound}, (rel.max(), k[rel.argmax()])
    print("ok")
""")


def test_kernel_noise_is_minus_log2_u_in_the_interpreter():
    pytest.importorskip("triton")
    k = "torch.cat([torch.arange(2**23 - 2**19, 2**23), torch.arange(0, 2**23, 97)])"   # u > 15/16, and a comb
    run_check(NOISE.format(k=k, dev="cpu", bound=3e-7), interpret=True, timeout=600)


@pytest.mark.gpu
def test_kernel_noise_is_minus_log2_u_on_gpu():
    run_check(NOISE.format(k="torch.arange(2**23)", dev="cuda", bound=3e-6), timeout=600)


def _mix32(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_noise_stream_definition():
    """hash_uniform is this function of (seed, key, position, column), written out with Python ints (the
    kernel and the CPU path must both follow it: changing it changes every sampled token)."""
    def u(seed, key, pos, col):
        row = _mix32(_mix32((key * 0x9E3779B1 + seed) & 0xFFFFFFFF) ^ ((pos * 0x7FEB352D) & 0xFFFFFFFF))
        colmix = (((col >> 12) * 0x7FEB352D) << 12) & 0xFFFFFFFF ^ ((col & 4095) * 0x9E3779B1) & 0xFFFFFFFF
        return (2 * (_mix32(row ^ colmix) >> 9) + 1) / 2 ** 24
    keys, pos = torch.tensor([5, 7924, 123456789]), torch.tensor([100, 0, 70000])
    got = hash_uniform(1234, keys, pos, 151936)
    for r in range(3):
        for col in (0, 1, 4095, 4096, 4097, 151935):
            assert got[r, col].item() == u(1234, int(keys[r]), int(pos[r]), col), (r, col)


def test_noise_stream_is_uniform_and_uncorrelated():
    """The uniforms of 16 consecutive positions of one sequence and of 16 sequences at one position, over
    a Qwen-size vocabulary (2 x 2.4M values): range, mean, histogram, KS, correlation and a 2-D serial
    test between neighbouring columns, positions and sequences, and every one of the 23 random bits,
    alone and flipped between neighbours, against 5 sigma (about 5.5 for the maxima over 23 bits).
    A stream without the finaliser fails most of these, one with half a finaliser the bit flips
    between neighbouring positions (z = 8.5)."""
    V = 151936
    for keys, pos in ((torch.full((16,), 12345), torch.arange(16) + 7),
                      (torch.arange(16) * 7919 + 5, torch.full((16,), 300))):
        u = hash_uniform(3, keys, pos, V)
        k = ((u.double() * 2 ** 24 - 1) / 2).round().long()
        assert torch.equal(((2 * k + 1).double() / 2 ** 24).float(), u)          # u = (2k + 1) / 2^24 exactly
        assert u.min() >= 2 ** -24 and u.max() <= 1 - 2 ** -24
        u = u.double()
        n = u.numel()
        assert abs(u.mean().item() - 0.5) * math.sqrt(12 * n) < 5
        hist = torch.histc(u, 1024, 0, 1)
        chi = ((hist - n / 1024) ** 2 / (n / 1024)).sum().item()
        assert abs(chi - 1023) / math.sqrt(2 * 1023) < 5, chi        # too regular fails too (a Weyl sequence)
        srt = u.flatten().sort().values
        assert (torch.arange(1, n + 1, dtype=torch.float64) / n - srt).abs().max().item() * math.sqrt(n) < 2.0
        for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:]), (u[:, :-4096], u[:, 4096:])):
            a, b = a - a.mean(), b - b.mean()
            r = (a * b).mean().item() / math.sqrt((a * a).mean().item() * (b * b).mean().item())
            assert abs(r) * math.sqrt(a.numel()) < 5, r
            ia, ib = ((a + 0.5) * 32).long().clamp(0, 31), ((b + 0.5) * 32).long().clamp(0, 31)
            h2 = torch.bincount((ia * 32 + ib).flatten(), minlength=1024).double()
            chi2 = ((h2 - ia.numel() / 1024) ** 2 / (ia.numel() / 1024)).sum().item()
            assert abs(chi2 - 1023) / math.sqrt(2 * 1023) < 5, chi2
        for bit in range(23):
            x = (k >> bit) & 1
            for d in (x.double(), (x[:, 1:] != x[:, :-1]).double(), (x[1:] != x[:-1]).double()):
                assert abs(d.mean().item() - 0.5) * 2 * math.sqrt(d.numel()) < 5.5, bit


def test_reference_gumbel_sampler_follows_softmax():
    """No filtering: the frequencies of 40000 draws (one per sequence key) over 40 tokens against
    softmax(x / t), chi-square within 5 sigma."""
    V, n = 40, 40000
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 2
    temp = torch.tensor([0.9])
    toks, lps, bad = sample_tokens(x.expand(n, V), temp.expand(n), None, None, 11, torch.arange(n),
                                   torch.full((n,), 5), needs_filter=False)
    p = torch.softmax(x[0] / 0.9, -1).double()
    f = torch.bincount(toks, minlength=V).double()
    chi = ((f - n * p) ** 2 / (n * p)).sum().item()
    assert abs(chi - (V - 1)) / math.sqrt(2 * (V - 1)) < 5, chi
    assert not bad.any()
    torch.testing.assert_close(lps, torch.log(p.float())[toks], atol=1e-5, rtol=0)


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
