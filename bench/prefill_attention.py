"""Incremental (chunked) prefill attention over a paged prefix: achieved FLOP/s over the bf16
matmul rate measured in the same run, for our backends (the CUDA kernel's mma plan, "ours"; on
sm_90 with an sm_90a build its warp-specialized wgmma plan, "wgmma" (OPPO_PREFILL_PLAN=wgmma),
and its flag variants: consumer warpgroups in ping-pong "wgmma_pp", softmax overlapping the
warpgroup's own P V "wgmma_ov", both "wgmma_pp_ov", and both on persistent CTAs "wgmma_pp_ov_ps";
K and V on separate barrier rings "wgmma_kv" and "wgmma_pp_ov_kv"; each item's Q rows prefetched
into L2 by the producer "wgmma_pp_ov_qp_ps", "wgmma3_pp_ov_qp_ps"; with the warpgroups' turns
chained across a persistent CTA's items "wgmma_pp_ov_qp_xc_ps", "wgmma3_pp_ov_qp_xc_ps"; with a CTA's items
merged into one stream of batches "wgmma_pp_ov_qp_mi_ps", "wgmma3_pp_ov_qp_mi_ps"; with the key tiles of items
of 64 valid rows split across the three warpgroups "wgmma3_pp_ov_qp_xc_ks_ps"; three consumer warpgroups
(192-row items, head dim 64 only: timed on the D=64 shapes) "wgmma3_pp_ov", "wgmma3_pp_ov_ps" and, without ping-pong, "wgmma3_ov_ps";
the Triton kernel, "triton") beside FlexAttention (bottom-right causal block mask) and SDPA
(explicit boolean mask), both on contiguous KV. ``speedup_vs_flex`` / ``speedup_vs_sdpa`` use
the fastest of our backends (``best``); per-backend speedups are kept beside them.

Also, per shape, the chunk's K/V write into the pages (issue 8): inside the rotary kernel (what the
engine and the scorers run) vs the rotary kernel then the CUDA kv_append, beside the bytes' floor.

    python bench/prefill_attention.py [--out PATH] [--block-size 16] [--no-flex] [--shapes 0,2]
                                      [--plans wgmma,wgmma_pp_ov_ps]   (the wgmma plans to time; default all)
                                      [--triton-sweep]   (also the Triton kernel at each of TRITON_SWEEP's configs)
                                      [--rounds 3]   (each of our calls and Flex timed this many times per shape)

Rounds: per shape, our calls and Flex are timed once each, then again in the reverse order, and so
on (``--rounds`` passes in all); each keeps its fastest pass (``<name>_us``; every pass in
``<name>_us_rounds``). Session 29's runs saw the plan timed first at a shape run up to 10% slow in
both orders (and Flex move 5% between two runs), so one pass per call let the order decide ratios.

FLOPs counted: 4 * D * Hq per (query, visible key) pair (Q*K^T and P*V), i.e. only the causal
part: query i of a chunk of n after a prefix p sees p + i + 1 keys. Every sequence of the batch
has the same prefix and chunk; K/V on shuffled pages (the chunk's K/V already in the pages, as
the scorer calls it after kv_append).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oppo_runtime.ops import prefill_triton  # noqa: E402
from oppo_runtime.ops.attention import paged_prefill_attention, prefill_plan_head_dims, prefill_wgmma_available  # noqa: E402

from common import (attention_bench_setup, device_info, env_var, matmul_flops, paged_pool, print_table, results_path, shape_arg,  # noqa: E402
                    time_ms, write_json)

SHAPES = [  # B, prefix, chunk, Hq, Hkv, D  (issue 8)
    (16, 2048, 512, 32, 8, 128),
    (64, 1024, 256, 14, 2, 64),
    (8, 8192, 512, 32, 8, 128),
]


WGMMA_PLANS = ("wgmma", "wgmma_pp", "wgmma_ov", "wgmma_pp_ov", "wgmma_pp_ov_ps", "wgmma_kv", "wgmma_pp_ov_kv",
               "wgmma_pp_ov_qp_ps", "wgmma3_pp_ov_qp_ps", "wgmma_pp_ov_qp_xc_ps", "wgmma3_pp_ov_qp_xc_ps",
               "wgmma_pp_ov_qp_mi_ps", "wgmma3_pp_ov_qp_mi_ps", "wgmma3_pp_ov_qp_xc_ks_ps",
               "wgmma3_pp_ov", "wgmma3_pp_ov_ps", "wgmma3_ov_ps")
OURS = {"ours": "cuda", **{p: "cuda_" + p for p in WGMMA_PLANS}, "triton": "triton"}   # result key -> backend


def _with_plan(plan: str, fn):
    """fn under OPPO_PREFILL_PLAN=plan (the launcher reads it at every call, also when captured)."""
    def call():
        with env_var("OPPO_PREFILL_PLAN", plan):
            return fn()
    return call


def _plans() -> tuple[tuple[str, ...], list[str], bool, int]:
    """--plans (the wgmma plans to time), --triton-sweep, --rounds, and the rest of argv for the shared setup
    (sys.argv stays whole: the recorded command must reproduce the run)."""
    import argparse
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plans", default=None)
    pre.add_argument("--triton-sweep", action="store_true")
    pre.add_argument("--rounds", type=int, default=3)
    known, rest = pre.parse_known_args()
    if known.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {known.rounds}")
    if known.plans is None:
        return WGMMA_PLANS, rest, known.triton_sweep, known.rounds
    plans = tuple(p.strip() for p in known.plans.split(",") if p.strip())
    assert all(p in WGMMA_PLANS for p in plans), f"--plans takes some of {WGMMA_PLANS}, got {known.plans!r}"
    return plans, rest, known.triton_sweep, known.rounds


# --triton-sweep: (BLOCK_M, BLOCK_N, num_warps, num_stages) timed one by one, the autotuner bypassed,
# to see whether a config outside the autotuner's short list (prefill_triton._CONFIGS) is faster.
# Stages >= 3 (the indirect K/V loads pipeline only then); configs over the SM's shared memory or
# that fail to compile are recorded as errors.
TRITON_SWEEP = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (3, 4)]


def _triton_sweep(row, q, k_cache, v_cache, cu, ctx_lens, bt, scale, n, flops, mm, ref_out) -> None:
    """Times every TRITON_SWEEP config on this shape into row["triton_sweep"] (us or an error),
    the fastest as triton_sweep_best(_us), and its largest difference from the autotuned output."""
    res, o = {}, torch.empty_like(q)
    D = q.shape[-1]
    for bm, bn, w, st in TRITON_SWEEP:
        key = f"{bm}x{bn}_w{w}_s{st}"
        if st * bn * D * 2 * 2 + bm * D * 2 > 227 * 1024:
            res[key] = "skipped: shared memory"
            continue
        try:
            fn = lambda: prefill_triton.paged_prefill_attention(  # noqa: E731
                q, k_cache, v_cache, cu, ctx_lens, bt, scale, out=o, max_seqlen_q=n, config=(bm, bn),
                num_warps=w, num_stages=st)
            res[key] = time_ms(fn) * 1e3
        except Exception as e:  # noqa: BLE001
            res[key] = f"{type(e).__name__}: {e}"[:160]
    row["triton_sweep"] = res
    timed = {k: v for k, v in res.items() if isinstance(v, float)}
    if timed:
        best = min(timed, key=timed.get)
        bm, bn, w, st = next(c for c in TRITON_SWEEP if f"{c[0]}x{c[1]}_w{c[2]}_s{c[3]}" == best)
        prefill_triton.paged_prefill_attention(q, k_cache, v_cache, cu, ctx_lens, bt, scale, out=o, max_seqlen_q=n,
                                               config=(bm, bn), num_warps=w, num_stages=st)
        row["triton_sweep_best"] = best
        row["triton_sweep_best_us"] = timed[best]
        row["triton_sweep_best_frac_matmul"] = flops / (timed[best] * 1e-6) / mm
        if ref_out is not None:
            row["triton_sweep_best_max_abs_diff_vs_triton"] = float((o.float() - ref_out.float()).abs().max())
        print(f"  triton sweep: best {best} {timed[best]:.1f} us; " +
              ", ".join(f"{k} {v:.0f}" for k, v in sorted(timed.items(), key=lambda kv: kv[1])[:6]), flush=True)


def main() -> None:
    plans, rest, triton_sweep, rounds = _plans()
    args, flex, create_block_mask = attention_bench_setup(__doc__, rest)

    info = device_info()
    mm = matmul_flops()
    print(f"{info['card']}  torch {info['torch']}  bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    shapes = SHAPES if args.shapes is None else [shape_arg(i, SHAPES, "BxPREFIXxCHUNKxHQxHKVxD") for i in args.shapes.split(",")]
    out_path = results_path("prefill_attention", args.out)
    rows = []
    dtype = torch.bfloat16
    for (B, prefix, n, Hq, Hkv, D) in shapes:
        ctx = prefix + n
        scale = D ** -0.5
        flops = 4.0 * D * Hq * B * (n * prefix + n * (n + 1) / 2)
        k_cache, v_cache, bt = paged_pool(B, ctx, Hkv, D, args.block_size, dtype)
        ctx_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device="cuda")
        q = torch.randn(B * n, Hq, D, device="cuda", dtype=dtype)
        out = torch.empty_like(q)
        row = {"B": B, "prefix": prefix, "chunk": n, "Hq": Hq, "Hkv": Hkv, "D": D, "block_size": args.block_size,
               "gflop": flops / 1e9, "floor_us": flops / mm * 1e6}
        outs = {"ours": out, "triton": torch.empty_like(q), **{p: torch.empty_like(q) for p in WGMMA_PLANS}}
        calls = {
            "ours": _with_plan("mma", lambda: torch.ops.oppo.paged_prefill_attention(
                out, q, k_cache, v_cache, cu, ctx_lens, bt, scale, n)),
            # the first (eager) call autotunes; time_ms's warm-up calls run before its graph capture
            "triton": lambda: paged_prefill_attention(q, k_cache, v_cache, cu, ctx_lens, bt, scale,
                                                      out=outs["triton"], max_seqlen_q=n, backend="triton"),
        }
        if prefill_wgmma_available():
            for plan in plans:
                if not prefill_wgmma_available(plan=plan):
                    row[plan + "_error"] = "switched off by OPPO_PREFILL_WGMMA_OFF (bench/wgmma_smoke.py)"
                    continue
                if D not in prefill_plan_head_dims(plan):   # wgmma3: 64 only; the other _mi plans: 128
                    continue
                calls[plan] = _with_plan(plan, lambda o=outs[plan]: torch.ops.oppo.paged_prefill_attention(
                    o, q, k_cache, v_cache, cu, ctx_lens, bt, scale, n))
        graphed = {name: True for name in calls}   # name -> time_ms's graph argument (Flex: eager)

        def time_pass(names):
            for name in names:
                if name + "_error" in row:
                    continue
                try:
                    row.setdefault(name + "_us_rounds", []).append(time_ms(calls[name], graph=graphed[name]) * 1e3)
                except Exception as e:  # noqa: BLE001
                    row[name + "_error"] = f"{type(e).__name__}: {e}"[:300]
                    print(row[name + "_error"])
        time_pass(list(calls))
        if "triton_us_rounds" in row:
            row["triton_config"] = prefill_triton.best_config()
        if triton_sweep:
            _triton_sweep(row, q, k_cache, v_cache, cu, ctx_lens, bt, scale, n, flops, mm,
                          outs["triton"] if "triton_us_rounds" in row else None)
        pos = torch.arange(ctx, device="cuda")
        blocks = bt[:, pos // args.block_size].long()
        kc = k_cache[blocks, pos % args.block_size].transpose(1, 2).contiguous()   # [B, Hkv, ctx, D]
        vc = v_cache[blocks, pos % args.block_size].transpose(1, 2).contiguous()
        q4 = q.view(B, n, Hq, D).transpose(1, 2)                                      # [B, Hq, n, D]
        if flex is not None:
            try:
                def causal(b, h, q_idx, kv_idx):
                    return kv_idx <= q_idx + prefix
                bm = create_block_mask(causal, B=None, H=None, Q_LEN=n, KV_LEN=ctx, device="cuda")
                calls["flex"] = lambda: flex(q4, kc, vc, block_mask=bm, scale=scale, enable_gqa=True)
                graphed["flex"] = False
                time_pass(["flex"])
            except Exception as e:  # noqa: BLE001
                row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
                print(row["flex_error"])
        for r in range(1, rounds):   # the further passes, every other one in the reverse order
            time_pass(list(calls)[::-1] if r % 2 else list(calls))
        for name in calls:
            if row.get(name + "_us_rounds") and name + "_error" not in row:
                us = min(row[name + "_us_rounds"])
                row[name + "_us"] = us
                if name != "flex":
                    row[name + "_tflops"] = flops / (us * 1e-6) / 1e12
                row[name + "_frac_matmul"] = flops / (us * 1e-6) / mm
        row["rounds"] = rounds
        timed = [b for b in OURS if b + "_us" in row]
        if timed:
            best = min(timed, key=lambda b: row[b + "_us"])
            row["best"] = OURS[best]
            row["best_us"] = row[best + "_us"]
            row["best_frac_matmul"] = row[best + "_frac_matmul"]
        for bs in [int(x) for x in args.extra_block_sizes.split(",") if x.strip()]:
            # the same K/V in pages of bs tokens: with bs >= the kernel's key tile, one block-table
            # load per tile instead of one per key (the runtime's page size is a config choice)
            try:
                k2, v2, bt2 = paged_pool(B, ctx, Hkv, D, bs, dtype)
                blocks2 = bt2[:, pos // bs].long()
                k2[blocks2, pos % bs] = kc.transpose(1, 2)
                v2[blocks2, pos % bs] = vc.transpose(1, 2)
                o2 = torch.empty_like(q)
                ms = time_ms(lambda: paged_prefill_attention(q, k2, v2, cu, ctx_lens, bt2, scale, out=o2,
                                                             max_seqlen_q=n, backend="triton"))
                row[f"triton_bs{bs}_us"] = ms * 1e3
                row[f"triton_bs{bs}_frac_matmul"] = flops / (ms * 1e-3) / mm
                if "triton_us" in row:
                    row[f"triton_bs{bs}_max_abs_diff_vs_bs{args.block_size}"] = float(
                        (o2.float() - outs["triton"].float()).abs().max())
                if "flex_us" in row:
                    row[f"speedup_vs_flex_triton_bs{bs}"] = row["flex_us"] / row[f"triton_bs{bs}_us"]
                del k2, v2
            except Exception as e:  # noqa: BLE001
                row[f"triton_bs{bs}_error"] = f"{type(e).__name__}: {e}"[:300]
                print(row[f"triton_bs{bs}_error"])
        try:
            mask = torch.arange(ctx, device="cuda")[None, :] <= (torch.arange(n, device="cuda")[:, None] + prefix)
            G = Hq // Hkv
            ke, ve = kc.repeat_interleave(G, 1), vc.repeat_interleave(G, 1)            # expanded outside the timing
            ms = time_ms(lambda: F.scaled_dot_product_attention(q4, ke, ve, attn_mask=mask, scale=scale))
            row["sdpa_us"] = ms * 1e3
            row["sdpa_frac_matmul"] = flops / (ms * 1e-3) / mm
            ref = F.scaled_dot_product_attention(q4, ke, ve, attn_mask=mask, scale=scale)
            for name, suffix in (("ours", ""), ("triton", "_triton"), *((p, "_" + p) for p in WGMMA_PLANS)):
                if name + "_us" in row:
                    o = outs[name].view(B, n, Hq, D).transpose(1, 2)
                    row["rel_err_vs_sdpa_bf16" + suffix] = float((o.float() - ref.float()).norm() / ref.float().norm())
            del ke, ve
        except Exception as e:  # noqa: BLE001
            row["sdpa_error"] = f"{type(e).__name__}: {e}"[:300]
            print(row["sdpa_error"])
        row.update(_kv_write(B, n, Hq, Hkv, D, args.block_size, dtype))
        for k in ("sdpa_us", "flex_us"):
            for name, suffix in (("best", ""), ("ours", "_cuda"), ("triton", "_triton"),
                                 ("triton_sweep_best", "_triton_sweep_best"), *((p, "_" + p) for p in WGMMA_PLANS)):
                if k in row and name + "_us" in row:
                    row["speedup_vs_" + k[:-3] + suffix] = row[k] / row[name + "_us"]
        rows.append(row)
        del k_cache, v_cache, kc, vc
        torch.cuda.empty_cache()
        write_json(out_path, {**info, "matmul_flops": mm, "dtype": "bfloat16", "rows": rows, "summary": _summary(rows)})
        print(f"  done B={B} prefix={prefix} chunk={n}: " +
              ", ".join(f"{k}={row[k]:.3g}" for k in row if k.endswith(("_us", "_matmul"))))

    print()
    print_table(rows, [("B", "B", "d"), ("prefix", "prefix", "d"), ("chunk", "chunk", "d"), ("Hq", "Hq", "d"),
                       ("Hkv", "Hkv", "d"), ("D", "D", "d"), ("floor_us", "floor us", ".1f"),
                       ("ours_us", "ours us", ".1f"), ("ours_tflops", "TFLOP/s", ".0f"),
                       ("ours_frac_matmul", "ours/mm", ".3f"), ("triton_us", "triton us", ".1f"),
                       ("triton_tflops", "TFLOP/s", ".0f"), ("triton_frac_matmul", "triton/mm", ".3f"),
                       *((f"{p}_frac_matmul", f"{p}/mm", ".3f") for p in WGMMA_PLANS),
                       ("flex_us", "flex us", ".1f"),
                       ("flex_frac_matmul", "flex/mm", ".3f"), ("sdpa_us", "sdpa us", ".1f"),
                       ("sdpa_frac_matmul", "sdpa/mm", ".3f"), ("speedup_vs_flex", "x flex", ".2f"),
                       ("speedup_vs_sdpa", "x sdpa", ".2f"), ("best", "best", "s"),
                       ("rel_err_vs_sdpa_bf16", "rel err", ".1e"), ("rel_err_vs_sdpa_bf16_triton", "triton err", ".1e"),
                       ("rel_err_vs_sdpa_bf16_wgmma", "wgmma err", ".1e"),
                       ("kv_write_fused_us", "K/V write fused us", ".1f"),
                       ("kv_write_separate_us", "rotary + kv_append us", ".1f"),
                       ("kv_write_floor_us", "its floor us", ".1f")])
    print("summary:", _summary(rows))
    print("wrote", out_path)


def _kv_write(B, n, Hq, Hkv, D, block_size, dtype) -> dict:
    """The chunk's K/V into the pages (issue 8: fused, or by the KV append op, whichever is faster):
    rotary of q and k with the append inside the same Triton kernel (what the scorers run), vs
    the rotary kernel then the CUDA kv_append, on the chunk's B*n tokens at shuffled slots. Also
    the copy-bandwidth floor of the bytes either way must move (q, k, v read; q, k written; k, v
    to the pages)."""
    from common import copy_bandwidth
    from oppo_runtime.ops.fused import rotary_cos_sin_cache, rotary_qk
    N = B * n
    g = torch.Generator(device="cuda").manual_seed(1)
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, device="cuda", dtype=dtype, generator=g)
    q = qkv[:, :Hq * D].view(N, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(N, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(N, Hkv, D)
    kc, vc, _ = paged_pool(-(-N // block_size) + 4, block_size, Hkv, D, block_size, dtype)
    slots = torch.randperm(kc.shape[0] * block_size, device="cuda", generator=g)[:N]
    pos = torch.randint(0, 8192, (N,), device="cuda", generator=g)
    cache = rotary_cos_sin_cache(1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D)), 8192, "cuda")
    r = {}
    try:
        fused_ms = time_ms(lambda: rotary_qk(q, k, cache, pos, kv=(v, kc, vc, slots)))
        with env_var("OPPO_FUSE_KV_APPEND", "0"):   # read per call: the rotary kernel, then kv_append
            sep_ms = time_ms(lambda: rotary_qk(q, k, cache, pos, kv=(v, kc, vc, slots)))
        moved = N * D * 2 * ((Hq + 2 * Hkv) + (Hq + Hkv) + 2 * Hkv)
        r.update(kv_write_fused_us=fused_ms * 1e3, kv_write_separate_us=sep_ms * 1e3,
                 kv_write_fused_speedup=sep_ms / fused_ms, kv_write_floor_us=moved / copy_bandwidth() * 1e6)
    except Exception as e:  # noqa: BLE001
        r["kv_write_error"] = f"{type(e).__name__}: {e}"[:300]
        print(r["kv_write_error"])
    return r


def _summary(rows):
    def agg(f, key):
        vals = [r[key] for r in rows if key in r]
        return f(vals) if vals else None
    worst = min((r for r in rows if "speedup_vs_flex" in r), key=lambda r: r["speedup_vs_flex"], default=None)
    return {"min_speedup_vs_flex": agg(min, "speedup_vs_flex"),       # best of our backends, per shape
            "min_speedup_vs_flex_backend": worst["best"] if worst else None,
            "best_backend_per_shape": [r.get("best") for r in rows],
            "min_speedup_vs_flex_cuda": agg(min, "speedup_vs_flex_cuda"),
            "min_speedup_vs_flex_triton": agg(min, "speedup_vs_flex_triton"),
            **{f"min_speedup_vs_flex_{p}": agg(min, f"speedup_vs_flex_{p}") for p in WGMMA_PLANS},
            **{f"min_speedup_vs_flex_triton_bs{k.rsplit('bs', 1)[1]}": agg(min, k)
               for k in sorted({k for r in rows for k in r if k.startswith("speedup_vs_flex_triton_bs")})},
            "min_speedup_vs_flex_triton_sweep_best": agg(min, "speedup_vs_flex_triton_sweep_best"),  # --triton-sweep
            "min_speedup_vs_sdpa": agg(min, "speedup_vs_sdpa"),
            "min_kv_write_fused_speedup": agg(min, "kv_write_fused_speedup"),   # > 1: the fused append wins
            "max_fraction_of_matmul": agg(max, "best_frac_matmul"),
            "min_fraction_of_matmul": agg(min, "best_frac_matmul"),
            "max_fraction_of_matmul_cuda": agg(max, "ours_frac_matmul"),
            "max_fraction_of_matmul_triton": agg(max, "triton_frac_matmul"),
            "shapes": len(rows)}


if __name__ == "__main__":
    main()
