"""Where decode attention's time goes, CTA by CTA: start and end times and SM ids of every CTA of
the split kernel (``ops.attention.decode_cta_stamps``), per shape and plan.

    python bench/decode_stamps.py [--plans v3,v6] [--shapes 0,1,2,3,4] [--engine] [--reps 5]
                                  [--layers 1,24] [--l2 warm,cold] [--pages shuffled,engine] [--out PATH]

ncu put decode v3's SMs at 83-84% active on (1, 32768) and (256, 1024) (session 14) and a read
probe without arithmetic reached 0.94-0.95 of copy where v3 reaches 0.66-0.77 (session 15), but
neither says whether the lost time is the launch's ramp (SMs that start late), the end (SMs that
finish early and wait for the last CTAs), or every CTA streaming slower. This does, on the kernel
itself. For each of issue 7's shapes (``--engine``: also the engine's decode batch of Qwen2.5-0.5B
at B=256 and 384 tokens, the mean of its 128 + 512 steps) and plan: the kernel timed as
``decode_attention.py`` times it (graph replays; us and fraction of the copy bandwidth measured in
this run), then ``--reps`` stamped eager launches, of which the one of median span is kept
(``common.stamp_stats``): span, the SM-idle fractions at the end and at the start, CTA durations
(p10 / median / p90 / max), the median CTA duration by its SM's CTA count, and ``outside_us`` =
timed us - span (the launch, the split reduction, graph gaps). ``active_frac_copy``: the bytes
over the time SMs held CTAs (span x (1 - both idle fractions)), over copy: the streaming rate
while active. With ``+pdl`` (programmatic dependent launch) a CTA's start is when it was scheduled,
before its wait for the kernel ahead (in the stamped eager launches that kernel is the stamps'
zeroing, which does not release it early). No timing assertion: a measurement for bench/NOTES.md.

Two conditions of the engine that a loop of one kernel does not have, as variants of each row:
``--layers 24``: the engine's pages, which hold every layer's K and V (a page stride 24x larger,
over a pool 24x larger: more DRAM pages and TLB reach per byte read); ``--l2 cold``: each call
(timed and stamped) after an L2 flush, as in the engine where GEMMs run between the attention
calls (a loop finds part of the last call's bytes in L2: at B=256, ctx 384 the 50 MB read is the
H100's L2 size); ``--pages engine``: page ids as the engine's pool hands them out to a batch that
prefilled 128-token prompts together and decodes in lockstep (common.paged_pool's engine_prompt),
not shuffled: concurrent CTAs then read pages at regular strides.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (L2Flush, copy_bandwidth, device_info, median_span_stamps, paged_pool, print_table, results_path,  # noqa: E402
                    stamp_stats, time_ms, write_json)
from decode_attention import _SPLIT_PLAN, SHAPES, plan_env  # noqa: E402

ENGINE = (256, 384, 14, 2, 64)   # --engine: bench/engine.py's Qwen2.5-0.5B batch at its mean context
COLUMNS = [("B", "B", "d"), ("ctx", "ctx", "d"), ("Hq", "Hq", "d"), ("Hkv", "Hkv", "d"), ("D", "D", "d"),
           ("plan", "plan", "s"), ("layers", "layers", "d"), ("l2", "L2", "s"), ("pages", "pages", "s"), ("us", "us", ".1f"), ("frac_copy_bw", "/copy", ".3f"),
           ("span_us", "span us", ".1f"), ("outside_us", "outside us", ".1f"), ("ctas", "CTAs", "d"),
           ("sm_idle_start_fraction", "idle start", ".3f"), ("sm_idle_fraction", "idle end", ".3f"),
           ("active_frac_copy", "active/copy", ".3f"), ("last_start_us", "last start us", ".1f"),
           ("cta_us_p10", "CTA p10", ".1f"), ("cta_us_median", "CTA p50", ".1f"),
           ("cta_us_p90", "CTA p90", ".1f"), ("cta_us_max", "CTA max", ".1f"), ("sm_mhz_median", "SM MHz", ".0f")]


def cta_row(shape, plan: str, nbytes: int, ms: float, bw: float, st: dict) -> dict:
    """One table row: the shape, the plan, the timed call and its stamps' stamp_stats ``st``."""
    B, ctx, Hq, Hkv, D = shape
    row = {"B": B, "ctx": ctx, "Hq": Hq, "Hkv": Hkv, "D": D, "plan": plan, "bytes": nbytes,
           "us": ms * 1e3, "frac_copy_bw": nbytes / (ms * 1e-3) / bw, **st, "outside_us": ms * 1e3 - st["span_us"]}
    active = st["span_us"] * (1 - st["sm_idle_fraction"] - st["sm_idle_start_fraction"])
    row["active_frac_copy"] = nbytes / (active * 1e-6) / bw if active > 0 else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default="v3+l2", help="comma list of split-kernel plans (v2, v3, v6, v7; +pdl: with "
                                                  "programmatic dependent launch; +l2, +l2x2: with the L2 prefetch of 1 or 2 "
                                                  "tiles, none without; default: the runtime's, v3+l2)")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into decode_attention.SHAPES")
    ap.add_argument("--engine", action="store_true", help="also the engine's Qwen2.5-0.5B decode batch (B=256, ctx 384)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", default="1", help="comma list: layers per page (the engine's Qwen2.5-0.5B pages: 24)")
    ap.add_argument("--l2", default="warm", help="comma list of warm (a loop of the kernel) and cold (an L2 flush "
                                                "before each call)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--pages", default="shuffled", help="comma list of shuffled and engine (page ids in the engine "
                                                       "pool's order)")
    args = ap.parse_args()
    page_list = [x.strip() for x in args.pages.split(",") if x.strip()]
    assert page_list and set(page_list) <= {"shuffled", "engine"}, f"--pages takes shuffled and/or engine, got {args.pages!r}"
    layer_list = [int(x) for x in args.layers.split(",") if x.strip()]
    l2_list = [x.strip() for x in args.l2.split(",") if x.strip()]
    assert layer_list and all(n >= 1 for n in layer_list), f"--layers takes positive integers, got {args.layers!r}"
    assert l2_list and set(l2_list) <= {"warm", "cold"}, f"--l2 takes warm and/or cold, got {args.l2!r}"
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    assert plans and all(_SPLIT_PLAN.fullmatch(p) and p != "v4" for p in plans), \
        f"--plans takes v2/v3/v6/v7, each also with +pdl, +l2 or +l2x2, +lo, +rf, got {args.plans!r}"

    import oppo_runtime.ops  # noqa: F401  (loads torch.ops.oppo)
    from oppo_runtime.ops.attention import decode_cta_stamps, paged_decode_workspace

    info = device_info()
    sms = info["sm_count"]
    bw = copy_bandwidth()
    print(f"{info['card']}  torch {info['torch']}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.engine:
        shapes = [*shapes, ENGINE]
    rows = []
    flusher = L2Flush() if "cold" in l2_list else None
    for (B, ctx, Hq, Hkv, D), layers, pages in ((sh, n, pg) for sh in shapes for n in layer_list for pg in page_list):
        dtype = torch.bfloat16
        k_cache, v_cache, bt = paged_pool(B, ctx, Hkv, D, args.block_size, dtype, layers=layers,
                                          engine_prompt=128 if pages == "engine" else 0)
        ctx_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
        out = torch.empty_like(q)
        scale = D ** -0.5
        nbytes = 2 * B * ctx * Hkv * D * q.element_size() + 2 * q.numel() * q.element_size()
        for plan, l2 in ((p, c) for p in plans for c in l2_list):
            cold = flusher if l2 == "cold" else None
            with plan_env(plan):
                ws = paged_decode_workspace(q, k_cache, bt, backend="cuda")

                def run():
                    torch.ops.oppo.paged_decode_attention(out, q, k_cache, v_cache, bt, ctx_lens, scale, ws)

                def stamped():
                    if cold is not None:
                        cold.flush()
                    run()

                ms = time_ms(run, cold_l2=cold)
                # room for every CTA of any split plan of this shape: splits of >= 256 tokens
                # (the launcher's minimum partition) x Hkv x head chunks of 16 x B
                cap = B * Hkv * -(-(Hq // Hkv) // 16) * -(-ctx // 256)
                with decode_cta_stamps(cap) as stamps:
                    st = stamp_stats(median_span_stamps(stamped, stamps, args.reps), sms, clock_tag=True)
            row = {**cta_row((B, ctx, Hq, Hkv, D), plan, nbytes, ms, bw, st), "layers": layers, "l2": l2, "pages": pages}
            rows.append(row)
            print(f"B={B} ctx={ctx} {Hq}/{Hkv}/{D} {plan} layers={layers} L2 {l2} pages {pages}: {row['us']:.1f} us "
                  f"({row['frac_copy_bw']:.3f} of copy), "
                  f"span {st['span_us']:.1f}, {st['ctas']} CTAs, SM idle end {st['sm_idle_fraction']:.3f} "
                  f"start {st['sm_idle_start_fraction']:.3f}, CTA us {st['cta_us_min']:.1f}/{st['cta_us_median']:.1f}/"
                  f"{st['cta_us_max']:.1f}, by SM load {st['cta_us_by_load']}, SM clock {st.get('sm_mhz_median', float('nan')):.0f} MHz",
                  flush=True)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    print_table(rows, COLUMNS)
    path = results_path("decode_stamps", args.out)
    write_json(path, {**info, "copy_bandwidth_Bps": bw, "rows": rows,
                      "summary": {"max_sm_idle_fraction": max(r["sm_idle_fraction"] for r in rows),
                                  "max_sm_idle_start_fraction": max(r["sm_idle_start_fraction"] for r in rows)}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
