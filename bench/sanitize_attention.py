"""Tiny calls of each attention kernel, for compute-sanitizer (memcheck, racecheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_attention.py

Covers kv_append, decode with one split and with several (plus the reduction), a context of 0,
a group of 20 heads (two head chunks), and prefill with prefix 0, chunk 1 and a ragged batch.
Exits non-zero if an output differs from the reference.
"""
import math
import sys

import torch

from oppo_runtime.ops import attention as A


def pool(nblocks, bs, Hkv, D, dtype=torch.bfloat16):
    one = bs * Hkv * D
    p = torch.randn(nblocks, 2 * one + 8, device="cuda").to(dtype)   # page stride > one page of K
    shape, stride = (nblocks, bs, Hkv, D), (2 * one + 8, Hkv * D, D, 1)
    return p.as_strided(shape, stride, 0), p.as_strided(shape, stride, one)


def tables(lens, bs, nblocks):
    perm = torch.randperm(nblocks, device="cuda").to(torch.int32)
    width = max(math.ceil(n / bs) for n in lens) + 1
    bt = torch.full((len(lens), width), -1, dtype=torch.int32, device="cuda")
    at = 0
    for b, n in enumerate(lens):
        k = math.ceil(n / bs)
        bt[b, :k] = perm[at:at + k]
        at += k
    return bt


def check(name, out, ref, tol=3e-3):
    err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    ok = bool(torch.isfinite(out).all()) and err < tol
    print(f"{name}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def main():
    torch.manual_seed(0)
    ok = True
    bs, D = 16, 128
    k, v = pool(40, bs, 2, D)
    key, value = torch.randn(30, 2, D, device="cuda").bfloat16(), torch.randn(30, 2, D, device="cuda").bfloat16()
    slots = torch.randperm(40 * bs, device="cuda")[:30].to(torch.int32)
    slots[::7] = -1
    A.kv_append(key, value, k, v, slots, backend="cuda")
    for lens, Hq, Hkv in (([37, 0, 5], 8, 2), ([600], 40, 2)):
        kk, vv = pool(60, bs, Hkv, D)
        bt = tables([max(n, 1) for n in lens], bs, 60)
        ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = torch.randn(len(lens), Hq, D, device="cuda").bfloat16()
        out = torch.empty(len(lens), Hq, D, device="cuda")
        A.paged_decode_attention(q, kk, vv, bt, ctx, 0.1, out=out, backend="cuda")
        ref = A.paged_decode_attention_ref(q, kk, vv, bt.clamp_min(0), ctx, 0.1, out=torch.empty_like(out))
        ok &= check(f"decode lens={lens} Hq={Hq}", out, ref)
    prefixes, chunks = [0, 20, 3], [1, 70, 17]
    lens = [p + c for p, c in zip(prefixes, chunks)]
    kk, vv = pool(30, bs, 2, 64)
    bt = tables(lens, bs, 30)
    cu = torch.tensor([0, 1, 71, 88], dtype=torch.int32, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(88, 14, 64, device="cuda").bfloat16()
    out = torch.empty(88, 14, 64, device="cuda")
    A.paged_prefill_attention(q, kk, vv, cu, ctx, bt, 0.125, out=out, max_seqlen_q=70, backend="cuda")
    ref = A.paged_prefill_attention_ref(q, kk, vv, cu, ctx, bt.clamp_min(0), 0.125, out=torch.empty_like(out))
    ok &= check("prefill ragged G=7 D=64", out, ref)
    torch.cuda.synchronize()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
