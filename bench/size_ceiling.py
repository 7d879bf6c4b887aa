"""What a memory-bound call of a given size can reach on this card: the physical ceiling by size.

    python bench/size_ceiling.py [--sizes-mb 16,32,67,134,268,537,1074,4295] [--out PATH]

Issue 7's decode target is a fraction of the copy bandwidth, which `common.copy_bandwidth` measures
on a 4 GiB copy, where a call's fixed costs (the launch gap between a graph's kernels, the ramp
before DRAM streams, the drain after the last byte) vanish. Its two small shapes move 134-135 MB in
~50 us, where they do not. This probe times, at each size and the same way as the attention benches
(graph replays of 10 calls, the median of 15), three calls every kernel of that size competes with:
a device-to-device copy (`copy_`, half the bytes read and half written), a read-only reduction of
the bytes (`torch.amax` over bf16, one float out per 32768 elements: reads only, like decode), and
a write-only fill. Each is reported as bytes moved per second over the 4 GiB copy's rate measured in
the same run, so the table says which fraction of that rate a call of the size can reach at all.
No timing assertion: a measurement for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_info, print_table, results_path, time_ms, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="16,32,67,134,268,537,1074,4295",
                    help="comma list of bytes moved per call, in MB (10^6)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "size_ceiling needs a CUDA device"
    info = device_info()
    bw = copy_bandwidth()
    print(f"{info['card']}  torch {info['torch']}  copy bandwidth {bw / 1e12:.2f} TB/s (4 GiB, read + write)")
    rows = []
    for mb in (float(x) for x in args.sizes_mb.split(",") if x.strip()):
        nbytes = int(mb * 1e6) // 1024 * 1024
        n = nbytes // 2                                  # bf16 elements moved
        src = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
        a = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").uniform_()   # the copy: a -> b, as
        b = torch.empty_like(a)                                                  # decode_attention.py's column
        red = torch.empty(n // 32768, dtype=torch.bfloat16, device="cuda")
        view = src[: (n // 32768) * 32768].view(-1, 32768)
        row = {"mb": nbytes / 1e6}
        for name, fn, moved in (
                ("copy", lambda: b.copy_(a), 2 * (n // 2) * 2),   # n/2 read + n/2 written
                ("read", lambda: torch.amax(view, dim=1, out=red), view.numel() * 2),
                ("write", lambda: src.fill_(1.0), n * 2)):
            ms = min(time_ms(fn, calls_per_replay=10, reps=15, graph=g) for g in (True, False))
            row[f"{name}_us"] = ms * 1e3
            row[f"{name}_frac_copy_bw"] = moved / (ms * 1e-3) / bw
        del src, a, b, red, view
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"  done {row['mb']:.0f} MB: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items() if k != "mb"))
    print_table(rows, [("mb", "MB moved", ".0f"), ("copy_us", "copy us", ".1f"), ("copy_frac_copy_bw", "copy/4GiB copy", ".3f"),
                       ("read_us", "read us", ".1f"), ("read_frac_copy_bw", "read/4GiB copy", ".3f"),
                       ("write_us", "write us", ".1f"), ("write_frac_copy_bw", "write/4GiB copy", ".3f")])
    write_json(results_path("size_ceiling", args.out), {**info, "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
