"""Tiny calls of each attention kernel, for compute-sanitizer (memcheck, racecheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_attention.py

Covers kv_append, decode with one split and with several (plus the reduction), a context of 0,
a group of 20 heads (two head chunks), the no-split plan of a batch that fills the machine (D=64,
3-stage pipeline, contexts at tile edges), D=64 splits of exactly 4 tiles, the v2 plan, and
prefill with prefix 0, chunk 1 and a ragged batch (the mma plan, and on sm_90 the wgmma plans,
OPPO_PREFILL_PLAN=wgmma, wgmma_pp_ov, wgmma_pp_ov_ps, wgmma_pp_ov_kv, wgmma_kv, the wgmma3, _qp and _xc plans: the mbarrier rings over several tiles, D=64 and 128). The v4 plan (OPPO_DECODE_PLAN=v4, one kernel):
the same decode cases, plus a persistent grid with several short items per CTA (the tile stream
crosses items; D=64 and D=128) and the split cases with the ticket counters in the workspace
(OPPO_DECODE_TICKETS=memset). racecheck covers the shared-memory reuse (merge area in a pipeline
slot, tile-record ring); the tickets' global-memory ordering is not something it checks (the GPU
tests do, by results). v5 (OPPO_DECODE_PLAN=v5): the v4 kernel with items claimed from a counter,
split and not, run twice on the same counters. v6: the v3 kernel with 2 stages at D=128. v7: the
v3 kernel with each group's splits merged by its last CTA (tickets as v4's), run twice.
--decode-only: kv_append and decode only; --prefill-plans=a,b: kv_append, the mma prefill case and those
wgmma prefill plans' cases only (no decode);
--decode-plans=v5,v4:memset: only the decode cases of those plans (v7 for the default, the cases without a plan; v3:stamps,
v3:pdl, v3:l2off, v3:l2, v3:l2x2: per-CTA stamps on, programmatic dependent launch, L2 prefetch of 0,
1 (the default) or 2 tiles; v7:rf: the stages refilled early, OPPO_DECODE_REFILL=1; v7:sm: the slow
split merge, OPPO_DECODE_FAST_MERGE=0; v7:rs, v3:rs: the register-staged loader, OPPO_DECODE_REG_STAGE=1;
v7:hn, v3:hn: the heads as the mma's N, OPPO_DECODE_HEADS_AS_N=1; v7:rope, v3:rope: the rotary and
K/V append as the prologue, paged_decode_attention_rope). Exits
non-zero if an output differs from the reference.
"""
import contextlib
import math
import os
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


def prefill_plan_check(name, plan, Hq, Hkv, D, prefixes, chunks, scale, bs=16, spare_blocks=4):
    """One ragged prefill batch (bf16, shuffled pages, NaN-poisoned output) under
    OPPO_PREFILL_PLAN=plan against the fp32 reference; True if it passes ``check``."""
    lens = [p + c for p, c in zip(prefixes, chunks)]
    nblk = sum(math.ceil(n / bs) for n in lens) + spare_blocks
    kk, vv = pool(nblk, bs, Hkv, D)
    bt = tables(lens, bs, nblk)
    cu = torch.tensor([0] + torch.tensor(chunks).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(chunks), Hq, D, device="cuda").bfloat16()
    out = torch.full((sum(chunks), Hq, D), float("nan"), device="cuda")
    old = os.environ.get("OPPO_PREFILL_PLAN")
    os.environ["OPPO_PREFILL_PLAN"] = plan
    try:
        A.paged_prefill_attention(q, kk, vv, cu, ctx, bt, scale, out=out, max_seqlen_q=max(chunks), backend="cuda")
    finally:
        if old is None:
            os.environ.pop("OPPO_PREFILL_PLAN", None)
        else:
            os.environ["OPPO_PREFILL_PLAN"] = old
    ref = A.paged_prefill_attention_ref(q, kk, vv, cu, ctx, bt.clamp_min(0), scale, out=torch.empty_like(out))
    torch.cuda.synchronize()
    return check(name, out, ref)


def rope_check(name, lens, Hq, Hkv, D, plan, bs=16):
    """paged_decode_attention_rope (the rotary + K/V append prologue, OPPO_DECODE_ROPE_IN) on fresh
    pages against its reference on a copy: output and pages."""
    from oppo_runtime.ops.fused import rotary_cos_sin_cache
    B = len(lens)
    nblk = sum(math.ceil(max(n, 1) / bs) for n in lens) + 4
    kk, vv = pool(nblk, bs, Hkv, D)
    bt = tables([max(n, 1) for n in lens], bs, nblk)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    pos = (ctx.long() - 1).clamp_min(0)
    slots = bt[torch.arange(B, device="cuda"), pos // bs].long() * bs + pos % bs
    slots[ctx == 0] = -1
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, device="cuda").bfloat16()
    cache = rotary_cos_sin_cache(1.0 / (1e4 ** (torch.arange(0, D, 2).float() / D)), 8192, "cuda")
    kr, vr = kk.clone(), vv.clone()
    out = torch.full((B, Hq, D), float("nan"), device="cuda")
    os.environ["OPPO_DECODE_PLAN"] = plan
    A.paged_decode_attention_rope(qkv, Hq, kk, vv, bt, ctx, 0.1, cache, pos, slots, out=out, backend="cuda")
    os.environ.pop("OPPO_DECODE_PLAN", None)
    ref = A.paged_decode_attention_rope(qkv, Hq, kr, vr, bt.clamp_min(0), ctx, 0.1, cache, pos, slots,
                                        out=torch.empty_like(out), backend="reference")
    ok = check(f"{name} out", out, ref)
    return ok & check(f"{name} pages", torch.cat((kk.flatten(), vv.flatten())), torch.cat((kr.flatten(), vr.flatten())),
                      tol=1e-2)


def main():
    torch.manual_seed(0)
    ok = True
    bs, D = 16, 128
    k, v = pool(40, bs, 2, D)
    key, value = torch.randn(30, 2, D, device="cuda").bfloat16(), torch.randn(30, 2, D, device="cuda").bfloat16()
    slots = torch.randperm(40 * bs, device="cuda")[:30].to(torch.int32)
    slots[::7] = -1
    A.kv_append(key, value, k, v, slots, backend="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    edges = [1, 63, 64, 65, 129, 0, 192, 193, 256, 257]
    fill = [edges[i % len(edges)] for i in range(math.ceil(3 * sms / 2))]    # B * Hkv > half of 4 per SM: 1 split
    # v4 persistent: B * Hkv = 7 x SMs: 2-3 items per CTA for D=64 (3 CTAs per SM), 3-4 for D=128 (2)
    many = [edges[(3 * i) % len(edges)] for i in range(math.ceil(7 * sms / 2))]
    splits = [7000, 100, 0, 3000, 6999, 1, 64, 65]
    cases = (([37, 0, 5], 8, 2, D, None), ([600], 40, 2, D, None), (fill, 14, 2, 64, None),
             (splits, 14, 2, 64, None),                   # the default plan (v7): 5-tile splits, empty ones
             (splits, 14, 2, 64, "v2"),
             ([37, 0, 5], 8, 2, D, "v4"), ([600], 40, 2, D, "v4"), (fill, 14, 2, 64, "v4"),
             (splits, 14, 2, 64, "v4"), (splits, 8, 2, D, "v4"), (many, 14, 2, 64, "v4"), (many, 8, 2, D, "v4"),
             (splits, 14, 2, 64, "v4:memset"), ([600], 40, 2, D, "v4:memset"),
             # v5: items claimed from a counter (split and not, empty splits skipped by the claimer)
             ([37, 0, 5], 8, 2, D, "v5"), (splits, 14, 2, 64, "v5"), (splits, 8, 2, D, "v5"),
             (many, 14, 2, 64, "v5"), (many, 8, 2, D, "v5"), (splits, 14, 2, 64, "v5:memset"),
             # v6: the split kernel with 2 stages at D=128 (3 CTAs per SM)
             ([37, 0, 5], 8, 2, D, "v6"), ([600], 40, 2, D, "v6"), (splits, 8, 2, D, "v6"),
             # per-CTA stamps on, with room for 3 CTAs of the grid (the rest must write nothing)
             (splits, 14, 2, 64, "v3:stamps"), (splits, 8, 2, D, "v6:stamps"),
             # programmatic dependent launch of the split kernel and its reduction
             (splits, 14, 2, 64, "v3:pdl"), (splits, 8, 2, D, "v6:pdl"), (fill, 14, 2, 64, "v3:pdl"),
             # L2 prefetch of the tile after those in flight (the default; rows past a context are not
             # prefetched), of none, and of two tiles
             (splits, 14, 2, 64, "v3:l2off"), ([600], 40, 2, D, "v3:l2off"), (splits, 14, 2, 64, "v3:l2"),
             (splits, 8, 2, D, "v6:l2"), ([37, 0, 5], 8, 2, D, "v3:l2"),
             (splits, 14, 2, 64, "v3:l2x2"), (splits, 8, 2, D, "v6:l2x2"), ([600], 40, 2, D, "v3:l2x2"),
             # v7: v3's split kernel, each group's splits merged by its last CTA (tickets from the
             # launcher's pool or in the workspace); contexts of 0 and within split 0 included
             # (the first four cases, plan None, run it too)
             (splits, 8, 2, D, "v7"), (splits, 14, 2, 64, "v3"), ([600], 40, 2, D, "v3"),
             ([600], 40, 2, D, "v7:memset"), (splits, 14, 2, 64, "v7:memset"),
             # the stages refilled early (OPPO_DECODE_REFILL=1): split, ragged with empty and
             # short contexts, both head dims
             (splits, 8, 2, D, "v7:rf"), ([37, 0, 5], 8, 2, D, "v7:rf"), (splits, 14, 2, 64, "v7:rf"),
             # the slow merge (OPPO_DECODE_FAST_MERGE=0: two fences, 16-split batches at D=128); the
             # fast one (acq_rel ticket, 32-split batches) is the default, in the v7 cases above
             (splits, 8, 2, D, "v7:sm"), ([37, 0, 5], 8, 2, D, "v7:sm"), (splits, 14, 2, 64, "v7:sm"),
             # the register-staged loader (OPPO_DECODE_REG_STAGE=1, head dim 128): split, ragged
             # with empty and short contexts, v3's unmerged splits
             (splits, 8, 2, 128, "v7:rs"), ([37, 0, 5, 200], 8, 2, 128, "v7:rs"), (splits, 32, 8, 128, "v3:rs"),
             # the heads as the mma's N (OPPO_DECODE_HEADS_AS_N=1, groups of <= 8 heads): split, ragged
             # with empty and short contexts, both head dims, v3's unmerged splits
             (splits, 8, 2, 128, "v7:hn"), ([37, 0, 5, 200], 14, 2, 64, "v7:hn"), (splits, 14, 2, 64, "v7:hn"),
             (splits, 32, 8, 128, "v3:hn"),
             # the rotary and K/V append as the prologue (OPPO_DECODE_ROPE_IN; paged_decode_attention_rope):
             # split with empty contexts, ragged short ones, both head dims, v3's unmerged splits
             (splits, 8, 2, 128, "v7:rope"), ([37, 0, 5, 200], 14, 2, 64, "v7:rope"), (splits, 14, 2, 64, "v3:rope"))
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--decode-plans=")), None)
    only_prefill = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--prefill-plans=")), None)
    for lens, Hq, Hkv, Dd, plan in cases:
        if only_prefill is not None:
            break
        if only is not None and (plan or "v7") not in only and (plan or "v7").split(":")[0] not in only:
            continue
        nblk = sum(math.ceil(max(n, 1) / bs) for n in lens) + 4
        kk, vv = pool(nblk, bs, Hkv, Dd)
        bt = tables([max(n, 1) for n in lens], bs, nblk)
        ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = torch.randn(len(lens), Hq, Dd, device="cuda").bfloat16()
        out = torch.empty(len(lens), Hq, Dd, device="cuda")
        name, _, tickets = (plan or "v7").partition(":")
        if tickets == "rope":
            ok &= rope_check(f"decode rope B={len(lens)} max len={max(lens)} Hq={Hq} Hkv={Hkv} D={Dd} plan={name}",
                             lens, Hq, Hkv, Dd, name)
            continue
        resident = A.paged_decode_resident_ctas(Dd, plan=name)
        nsplit = A.paged_decode_plan(len(lens), Hq, Hkv, Dd, bt.shape[1] * bs, sms, resident, name)[0]
        ctas, per_cta = A.paged_decode_grid(len(lens), Hq, Hkv, Dd, bt.shape[1] * bs, sms, resident, name)
        os.environ["OPPO_DECODE_PLAN"] = name
        if tickets == "pdl":
            os.environ["OPPO_DECODE_PDL"] = "1"
        elif tickets == "rf":
            os.environ["OPPO_DECODE_REFILL"] = "1"
        elif tickets == "sm":
            os.environ["OPPO_DECODE_FAST_MERGE"] = "0"
        elif tickets == "rs":
            os.environ["OPPO_DECODE_REG_STAGE"] = "1"
        elif tickets == "hn":
            os.environ["OPPO_DECODE_HEADS_AS_N"] = "1"
        elif tickets in ("l2off", "l2", "l2x2"):
            os.environ["OPPO_DECODE_PREFETCH"] = {"l2off": "0", "l2": "1", "l2x2": "2"}[tickets]
        elif tickets and tickets != "stamps":
            os.environ["OPPO_DECODE_TICKETS"] = tickets
        with A.decode_cta_stamps(3) if tickets == "stamps" else contextlib.nullcontext():
            # v4/v7 split, v5: again, on the counters the first call left
            for _ in range(2 if (name in ("v4", "v7") and nsplit > 1) or name == "v5" else 1):
                out.fill_(float("nan"))
                A.paged_decode_attention(q, kk, vv, bt, ctx, 0.1, out=out, backend="cuda")
        os.environ.pop("OPPO_DECODE_PLAN", None)
        os.environ.pop("OPPO_DECODE_TICKETS", None)
        os.environ.pop("OPPO_DECODE_PDL", None)
        os.environ.pop("OPPO_DECODE_PREFETCH", None)
        os.environ.pop("OPPO_DECODE_REFILL", None)
        os.environ.pop("OPPO_DECODE_FAST_MERGE", None)
        os.environ.pop("OPPO_DECODE_REG_STAGE", None)
        os.environ.pop("OPPO_DECODE_HEADS_AS_N", None)
        ref = A.paged_decode_attention_ref(q, kk, vv, bt.clamp_min(0), ctx, 0.1, out=torch.empty_like(out))
        ok &= check(f"decode B={len(lens)} max len={max(lens)} Hq={Hq} Hkv={Hkv} D={Dd} plan={plan or 'v3'} "
                    f"splits={nsplit} ctas={ctas} items/cta<={per_cta}", out, ref)
    if "--decode-only" in sys.argv:
        sys.exit(0 if ok else 1)
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
    if A.prefill_wgmma_available():   # the sm_90a plans: mbarrier ring, ping-pong, both head dims, 3+ tiles
        for plan, Hq, Hkv, Dd, pre, chk in (("wgmma", 14, 2, 64, [0, 20, 3, 130], [1, 70, 17, 60]),
                                            ("wgmma", 8, 2, 128, [0, 200, 5], [3, 90, 140]),
                                            ("wgmma_pp_ov", 14, 2, 64, [0, 20, 3, 130], [1, 70, 17, 60]),
                                            ("wgmma_pp_ov", 8, 2, 128, [0, 200, 5], [3, 90, 140]),
                                            # K and V on separate barrier rings (plans _kv)
                                            ("wgmma_pp_ov_kv", 8, 2, 128, [0, 200, 5], [3, 90, 140]),
                                            ("wgmma_kv", 14, 2, 64, [0, 20, 3, 130], [1, 70, 17, 60]),
                                            # more items than SMs: persistent CTAs take several
                                            ("wgmma_pp_ov_ps", 8, 2, 64, [5 * i for i in range(40)],
                                             [300 if i % 3 == 0 else 1 + i for i in range(40)]),
                                            # three consumer warpgroups (192-row items, D=64)
                                            ("wgmma3_pp_ov", 14, 2, 64, [0, 20, 3, 130], [1, 70, 17, 60]),
                                            ("wgmma3_pp_ov_ps", 8, 2, 64, [5 * i for i in range(40)],
                                             [300 if i % 3 == 0 else 1 + i for i in range(40)]),
                                            # each item's Q rows prefetched into L2 by the producer
                                            ("wgmma_pp_ov_qp_ps", 8, 2, 128, [0, 200, 5], [3, 90, 140]),
                                            ("wgmma3_pp_ov_qp_ps", 8, 2, 64, [5 * i for i in range(40)],
                                             [300 if i % 3 == 0 else 1 + i for i in range(40)]),
                                            # the warpgroups' turns chained across a persistent CTA's items
                                            ("wgmma_pp_ov_qp_xc_ps", 8, 2, 64, [5 * i for i in range(40)],
                                             [300 if i % 3 == 0 else 1 + i for i in range(40)]),
                                            ("wgmma3_pp_ov_qp_xc_ps", 8, 2, 64, [5 * i for i in range(40)],
                                             [300 if i % 3 == 0 else 1 + i for i in range(40)]),
                                            # a CTA's items merged into one stream of batches
                                            ("wgmma_pp_ov_qp_mi_ps", 8, 2, 128, [5 * i for i in range(40)],
                                             [300 if i % 3 == 0 else 1 + i for i in range(40)]),
                                            ("wgmma3_pp_ov_qp_mi_ps", 8, 2, 64, [5 * i for i in range(40)],
                                             [300 if i % 3 == 0 else 1 + i for i in range(40)]),
                                            # items of 64 valid rows: key tiles split across the warpgroups
                                            ("wgmma3_pp_ov_qp_xc_ks_ps", 14, 2, 64, [5 * i for i in range(40)],
                                             [64 if i % 3 == 0 else 1 + i for i in range(40)])):
            if only_prefill is not None and plan not in only_prefill:
                continue
            if not A.prefill_wgmma_available(plan=plan):
                print(f"prefill {plan}: skipped (OPPO_PREFILL_WGMMA_OFF)")
                continue
            ok &= prefill_plan_check(f"prefill {plan} G={Hq // Hkv} D={Dd}", plan, Hq, Hkv, Dd, pre, chk, 0.1)
        if A.prefill_wgmma_available(plan="wgmma_pp_ov_ps") and only_prefill is None:   # item stamps on, room for 2 items
            with A.prefill_item_stamps(2):
                ok &= prefill_plan_check("prefill wgmma_pp_ov_ps with item stamps", "wgmma_pp_ov_ps", 8, 2, 64,
                                         [5 * i for i in range(40)], [300 if i % 3 == 0 else 1 + i for i in range(40)],
                                         0.1)
    torch.cuda.synchronize()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
