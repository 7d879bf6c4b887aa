"""Where a decode call's time goes inside its CTAs: per-tile stamps (``ops.attention.decode_tile_stamps``).

    python bench/decode_tiles.py [--shapes 1,4] [--plans v7+l2] [--bin-us 2] [--out PATH] [--raw DIR] [--probe N]

Session 33 (H100) put issue 7's two 135 MB shapes at ~9 us over their bytes at the copy rate, a cost
that does not grow with the context, and found that balancing the splits' tiles across SMs moved
none of it. This bench times each shape's call as the decode bench does (graph replays of 10 calls),
then replays the same graph once with the tile stamps on, so the stamped call is one of a stream of
calls (its predecessor's tail before it), and reads from its CTAs:
- ramp: each CTA's start to its first tile landed, and the time until half / all of the CTAs had
  one (from the first CTA's start);
- steady: the median interval between a CTA's tiles landing;
- end: the last tile landed to the loop's end, the partial's stores, and the merge (ticket and the
  group's partials) of the CTAs that merged;
- the rate over time: the K/V bytes of the tiles that landed in each ``--bin-us`` bin, over the
  copy rate measured in the same run (the first and last bins are the ramp and the drain);
- outside: the stamped graph's time per call minus the stamped call's span (launch and the gap
  between); the start spread (the last CTA's start) and each CTA's start to its loads issued;
- with ``--probe N``: a DRAM latency probe (bench/dram_probe.py) chasing pointers beside one more
  replay: the memory system's queue over the last call's life (busy: the chase waits in the queue;
  idle: its unloaded latency), so the ramp and the end can be read as DRAM-bound or not.
The stamped kernel is its own instantiation (bf16, heads as N): its output is the plain kernel's bit
for bit (tests/test_attention_gpu.py). No timing assertion: a measurement for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_bandwidth, device_info, events_ms, paged_pool, print_table, results_path, time_ms,  # noqa: E402
                    write_json)
from decode_attention import _SPLIT_PLAN, parse_shape, plan_env  # noqa: E402

START, ISSUED, LANDED, LOOP_END, STORED, END = range(6)


def _pct(vals: list[float], p: float) -> float | None:
    if not vals:
        return None
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(p * len(vals)))]


def analyse(st: torch.Tensor, tile_bytes: list[list[int]], bw: float, bin_us: float) -> dict:
    """st [ctas, rows per CTA, 3] (ns, event | tile << 8, SM); tile_bytes[c][t]: the K/V bytes of CTA c's tile t."""
    t0 = min(int(r[0, 0]) for r in st if int(r[0, 0]) > 0)
    ramp, steady, tail_loop, tail_store, merge, first, lasts, ends, landed = [], [], [], [], [], [], [], [], []
    starts, issue, truncated = [], [], 0
    for c, r in enumerate(st):
        ev = {}
        tiles = []
        for ns, tag, _ in r.tolist():
            if ns == 0:
                break
            e, tile = tag & 0xFF, tag >> 8
            if e == LANDED:
                tiles.append((tile, (ns - t0) / 1e3))
            else:
                ev[e] = ((ns - t0) / 1e3, tile)
        if START not in ev or END not in ev:
            continue                                  # a split past its context
        start = ev[START][0]
        starts.append(start)
        ends.append(ev[END][0])
        if ISSUED in ev:
            issue.append(ev[ISSUED][0] - start)
        truncated += len(tiles) < len(tile_bytes[c])
        if tiles:
            ramp.append(tiles[0][1] - start)
            first.append(tiles[0][1])
            lasts.append(tiles[-1][1])
            steady += [b[1] - a[1] for a, b in zip(tiles, tiles[1:])]
            tail_loop.append(ev[LOOP_END][0] - tiles[-1][1])
            landed += [(at, tile_bytes[c][t] if t < len(tile_bytes[c]) else 0) for t, at in tiles]
        tail_store.append(ev[STORED][0] - ev[LOOP_END][0])
        if ev[END][1] == 1:
            merge.append(ev[END][0] - ev[STORED][0])
    if not ends:
        raise ValueError("no CTA wrote both its start and its end: were the stamps on for this launch?")
    span = max(ends)
    nbins = int(span / bin_us) + 1
    bins = [0.0] * nbins
    for at, nb in landed:
        bins[min(nbins - 1, int(at / bin_us))] += nb
    rate = [b / (bin_us * 1e-6) / bw for b in bins]
    return {"span_us": span, "ctas": len(ends), "tiles_dropped_ctas": truncated,
            "start_us_p50": _pct(starts, 0.5), "start_us_max": max(starts), "issued_us_p50": _pct(issue, 0.5),
            "ramp_us_p10": _pct(ramp, 0.1), "ramp_us_p50": _pct(ramp, 0.5), "ramp_us_max": max(ramp, default=None),
            "first_tile_half_us": _pct(first, 0.5), "first_tile_all_us": max(first, default=None),
            "tile_interval_us_p50": _pct(steady, 0.5), "tile_interval_us_p90": _pct(steady, 0.9),
            "last_tile_us_p10": _pct(lasts, 0.1), "last_tile_us_p50": _pct(lasts, 0.5), "last_tile_us_max": max(lasts, default=None),
            "last_tile_to_loop_end_us_p50": _pct(tail_loop, 0.5), "store_us_p50": _pct(tail_store, 0.5),
            "merges": len(merge), "merge_us_p50": _pct(merge, 0.5), "merge_us_max": max(merge, default=None),
            "end_us_p50": _pct(ends, 0.5), "bin_us": bin_us, "rate_frac_copy_bw_by_bin": rate}


def probe_reading(st: torch.Tensor, pout: torch.Tensor, period_us: float, bin_us: float) -> dict:
    """The DRAM probe's chase loads against the stamped call (``st``, the last of the graph's ten):
    their median latency per ``bin_us`` bin from 4 us before the call's first CTA start to 6 us past
    its last CTA end, and the median of the loads issued more than a call's ``period_us`` after the
    graph's end (an idle DRAM)."""
    import dram_probe

    starts = [int(r[0, 0]) for r in st if int(r[0, 0]) > 0]
    ends = [int(ns) for r in st for ns, tag, _ in r.tolist() if ns > 0 and (tag & 0xFF) == END]
    t0 = min(starts)
    span = (max(ends) - t0) / 1e3
    samples = dram_probe.read(pout, t0)
    idle = sorted(lat for at, lat in samples if at > span + period_us)
    lo, hi = -4.0, span + 6.0
    return {"probe_idle_us": round(idle[len(idle) // 2], 3) if idle else None, "probe_from_us": lo,
            "probe_samples": sum(1 for at, _ in samples if 0 <= at < span),
            "probe_latency_us_by_bin": dram_probe.by_bin(samples, lo, hi, bin_us)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1,4", help="indices into decode_attention.SHAPES or BxCTXxHQxHKVxD")
    ap.add_argument("--plans", default="v7+l2", help="comma list of split-kernel plans (decode_attention.py's names)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--bin-us", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--probe", type=int, default=0, metavar="N",
                    help="N > 0: replay the stamped graph once more beside a DRAM latency probe of N chase loads "
                         "(bench/dram_probe.py) and read its latency per --bin-us bin of the last call's span")
    ap.add_argument("--raw", default=None, help="a folder: each (shape, plan)'s stamps as .npy (int64 [ctas, rows, 3]) "
                    "and its tiles' bytes as .json, for reading offline")
    args = ap.parse_args()
    plans = [p for p in args.plans.split(",") if p]
    assert plans and all(_SPLIT_PLAN.fullmatch(p) and p != "v4" for p in plans), f"--plans: split plans, got {plans}"
    assert torch.cuda.is_available(), "decode_tiles needs a CUDA device"
    import oppo_runtime.ops  # noqa: F401  (loads torch.ops.oppo)
    from oppo_runtime.ops.attention import (TILE_STAMP_ROWS as ROWS, decode_tile_stamps, paged_decode_plan,
                                            paged_decode_resident_ctas, paged_decode_workspace)

    probe = nxt = None
    if args.probe > 0:
        import dram_probe
        probe, nxt = dram_probe.build(), dram_probe.chase_buffer()
    info = device_info()
    bw = copy_bandwidth()
    print(f"{info['card']}  torch {info['torch']}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for spec in args.shapes.split(","):
        B, ctx, Hq, Hkv, D = parse_shape(spec)
        k_cache, v_cache, bt = paged_pool(B, ctx, Hkv, D, args.block_size, torch.bfloat16)
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        nbytes = 2 * B * ctx * Hkv * D * 2 + 2 * q.numel() * 2
        for plan in plans:
            with plan_env(plan):
                ws = paged_decode_workspace(q, k_cache, bt, backend="cuda")
                call = lambda: torch.ops.oppo.paged_decode_attention(out, q, k_cache, v_cache, bt, lens, D ** -0.5, ws)  # noqa: E731
                # twice, the lower kept: the first timing of a process read 58-61 us where the
                # same kernel reads ~53.7 after it (session 34; the stamped replay did not)
                ms = min(time_ms(call), time_ms(call))
                splits, part = paged_decode_plan(B, Hq, Hkv, D, bt.shape[1] * args.block_size, info["sm_count"],
                                                 paged_decode_resident_ctas(D))
                groups = Hkv * -(-(Hq // Hkv) // 16)
                ctas = splits * groups * B
                tile_bytes = []
                for c in range(ctas):
                    split = c // (groups * B)
                    start = split * part if splits > 1 else 0
                    end = min(ctx, start + part) if splits > 1 else ctx
                    n = max(0, end - start)
                    tile_bytes.append([2 * min(64, n - 64 * t) * D * 2 for t in range(-(-n // 64))])
                # the stamped kernel is its own instantiation: captured while the stamps are on
                with decode_tile_stamps(ctas * ROWS) as stamps:
                    for _ in range(3):
                        call()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for _ in range(10):
                            call()
                    g.replay()
                    torch.cuda.synchronize()
                    g.replay()                 # the last of the ten calls' stamps stay
                    torch.cuda.synchronize()
                    st = stamps.cpu().view(ctas, ROWS, 3)
                    g.replay()
                    torch.cuda.synchronize()
                    st2 = stamps.cpu().view(ctas, ROWS, 3)
                    stamped_us = events_ms(g.replay, n=5) * 1e3 / 50    # 5 replays of 10 calls
                    probed = None
                    if probe is not None:   # the chase on a side stream first, the ten calls beside it
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            pout = dram_probe.launch(probe, nxt, args.probe)
                        g.replay()
                        torch.cuda.synchronize()
                        probed = (stamps.cpu().view(ctas, ROWS, 3), pout)
                    del g
            if args.raw:
                import json

                import numpy as np
                raw = Path(args.raw)
                raw.mkdir(parents=True, exist_ok=True)
                stem = f"{B}x{ctx}x{Hq}x{Hkv}x{D}_{plan.replace('+', '_')}"
                np.save(raw / f"{stem}.npy", st.numpy())
                (raw / f"{stem}.json").write_text(json.dumps({"tile_bytes": tile_bytes, "copy_bandwidth_Bps": bw,
                                                              "us": ms * 1e3, "stamped_us": stamped_us}))
            a = analyse(st, tile_bytes, bw, args.bin_us)
            a2 = analyse(st2, tile_bytes, bw, args.bin_us)
            if probed is not None:
                a.update(probe_reading(*probed, stamped_us, args.bin_us))
            row = {"B": B, "ctx": ctx, "Hq": Hq, "Hkv": Hkv, "D": D, "plan": plan, "splits": splits, "bytes": nbytes,
                   "us": ms * 1e3, "frac_copy_bw": nbytes / (ms * 1e-3) / bw, "floor_us": nbytes / bw * 1e6, **a,
                   "stamped_us": stamped_us, "outside_us": stamped_us - a["span_us"],
                   "again": {k: a2[k] for k in ("span_us", "ramp_us_p50", "merge_us_p50", "last_tile_us_max")}}
            rows.append(row)
            print(f"  {B}x{ctx} {Hq}/{Hkv}/{D} {plan}: {row['us']:.1f} us ({stamped_us:.1f} stamped), span "
                  f"{a['span_us']:.1f}, rate by "
                  f"{args.bin_us:g} us: " + " ".join(f"{x:.2f}" for x in a["rate_frac_copy_bw_by_bin"]))
            if "probe_latency_us_by_bin" in a:
                print(f"    DRAM probe: idle {a['probe_idle_us']}, {a['probe_samples']} loads in the call; latency by "
                      f"{args.bin_us:g} us from {a['probe_from_us']:g}: "
                      + " ".join("-" if x is None else f"{x:.2f}" for x in a["probe_latency_us_by_bin"]))
        del k_cache, v_cache
        torch.cuda.empty_cache()
    print_table(rows, [("B", "B", "d"), ("ctx", "ctx", "d"), ("D", "D", "d"), ("plan", "plan", "s"), ("us", "us", ".1f"),
                       ("floor_us", "floor us", ".1f"), ("stamped_us", "stamped", ".1f"), ("span_us", "span", ".1f"),
                       ("outside_us", "outside", ".1f"), ("start_us_max", "last start", ".2f"),
                       ("issued_us_p50", "issued p50", ".2f"),
                       ("ramp_us_p50", "ramp p50", ".2f"), ("first_tile_all_us", "all started", ".2f"),
                       ("tile_interval_us_p50", "tile p50", ".2f"), ("last_tile_us_p10", "last tile p10", ".1f"),
                       ("last_tile_us_max", "last tile max", ".1f"), ("last_tile_to_loop_end_us_p50", "to loop end", ".2f"),
                       ("store_us_p50", "store", ".2f"), ("merge_us_p50", "merge p50", ".2f"), ("merge_us_max", "merge max", ".2f")])
    write_json(results_path("decode_tiles", args.out), {**info, "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
