"""Where the wgmma prefill kernel's time goes, item by item: start and end times, SM and key-tile
count of every work item (``ops.attention.prefill_item_stamps``), per shape and plan.

    python bench/prefill_stamps.py [--plans wgmma_pp_ov_ps,wgmma3_pp_ov_ps] [--shapes 1] [--no-spread]
                                   [--reps 5] [--out PATH]

At head dim 64 the wgmma kernel reaches 0.37 of the matmul rate (0.98x FlexAttention) with its
pipes far from busy (ncu: 0.42 issued warps per scheduler, session 14), which leaves two suspects:
a fixed cost per work item (Q staged through registers, the first tile's S alone, the last P V
alone, the epilogue) on items of only ~9 key tiles, or the tile loop itself. The stamps separate
them: a least-squares fit of each item's duration (consumer warpgroup 0's start of the item to the
end of its epilogue) = a + b x its key tiles gives ``item_overhead_us`` (a) and ``tile_us`` (b);
``tile_us_floor`` is a tile's MMA work (Q K^T and P V of kBM x 128 keys) at the bf16 matmul rate
measured in this run, per SM: tile_us / tile_us_floor is the tile loop's distance from the tensor
cores' rate. ``gap_us``: the median time between an item's end and the next item's start on the
same CTA (persistent plans). For each of issue 8's shapes (``--shapes``) and, unless
``--no-spread``, a batch of 32 sequences whose prefixes spread from 0 to 4096 tokens (so that key
tiles per item range from 1 to ~34: the fit needs the spread), the kernel is timed as
``prefill_attention.py`` times it, then ``--reps`` stamped eager launches, the median-span one
kept; ``common.stamp_stats`` over the items gives the SM idle at the end and the start. No timing
assertion: a measurement for bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (device_info, env_var, matmul_flops, median_span_stamps, paged_pool, print_table,  # noqa: E402
                    results_path, stamp_stats, time_ms, write_json)
from prefill_attention import SHAPES, WGMMA_PLANS  # noqa: E402

SPREAD = (32, "spread", 256, 14, 2, 64)   # B, prefixes 0..4096 (spread), chunk, Hq, Hkv, D
KBN = 128                                 # key tile of the wgmma kernel (both head dims)
COLUMNS = [("B", "B", "d"), ("prefix", "prefix", "s"), ("chunk", "chunk", "d"), ("D", "D", "d"),
           ("plan", "plan", "s"), ("us", "us", ".1f"), ("frac_matmul", "/matmul", ".3f"),
           ("items", "items", "d"), ("item_us_median", "item us", ".2f"), ("short_items", "split items", "d"),
           ("short_item_us_median", "split item us", ".2f"),
           ("item_overhead_us", "overhead us", ".2f"), ("tile_us", "tile us", ".3f"),
           ("tile_us_floor", "tile floor", ".3f"), ("tile_over_floor", "tile/floor", ".2f"),
           ("gap_us", "gap us", ".2f"), ("sm_idle_start_fraction", "idle start", ".3f"),
           ("sm_idle_fraction", "idle end", ".3f")]


def rows_per_item(plan: str) -> int:
    return 192 if plan.startswith("wgmma3") else 128


def fit_items(s: torch.Tensor) -> dict:
    """Items' durations against their key tiles: least squares a + b x tiles, and the gaps between
    consecutive items of a CTA (by SM and start; persistent CTAs run one at a time per SM). Items
    whose key tiles were split (plans _ks: the tag's bit 20) are counted and timed apart
    (``short_items``, ``short_item_us_median``) and left out of the fit."""
    s = s[s[:, 1] > 0]
    split = ((s[:, 2] >> 52) & 1).bool()            # the tag's kStampKeySplit bit: a key-split item
    short = s[split]
    out = {"short_items": int(short.shape[0]),
           "short_item_us_median": float(((short[:, 1] - short[:, 0]).double() / 1e3).median()) if len(short) else None}
    s_all, s = s, s[~split]                         # the fit: the ordinary items
    if s.shape[0] == 0:                             # every item split (chunks of a few tokens): nothing to fit
        s = s_all
    dur = (s[:, 1] - s[:, 0]).double() / 1e3
    tiles = ((s[:, 2] >> 32) & 0xFFFFF).double()
    out.update({"items": int(s_all.shape[0]), "tiles_min": int(tiles.min()), "tiles_max": int(tiles.max()),
                "item_us_median": float(dur.median())})
    if int(tiles.max()) > int(tiles.min()):
        A = torch.stack([torch.ones_like(tiles), tiles], dim=1)
        sol = torch.linalg.lstsq(A, dur[:, None]).solution[:, 0]
        resid = dur - A @ sol
        out.update(item_overhead_us=float(sol[0]), tile_us=float(sol[1]),
                   fit_r2=float(1 - resid.pow(2).sum() / (dur - dur.mean()).pow(2).sum()))
    else:
        out.update(item_overhead_us=None, tile_us=float(dur.mean() / tiles.mean()), fit_r2=None)
    gaps, by_sm = [], {}
    for a, e, m in zip(s_all[:, 0].tolist(), s_all[:, 1].tolist(), (s_all[:, 2] & 0xFFFFFFFF).tolist()):
        by_sm.setdefault(m, []).append((a, e))
    for seq in by_sm.values():
        seq.sort()
        gaps += [(b[0] - a[1]) / 1e3 for a, b in zip(seq, seq[1:])]
    out["gap_us"] = statistics.median(gaps) if gaps else None
    return out


def item_row(shape, plan: str, flops: float, ms: float, mm: float, sms: int, st: dict, fit: dict) -> dict:
    """One table row: the shape (prefix "spread" for the batch of spread prefixes), the plan, the
    timed call, the items' stamp_stats ``st`` and fit_items ``fit``, and the tile's MMA floor."""
    B, prefix_spec, n, Hq, Hkv, D = shape
    tile_floor = 4.0 * rows_per_item(plan) * KBN * D / (mm / sms) * 1e6     # Q K^T + P V of one tile, one SM
    return {"B": B, "prefix": "0-4096" if prefix_spec == "spread" else str(prefix_spec), "chunk": n, "Hq": Hq,
            "Hkv": Hkv, "D": D, "plan": plan, "us": ms * 1e3, "frac_matmul": flops / (ms * 1e-3) / mm,
            "span_us": st["span_us"], "sm_idle_fraction": st["sm_idle_fraction"],
            "sm_idle_start_fraction": st["sm_idle_start_fraction"], **fit, "tile_us_floor": tile_floor,
            "tile_over_floor": fit["tile_us"] / tile_floor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default="wgmma_pp_ov_ps", help=f"comma list of wgmma plans ({', '.join(WGMMA_PLANS)})")
    ap.add_argument("--shapes", default="1", help="comma-separated indices into prefill_attention.SHAPES ('' for none)")
    ap.add_argument("--no-spread", action="store_true", help="without the batch of spread prefixes")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    assert plans and all(p in WGMMA_PLANS for p in plans), f"--plans takes some of {WGMMA_PLANS}, got {args.plans!r}"

    import oppo_runtime.ops  # noqa: F401  (loads torch.ops.oppo)
    from oppo_runtime.ops.attention import prefill_item_stamps, prefill_plan_head_dims, prefill_wgmma_available
    assert prefill_wgmma_available(), "the wgmma prefill kernel needs an sm_90a build on an sm_90 GPU"

    info = device_info()
    sms = info["sm_count"]
    mm = matmul_flops()
    print(f"{info['card']}  torch {info['torch']}  bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",") if i.strip()]
    if not args.no_spread:
        shapes.append(SPREAD)
    rows = []
    dtype = torch.bfloat16
    for (B, prefix_spec, n, Hq, Hkv, D) in shapes:
        G = Hq // Hkv
        prefixes = ([round(4096 * b / (B - 1)) for b in range(B)] if prefix_spec == "spread" else [prefix_spec] * B)
        ctx = max(prefixes) + n
        scale = D ** -0.5
        flops = sum(4.0 * D * Hq * (n * p + n * (n + 1) / 2) for p in prefixes)
        k_cache, v_cache, bt = paged_pool(B, ctx, Hkv, D, args.block_size, dtype)
        ctx_lens = torch.tensor([p + n for p in prefixes], dtype=torch.int32, device="cuda")
        cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device="cuda")
        q = torch.randn(B * n, Hq, D, device="cuda", dtype=dtype)
        out = torch.empty_like(q)
        for plan in plans:
            if D not in prefill_plan_head_dims(plan):
                continue
            if not prefill_wgmma_available(plan=plan):
                print(f"{plan}: switched off (OPPO_PREFILL_WGMMA_OFF)")
                continue
            bm = rows_per_item(plan)

            def run():
                with env_var("OPPO_PREFILL_PLAN", plan):
                    torch.ops.oppo.paged_prefill_attention(out, q, k_cache, v_cache, cu, ctx_lens, bt, scale, n)

            ms = time_ms(run)
            items = B * Hkv * -(-(n * G) // bm)
            with prefill_item_stamps(items) as stamps:
                s = median_span_stamps(run, stamps, args.reps)
            st = stamp_stats(s, sms)
            fit = fit_items(s)
            row = item_row((B, prefix_spec, n, Hq, Hkv, D), plan, flops, ms, mm, sms, st, fit)
            rows.append(row)
            print(f"B={B} prefix {row['prefix']} chunk {n} {Hq}/{Hkv}/{D} {plan}: {row['us']:.1f} us "
                  f"({row['frac_matmul']:.3f} of matmul), {fit['items']} items of {fit['tiles_min']}-{fit['tiles_max']} "
                  f"tiles: overhead {fit['item_overhead_us']} us + {fit['tile_us']:.3f} us/tile "
                  f"(floor {row['tile_us_floor']:.3f}, r2 {fit['fit_r2']}), gap {fit['gap_us']} us, SM idle end "
                  f"{st['sm_idle_fraction']:.3f} start {st['sm_idle_start_fraction']:.3f}", flush=True)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    print_table(rows, COLUMNS)
    path = results_path("prefill_stamps", args.out)
    write_json(path, {**info, "matmul_flops": mm, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
