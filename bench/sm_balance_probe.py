"""Where a one-wave memory-bound kernel loses its last 15%: per-SM finish times of a pure read stream.

    python bench/sm_balance_probe.py [--out PATH] [--kib 256] [--per-sm 4] [--waves 1,2,4,8]
                                     [--paged 32,64,128] [--paged-shape 32768,8,128] [--paged-configs 8:128:0,4:64:1]

ncu put decode attention's SMs at 83-84% active over its kernel (session 14): a wave of equal CTAs
whose SMs finish at different times. This probe asks whether that is the memory system's doing
(some SMs stream slower, e.g. by their place in the GPU's partitions) or the kernel's: a Triton
kernel in which every program reads an equal slice of a large buffer (no writes besides one float
per program) and stamps %smid and %globaltimer at its start and end. For each configuration
(programs = SMs x per-sm x waves, each reading KiB / waves, so every configuration reads the same
bytes), it reports the achieved read bandwidth over the copy bandwidth measured in the same run,
the spread of the SMs' last finish times, and the SM-idle fraction (the time between an SM's
last program's end and the kernel's end, summed over SMs, over SMs x the kernel's span), which
ncu's "SM Active Cycles / Elapsed Cycles" measures for the decode kernel. Per-SM finish times go
to the JSON (bench/results/sm_balance_probe.json) with the SM ids, so a pattern by partition
shows. No timing assertion: a measurement for bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_bandwidth, device_info, median_span_stamps, results_path, stamp_stats, time_ms,  # noqa: E402
                    write_json)


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def now():  # %globaltimer (ns), as a [1] tensor
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [tl.full([1], 0, tl.int32)],
                                         dtype=tl.int64, is_pure=False, pack=1)

    @triton.jit
    def stamp(stamps_ptr, pid, t0):  # row pid of stamps: start, end (now), %smid
        t1 = now()
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [tl.full([1], 0, tl.int32)], dtype=tl.int32,
                                       is_pure=False, pack=1)
        tl.store(stamps_ptr + pid * 3 + tl.arange(0, 1), t0)
        tl.store(stamps_ptr + pid * 3 + 1 + tl.arange(0, 1), t1)
        tl.store(stamps_ptr + pid * 3 + 2 + tl.arange(0, 1), sm.to(tl.int64))

    @triton.jit
    def stream_probe(x_ptr, out_ptr, stamps_ptr, chunk, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t0 = now()
        base = x_ptr + pid.to(tl.int64) * chunk
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, chunk, BLOCK):
            acc += tl.load(base + off + tl.arange(0, BLOCK), cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))
        stamp(stamps_ptr, pid, t0)

    @triton.jit
    def paged_probe(cache_ptr, bt_ptr, out_ptr, stamps_ptr, tokens, n_heads, page_stride, row_stride, v_off,
                    BS: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr, PREFETCH: tl.constexpr):
        # decode's reads without its arithmetic: program = (token range, kv head) of one sequence,
        # TILE-token K and V tiles gathered through the block table (rows of D elements); with
        # PREFETCH the next tile's loads are issued before the current one is used (two in flight)
        pid = tl.program_id(0)
        head = pid % n_heads
        t0 = (pid // n_heads) * tokens
        s0 = now()
        acc = tl.zeros([TILE, D], dtype=tl.float32)
        cols = tl.arange(0, D)
        if PREFETCH:
            tok = t0 + tl.arange(0, TILE)
            off = tl.load(bt_ptr + tok // BS).to(tl.int64) * page_stride + (tok % BS) * row_stride + head * D
            k = tl.load(cache_ptr + off[:, None] + cols[None, :], cache_modifier=".cg")
            v = tl.load(cache_ptr + v_off + off[:, None] + cols[None, :], cache_modifier=".cg")
            for t in range(t0 + TILE, t0 + tokens + TILE, TILE):
                tok = t + tl.arange(0, TILE)
                more = tok < t0 + tokens
                off = tl.load(bt_ptr + tok // BS, mask=more, other=0).to(tl.int64) * page_stride + \
                    (tok % BS) * row_stride + head * D
                kn = tl.load(cache_ptr + off[:, None] + cols[None, :], mask=more[:, None], other=0.0,
                             cache_modifier=".cg")
                vn = tl.load(cache_ptr + v_off + off[:, None] + cols[None, :], mask=more[:, None], other=0.0,
                             cache_modifier=".cg")
                acc += k.to(tl.float32) + v.to(tl.float32)
                k, v = kn, vn
        else:
            for t in range(t0, t0 + tokens, TILE):
                tok = t + tl.arange(0, TILE)
                page = tl.load(bt_ptr + tok // BS)
                off = page.to(tl.int64) * page_stride + (tok % BS) * row_stride + head * D
                k = tl.load(cache_ptr + off[:, None] + cols[None, :], cache_modifier=".cg")
                v = tl.load(cache_ptr + v_off + off[:, None] + cols[None, :], cache_modifier=".cg")
                acc += k.to(tl.float32) + v.to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
        stamp(stamps_ptr, pid, s0)

    return stream_probe, paged_probe


def _print(tag, row):
    print(f"{tag}: {row['programs']} programs, {row['ms'] * 1e3:.1f} us, read/copy {row['read_bw_over_copy']:.3f} "
          f"(span {row['span_us']:.1f} us), SMs finish {row['sm_finish_us_min']:.1f}-{row['sm_finish_us_max']:.1f} us "
          f"(median {row['sm_finish_us_median']:.1f}), SM idle {row['sm_idle_fraction']:.3f}, programs/SM "
          f"{row['programs_per_sm_min']}-{row['programs_per_sm_max']}, last start {row['last_start_us']:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kib", type=int, default=256, help="KiB each program reads in the one-wave configuration")
    ap.add_argument("--per-sm", type=int, default=4, help="programs per SM in one wave")
    ap.add_argument("--waves", default="1,2,4,8", help="split each program's slice into this many programs")
    ap.add_argument("--block", type=int, default=8192,
                    help="bf16 elements a program loads per loop step (16 KiB: 4 programs per SM keep 64 KiB in flight)")
    ap.add_argument("--paged", default="32,64,128",
                    help="also decode's paged reads (--paged-shape, 16-token shuffled pages) in this many splits "
                         "per kv head, for each of --paged-configs; empty: none")
    ap.add_argument("--paged-shape", default="32768,8,128",
                    help="tokens,Hkv,D of the paged reads (one table over all tokens: 262144,2,64 reads the bytes "
                         "of decode's (256, 1024, 14, 2, 64) with 256 splits)")
    ap.add_argument("--paged-configs", default="8:128:0",
                    help="comma list of warps:tile:prefetch for the paged reads (4:64:1 is decode v3's CTA: "
                         "128 threads, 64-token tiles, the next tile in flight)")
    ap.add_argument("--reps", type=int, default=5, help="stamped launches per configuration (the median one is kept)")
    args = ap.parse_args()
    info = device_info()
    sms = info["sm_count"]
    bw = copy_bandwidth()
    kern, paged = _kernel()
    total_elems = sms * args.per_sm * args.kib * 1024 // 2          # bf16
    x = torch.randn(total_elems, device="cuda").to(torch.bfloat16)
    rows = []
    for waves in [int(w) for w in args.waves.split(",")]:
        progs = sms * args.per_sm * waves
        chunk = total_elems // progs
        block = min(args.block, chunk)
        assert chunk % block == 0, (chunk, block)
        out = torch.empty(progs, device="cuda")
        stamps = torch.zeros(progs, 3, dtype=torch.int64, device="cuda")

        def run():
            kern[(progs,)](x, out, stamps, chunk, BLOCK=block, num_warps=4)

        ms = time_ms(run, graph=False)
        row = {"kind": "contiguous", "waves": waves, "programs": progs, "kib_per_program": args.kib / waves, "ms": ms,
               "read_bw_over_copy": total_elems * 2 / (ms * 1e-3) / bw,
               **stamp_stats(median_span_stamps(run, stamps, args.reps), sms)}
        rows.append(row)
        _print(f"contiguous, waves {waves} ({args.kib / waves:.0f} KiB each)", row)
    one = rows[0]["sm_finish_us_by_smid"]
    del x
    if args.paged:
        ctx, hkv, d = (int(v) for v in args.paged_shape.split(","))
        bs = 16
        pages = ctx // bs
        page_stride = 2 * bs * hkv * d
        cache = torch.randn(pages * page_stride, device="cuda").to(torch.bfloat16)
        bt = torch.randperm(pages, device="cuda").to(torch.int32)
        nbytes = 2 * ctx * hkv * d * 2
        for cfg in args.paged_configs.split(","):
            warps, tile, prefetch = (int(v) for v in cfg.split(":"))
            for splits in [int(v) for v in args.paged.split(",")]:
                tokens = ctx // splits
                progs = splits * hkv
                out = torch.empty(progs, device="cuda")
                stamps = torch.zeros(progs, 3, dtype=torch.int64, device="cuda")

                def run_paged():
                    paged[(progs,)](cache, bt, out, stamps, tokens, hkv, page_stride, hkv * d, bs * hkv * d,
                                    BS=bs, D=d, TILE=min(tile, tokens), PREFETCH=bool(prefetch), num_warps=warps)

                ms = time_ms(run_paged, calls_per_replay=10)
                row = {"kind": "paged", "shape": args.paged_shape, "config": cfg, "splits": splits, "programs": progs,
                       "tokens_per_program": tokens, "ms": ms, "read_bw_over_copy": nbytes / (ms * 1e-3) / bw,
                       **stamp_stats(median_span_stamps(run_paged, stamps, args.reps), sms)}
                rows.append(row)
                _print(f"paged ({ctx}, {hkv}, {d}) {cfg} (warps:tile:prefetch), {splits} splits", row)
    print("one wave, SM finish (us) by smid:", " ".join(f"{v:.0f}" for v in one))
    path = results_path("sm_balance_probe", args.out)
    write_json(path, {**info, "copy_bandwidth_Bps": bw, "rows": rows,
                      "summary": {"sm_idle_fraction_one_wave": rows[0]["sm_idle_fraction"],
                                  "best_read_bw_over_copy": max(r["read_bw_over_copy"] for r in rows
                                                                if r["kind"] == "contiguous"),
                                  "best_paged_read_bw_over_copy": max((r["read_bw_over_copy"] for r in rows
                                                                       if r["kind"] == "paged"), default=None)}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
