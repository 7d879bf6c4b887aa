"""Paged decode attention: achieved KV bytes/s over the copy bandwidth measured in the same run,
beside PyTorch SDPA on a contiguous (unpaged) cache of the same shape and FlexAttention.

    python bench/decode_attention.py [--out PATH] [--block-size 16] [--no-flex] [--shapes 0,2,64x4096x16x8x128] [--plans v4,v3]
                                     [--head-major] [--ragged] [--caps 256,512]

--plans: time our kernel under each plan (OPPO_DECODE_PLAN: v2, v3, v4, v5, v6, v7) in the same run; the first
is the `ours` column, the others get `ours_<plan>` columns. v5xN: v5 with N work items per resident
CTA slot at least (OPPO_DECODE_V5_ITEMS=N; default 4), v5pM: items of at most M tokens
(OPPO_DECODE_V5_MAX_PART=M; default 512), both: v5xNpM. Each plan name states its switches: v3 is
the split kernel without PDL and without the L2 prefetch, v3+l2 with the prefetch of one tile (the
runtime's default since session 17), +lo its loads, waits and barriers without the arithmetic (a
diagnostic whose output is wrong: the loader's ceiling), +rf each stage refilled as soon as its tile
is done (OPPO_DECODE_REFILL=1, off by default); v7 is v3's kernel with each group's
splits merged by its last CTA (the runtime's default plan since session 19). Default: the
environment's plan (v7) with +l2, as the runtime runs it.
--head-major: the first plan also on a pool of head-major pages ([2, Hkv, block_size, D]: a kv head's
tokens of a page contiguous, as FlashInfer's HND layout), `ours_hm` columns (the layout A/B).
Per plan the row also records the splits, the CTAs launched and the most items one CTA takes
(from the Python mirror of the launcher's plan; v4 without split is a persistent grid).

--caps: the first plan again with each max_partition (the cap on tokens per split that the engine
passes, EngineConfig.decode_max_partition), `ours_cap<N>` columns; `ours` is the kernel's own plan
(no cap), which issue 7's minima are taken over.

--ragged: one more row, the decode batch of the PPO benchmark's workload G (B + Δ = 128 sequences,
Hq 14 / Hkv 2 / D 64, contexts = a 128-token prompt + part of a lognormal response, median 400,
sigma 1, cap 4096: one long context beside many short ones, fixed seed). Its baselines get the
ragged lengths as a mask (SDPA: a boolean mask over the padded cache; FlexAttention: a block mask,
which skips the padding's blocks). It is reported apart: `summary.ragged_*`, not in the minima of
the five shapes of issue 7.

Beside the 4 GiB copy (the rate the fractions are of), each row times a device copy that moves the
row's own bytes (`common.copy_bandwidth` at half of them: half read, half written, timed as the
4 GiB copy): `copy_same_*` columns and `summary.min_speedup_vs_same_size_copy`. At
issue 7's 135 MB shapes a call's fixed costs (the launch gap, the ramp before DRAM streams, the
drain after the last byte) weigh on a copy too: session 33 (H100) measured a 135 MB copy at
0.93-0.945 of the 4 GiB copy's rate (bench/size_ceiling.py sweeps the sizes).

Bytes counted: every K and V byte of every context once, plus q and out. One query per
sequence; all sequences hold `ctx` tokens on shuffled pages of a pool whose page holds one
layer's K and V (so the K/V page stride is twice a page's K). SDPA gets the GQA group as a
query length (q viewed [B, Hkv, G, D], no mask), which reads each KV head once.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (attention_bench_setup, copy_bandwidth, device_info, env_var, paged_pool, print_table, results_path, shape_arg,  # noqa: E402
                    time_ms, write_json)

SHAPES = [  # B, ctx, Hq, Hkv, D  (issue 7)
    (64, 4096, 32, 8, 128),
    (256, 1024, 14, 2, 64),
    (16, 16384, 32, 8, 128),
    (128, 2048, 32, 32, 128),
    (1, 32768, 32, 8, 128),
]
RAGGED = (128, "ragged", 14, 2, 64)     # --ragged: workload G's decode batch


def parse_shape(spec: str) -> tuple[int, int, int, int, int]:
    """--shapes item: an index into SHAPES, or BxCTXxHQxHKVxD (e.g. 64x4096x16x8x128, a group of 2 heads:
    a sweep beside issue 7's five, whose minima then include it)."""
    return shape_arg(spec, SHAPES, "BxCTXxHQxHKVxD")


def ragged_lengths(B: int, seed: int = 0, prompt: int = 128, median: float = 400.0, sigma: float = 1.0,
                   cap: int = 4096) -> list[int]:
    """Context lengths of a decode batch part-way through lognormal responses (see --ragged)."""
    g = torch.Generator().manual_seed(seed)
    final = (median * torch.exp(sigma * torch.randn(B, generator=g, dtype=torch.float64))).clamp(1, cap)
    part = torch.rand(B, generator=g, dtype=torch.float64)
    return [prompt + max(1, int(round(float(f * p)))) for f, p in zip(final, part)]


def ragged_mask(ctx_lens: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, 1, 1, ctx] bool: True at the keys a sequence holds (SDPA's mask over a padded cache)."""
    B = ctx_lens.shape[0]
    return (torch.arange(ctx, device=ctx_lens.device)[None, :] < ctx_lens[:, None]).view(B, 1, 1, ctx)


def _plans() -> tuple[list[str], bool, bool, list[int], list[str]]:
    """--plans, --head-major, --ragged and --caps, and the rest of argv for the shared setup (sys.argv stays whole:
    the recorded command must reproduce the run)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plans", default=None)
    pre.add_argument("--head-major", action="store_true")
    pre.add_argument("--ragged", action="store_true")
    pre.add_argument("--caps", default="")
    known, rest = pre.parse_known_args()
    caps = [int(c) for c in known.caps.split(",") if c.strip()]
    assert all(c > 0 for c in caps), f"--caps takes positive token counts, got {known.caps!r}"
    if known.plans is None:
        base = os.environ.get("OPPO_DECODE_PLAN") or "v7"      # the runtime's default: its switches' defaults
        return [f"{base}+l2" if base in ("v2", "v3", "v6", "v7") else base], known.head_major, known.ragged, caps, rest
    plans = [p.strip() for p in known.plans.split(",") if p.strip()]
    ok = all(_SPLIT_PLAN.fullmatch(p) or _V5.fullmatch(p) for p in plans)
    assert plans and ok, f"--plans takes v2/v3/v4/v6/v7 (v2/v3/v6/v7 also with +pdl, +l2 or +l2x2, +lo, +rf, +sm, +rs, +hn, +sN)/v5/v5xNpM, got {known.plans!r}"
    return plans, known.head_major, known.ragged, caps, rest


_V5 = re.compile(r"(v5)(?:x(\d+))?(?:p(\d+))?")   # v5, v5xN, v5pM, v5xNpM
# the split plans with their switches (+pdl: OPPO_DECODE_PDL=1, +l2 / +l2x2: OPPO_DECODE_PREFETCH=1 / 2,
# +lo: OPPO_DECODE_DIAG_LOADS_ONLY=1, +rf: OPPO_DECODE_REFILL=1, +sm: OPPO_DECODE_FAST_MERGE=0, the slow
# merge; the fast one is the default since session 25; +rs: OPPO_DECODE_REG_STAGE=1, head dim 128; +sN:
# OPPO_DECODE_SPLIT_SLOTS=N, the splits planned as if N CTAs per SM were resident; +hn / +hn0:
# OPPO_DECODE_HEADS_AS_N=1 / 0, the heads as the mma's N forced on (groups of <= 8 heads) / off; neither:
# unset, the runtime's default, on for groups of 2..8 heads since session 27, 1..8 since session 28), and v4
_SPLIT_PLAN = re.compile(r"(v2|v3|v6|v7)(\+pdl|\+l2|\+l2x2|\+lo|\+rf|\+sm|\+rs|\+hn0?|\+s\d{1,2})*|v4")


@contextlib.contextmanager
def plan_env(plan: str):
    """OPPO_DECODE_PLAN (and for v5xNpM, OPPO_DECODE_V5_ITEMS=N and OPPO_DECODE_V5_MAX_PART=M; for
    PLAN+pdl, OPPO_DECODE_PDL=1; for PLAN+l2 and PLAN+l2x2, OPPO_DECODE_PREFETCH=1 and 2; for
    PLAN+lo, OPPO_DECODE_DIAG_LOADS_ONLY=1 (the kernel's loads alone: a diagnostic whose output is
    wrong, so its rows' error is not the kernel's); for PLAN+rf, OPPO_DECODE_REFILL=1; for PLAN+sm,
    OPPO_DECODE_FAST_MERGE=0 (1, the default, otherwise); for PLAN+rs, OPPO_DECODE_REG_STAGE=1 (the
    register-staged loader, head dim 128 only: at head dim 64 its rows record the launcher's error); for
    PLAN+sN, OPPO_DECODE_SPLIT_SLOTS=N (splits for N CTAs per SM; 0, the kernel's own, otherwise); for
    PLAN+hn, OPPO_DECODE_HEADS_AS_N=1 (groups of <= 8 heads: other rows record the launcher's error), for
    PLAN+hn0, OPPO_DECODE_HEADS_AS_N=0, neither: empty (the runtime's default, by the group); the others 0
    otherwise, so bare v3 runs without the prefetch the runtime defaults to) set inside: the launcher and the plan mirror both read them."""
    m = _V5.fullmatch(plan)
    base, items, max_part = (m.group(1), m.group(2), m.group(3)) if m else (plan, None, None)
    base, *switches = base.split("+")
    with (env_var("OPPO_DECODE_PLAN", base), env_var("OPPO_DECODE_V5_ITEMS", items or "4"),
          env_var("OPPO_DECODE_V5_MAX_PART", max_part or "512"),
          env_var("OPPO_DECODE_PDL", "1" if "pdl" in switches else "0"),
          env_var("OPPO_DECODE_PREFETCH", "2" if "l2x2" in switches else "1" if "l2" in switches else "0"),
          env_var("OPPO_DECODE_DIAG_LOADS_ONLY", "1" if "lo" in switches else "0"),
          env_var("OPPO_DECODE_REFILL", "1" if "rf" in switches else "0"),
          env_var("OPPO_DECODE_FAST_MERGE", "0" if "sm" in switches else "1"),
          env_var("OPPO_DECODE_REG_STAGE", "1" if "rs" in switches else "0"),
          env_var("OPPO_DECODE_HEADS_AS_N", "1" if "hn" in switches else "0" if "hn0" in switches else ""),
          env_var("OPPO_DECODE_SPLIT_SLOTS", next((w[1:] for w in switches if re.fullmatch(r"s\d+", w)), "0"))):
        yield


def main() -> None:
    plans, head_major, ragged_row, caps, rest = _plans()
    args, flex, create_block_mask = attention_bench_setup(__doc__, rest)
    from oppo_runtime.ops.attention import (paged_decode_attention_ref, paged_decode_grid, paged_decode_plan,
                                            paged_decode_resident_ctas, paged_decode_workspace)

    info = device_info()
    bw = copy_bandwidth()
    print(f"{info['card']}  torch {info['torch']}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    shapes = SHAPES if args.shapes is None else [parse_shape(i) for i in args.shapes.split(",")]
    if ragged_row:
        shapes = [*shapes, RAGGED]
    out_path = results_path("decode_attention", args.out)
    rows = []
    dtype = torch.bfloat16
    for (B, ctx_spec, Hq, Hkv, D) in shapes:
        G = Hq // Hkv
        scale = D ** -0.5
        ragged = ctx_spec == "ragged"
        lens = ragged_lengths(B) if ragged else [ctx_spec] * B
        ctx = max(lens)                 # the pool, the tables and the padded baselines' length
        k_cache, v_cache, bt = paged_pool(B, ctx, Hkv, D, args.block_size, dtype)
        ctx_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
        out = torch.empty_like(q)
        nbytes = 2 * sum(lens) * Hkv * D * q.element_size() + 2 * q.numel() * q.element_size()
        row = {"B": B, "ctx": ctx, "Hq": Hq, "Hkv": Hkv, "D": D, "block_size": args.block_size,
               "bytes": nbytes, "floor_us": nbytes / bw * 1e6}
        if ragged:
            row.update(ragged=True, ctx_mean=sum(lens) / B, ctx_min=min(lens))
        # ragged: the baselines read a padded cache and mask the padding off
        mask = ragged_mask(ctx_lens, ctx) if ragged else None
        outs = {}

        def time_plan(plan: str) -> float:
            """ms of one call under `plan`, with the caller's workspace, as the engine's decode graphs pass it."""
            with plan_env(plan):
                ws = paged_decode_workspace(q, k_cache, bt, backend="cuda")
                return time_ms(lambda: torch.ops.oppo.paged_decode_attention(out, q, k_cache, v_cache, bt, ctx_lens,
                                                                             scale, ws))

        # The shape's warm-up: the first plan timed once and discarded. Session 18 (H100, three runs):
        # at (1, 32768) the first plan timed after the pool was built read 63-65 us and the same plan
        # 56-57 us later in the process (ours_again), so `ours` and the summary took the cold number.
        try:
            time_plan(plans[0])
        except Exception:  # noqa: BLE001  (the timed loop below records the error)
            pass
        for i, plan in enumerate(plans):   # the plan is read at each call, so at capture inside time_ms
            key = "ours" if i == 0 else f"ours_{plan}"
            table = bt.shape[1] * args.block_size
            with plan_env(plan):
                resident = paged_decode_resident_ctas(D)
                row[f"splits_{plan}"] = paged_decode_plan(B, Hq, Hkv, D, table, info["sm_count"], resident)[0]
                row[f"ctas_{plan}"], row[f"items_per_cta_{plan}"] = paged_decode_grid(
                    B, Hq, Hkv, D, table, info["sm_count"], resident)
                try:
                    ms = time_plan(plan)
                    row[f"{key}_us"] = ms * 1e3
                    row[f"{key}_frac_copy_bw"] = nbytes / (ms * 1e-3) / bw
                    outs[plan] = out.clone()
                except Exception as e:  # noqa: BLE001
                    row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
                    print(row[f"{key}_error"])
        row["plan"] = plans[0]
        for cap in caps:    # the first plan with the engine's cap on tokens per split
            key = f"ours_cap{cap}"
            table = bt.shape[1] * args.block_size
            with plan_env(plans[0]):
                resident = paged_decode_resident_ctas(D)
                row[f"splits_cap{cap}"] = paged_decode_plan(B, Hq, Hkv, D, table, info["sm_count"], resident,
                                                            max_partition=cap)[0]
                try:
                    ws = paged_decode_workspace(q, k_cache, bt, backend="cuda", max_partition=cap)
                    oc = torch.empty_like(q)
                    ms = time_ms(lambda: torch.ops.oppo.paged_decode_attention(oc, q, k_cache, v_cache, bt,
                                                                               ctx_lens, scale, ws, cap))
                    row[f"{key}_us"] = ms * 1e3
                    row[f"{key}_frac_copy_bw"] = nbytes / (ms * 1e-3) / bw
                    outs[f"cap{cap}"] = oc
                except Exception as e:  # noqa: BLE001
                    row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
                    print(row[f"{key}_error"])
        if head_major:   # the first plan again on head-major pages of the same shape (layout A/B)
            with plan_env(plans[0]):
                try:
                    kh, vh, bth = paged_pool(B, ctx, Hkv, D, args.block_size, dtype, head_major=True)
                    oh = torch.empty_like(q)
                    ms = time_ms(lambda: torch.ops.oppo.paged_decode_attention(oh, q, kh, vh, bth, ctx_lens, scale))
                    row["ours_hm_us"] = ms * 1e3
                    row["ours_hm_frac_copy_bw"] = nbytes / (ms * 1e-3) / bw
                    ref_h = paged_decode_attention_ref(q, kh, vh, bth, ctx_lens, scale).float()
                    row["rel_err_hm"] = float((oh.float() - ref_h).norm() / ref_h.norm())
                    del kh, vh, ref_h
                except Exception as e:  # noqa: BLE001
                    row["ours_hm_error"] = f"{type(e).__name__}: {e}"[:300]
                    print(row["ours_hm_error"])
        # Contiguous caches of the same content for the baselines.
        pos = torch.arange(ctx, device="cuda")
        blocks = bt[:, pos // args.block_size].long()
        kc = k_cache[blocks, pos % args.block_size].transpose(1, 2).contiguous()   # [B, Hkv, ctx, D]
        vc = v_cache[blocks, pos % args.block_size].transpose(1, 2).contiguous()
        qg = q.view(B, Hkv, G, D)
        try:
            ms = time_ms(lambda: F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=scale))
            row["sdpa_us"] = ms * 1e3
            row["sdpa_frac_copy_bw"] = nbytes / (ms * 1e-3) / bw
        except Exception as e:  # noqa: BLE001
            row["sdpa_error"] = f"{type(e).__name__}: {e}"[:300]
            print(row["sdpa_error"])
        try:   # a copy that moves this row's bytes (the size's own ceiling beside the 4 GiB copy's rate)
            moved = 2 * (nbytes // 2)                    # nbytes // 2 read and as many written
            rate = copy_bandwidth(nbytes // 2)           # the 4 GiB copy's measurement, at this size
            row["copy_same_us"] = moved / rate * 1e6
            row["copy_same_frac_copy_bw"] = rate / bw
        except Exception as e:  # noqa: BLE001
            row["copy_same_error"] = f"{type(e).__name__}: {e}"[:300]
            print(row["copy_same_error"])
        if flex is not None:
            q4 = q.view(B, Hq, 1, D)
            try:
                bm = None
                if ragged:
                    bm = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < ctx_lens[b], B, None, 1, ctx,
                                           device="cuda")
                ms = time_ms(lambda: flex(q4, kc, vc, block_mask=bm, scale=scale, enable_gqa=True), graph=False)
                row["flex_us"] = ms * 1e3
                row["flex_frac_copy_bw"] = nbytes / (ms * 1e-3) / bw
            except Exception as e:  # noqa: BLE001
                row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
                print(row["flex_error"])
        if "ours_us" in row:   # the first plan again, last: the same version twice (its spread is the noise)
            ms = time_plan(plans[0])
            row["ours_again_us"] = ms * 1e3
            row["ours_spread"] = abs(row["ours_us"] - row["ours_again_us"]) / min(row["ours_us"], row["ours_again_us"])
        if outs:
            try:  # the timed outputs once against SDPA in fp32 (a smoke test; the tests are the check)
                ref = F.scaled_dot_product_attention(qg.float(), kc.float(), vc.float(), attn_mask=mask,
                                                     scale=scale).reshape(B, Hq, D)
                for i, (plan, o) in enumerate(outs.items()):
                    key = "rel_err_vs_fp32" if plan == plans[0] else f"rel_err_vs_fp32_{plan}"
                    row[key] = float((o.float() - ref).norm() / ref.norm())
                del ref
            except Exception as e:  # noqa: BLE001
                print(f"check failed: {e}")
            for k in ("sdpa_us", "flex_us", "copy_same_us"):
                if k in row and "ours_us" in row:   # (the first plan may have failed at this shape)
                    row["speedup_vs_" + k[:-3]] = row[k] / row["ours_us"]
        rows.append(row)
        del k_cache, v_cache, kc, vc
        torch.cuda.empty_cache()
        summary = _summary(rows)
        write_json(out_path, {**info, "copy_bandwidth_Bps": bw, "dtype": "bfloat16", "rows": rows, "summary": summary})
        print(f"  done B={B} ctx={ctx}: " + ", ".join(f"{k}={row[k]:.3g}" for k in row if k.endswith(("_us", "_bw"))))

    print()
    extra = []
    for plan in plans[1:]:
        extra += [(f"splits_{plan}", f"splits {plan}", "d"), (f"ctas_{plan}", f"CTAs {plan}", "d"),
                  (f"ours_{plan}_us", f"{plan} us", ".1f"), (f"ours_{plan}_frac_copy_bw", f"{plan}/copy", ".3f")]
    for cap in caps:
        extra += [(f"splits_cap{cap}", f"splits cap {cap}", "d"), (f"ours_cap{cap}_us", f"cap {cap} us", ".1f"),
                  (f"ours_cap{cap}_frac_copy_bw", f"cap {cap}/copy", ".3f")]
    if head_major:
        extra += [("ours_hm_us", "head-major us", ".1f"), ("ours_hm_frac_copy_bw", "head-major/copy", ".3f")]
    print(f"ours = plan {plans[0]}" + ("; head-major = the same plan on head-major pages" if head_major else ""))
    print_table(rows, [("B", "B", "d"), ("ctx", "ctx", "d"), ("Hq", "Hq", "d"), ("Hkv", "Hkv", "d"), ("D", "D", "d"),
                       ("floor_us", "floor us", ".1f"), (f"splits_{plans[0]}", "splits", "d"),
                       (f"ctas_{plans[0]}", "CTAs", "d"), (f"items_per_cta_{plans[0]}", "items/CTA", "d"), ("ours_us", "ours us", ".1f"),
                       ("ours_frac_copy_bw", "ours/copy", ".3f"), ("ours_again_us", "again us", ".1f"),
                       ("ours_spread", "spread", ".3f"), *extra, ("sdpa_us", "sdpa us", ".1f"),
                       ("sdpa_frac_copy_bw", "sdpa/copy", ".3f"), ("copy_same_us", "same-size copy us", ".1f"),
                       ("copy_same_frac_copy_bw", "same-size copy/copy", ".3f"), ("flex_us", "flex us", ".1f"),
                       ("flex_frac_copy_bw", "flex/copy", ".3f"), ("speedup_vs_sdpa", "x sdpa", ".2f"),
                       ("speedup_vs_flex", "x flex", ".2f"), ("speedup_vs_copy_same", "x same-size copy", ".2f"),
                       ("rel_err_vs_fp32", "rel err", ".1e")])
    print("summary:", _summary(rows))
    print("wrote", out_path)


def _summary(rows):
    """Minima over issue 7's shapes; the --ragged row apart (``ragged_*``)."""
    extra = [r for r in rows if r.get("ragged")]
    rows = [r for r in rows if not r.get("ragged")]

    def mn(key):
        vals = [r[key] for r in rows if key in r]
        return min(vals) if vals else None
    other = sorted({k[len("ours_"):-len("_frac_copy_bw")] for r in rows for k in r
                    if k.startswith("ours_") and k.endswith("_frac_copy_bw") and k != "ours_frac_copy_bw"})
    out = {"plan": rows[0].get("plan") if rows else None,
           "min_fraction_of_copy_bw": mn("ours_frac_copy_bw"),
           **{f"min_fraction_of_copy_bw_{p}": mn(f"ours_{p}_frac_copy_bw") for p in other},
           "min_speedup_vs_sdpa_contiguous": mn("speedup_vs_sdpa"),
           "min_speedup_vs_flex": mn("speedup_vs_flex"),
           "min_speedup_vs_same_size_copy": mn("speedup_vs_copy_same"),
           "max_spread_same_plan": max((r["ours_spread"] for r in rows if "ours_spread" in r), default=None),
           "shapes": len(rows)}
    if extra:
        r = extra[0]
        out.update(ragged_fraction_of_copy_bw=r.get("ours_frac_copy_bw"),
                   ragged_speedup_vs_sdpa_padded=r.get("speedup_vs_sdpa"), ragged_speedup_vs_flex=r.get("speedup_vs_flex"),
                   **{f"ragged_fraction_of_copy_bw_{k[len('ours_'):-len('_frac_copy_bw')]}": v for k, v in r.items()
                      if k.startswith("ours_cap") and k.endswith("_frac_copy_bw")})
    return out


if __name__ == "__main__":
    main()
