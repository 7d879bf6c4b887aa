"""Where a profiled PPO step's GPU time went, phase by phase, from its chrome trace.

    python bench/trace_phases.py bench/results/ppo_step_T_none_trace.json.gz [--top 12] [--prefix engine/,scorer/]

``bench/ppo_step.py --profile`` writes the trace of one step. The trainer opens a profiler range
``update/<phase>`` (old_logprob, actor, critic, optimizer) around each phase of the update; a
kernel belongs to the phase whose range, on the launching thread, holds its launch (the runtime
call with the kernel's correlation id). Per phase: the kernels' summed device time, the union of
their intervals (busy), the span from the first kernel's start to the last one's end, and the top
kernels by time. ``-`` holds everything launched outside the ranges (the rollout and the scorers).
A launch from another thread (autograd's backward threads) counts for the range open on any
thread of the process at that moment (the update's ranges do not overlap).

``--prefix engine/,scorer/`` splits the rollout instead: the actor engine opens ``engine/prefill``
or ``engine/decode`` around each step's launches, the rollout ``scorer/<name>`` around each scorer
call. Those run on two threads at once, so a launch counts only for a range of its own thread.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
from collections import defaultdict

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def phases(events: list[dict], prefix: str | tuple[str, ...] = "update/", any_thread: bool = True
           ) -> dict[str, dict]:
    """phase -> {"kernel_us", "busy_us", "span_us", "count", "top": [(name, us, count)]}. A phase is
    a range name less its prefix (with several prefixes: the name whole). ``any_thread``: a launch
    outside its thread's ranges counts for a range open on another thread."""
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    cut = len(prefixes[0]) if len(prefixes) == 1 else 0
    ranges = defaultdict(list)          # (pid, tid) -> sorted [(start, end, name)]
    launches = {}                       # correlation -> (pid, tid, ts)
    gpu = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat == "user_annotation" and e.get("name", "").startswith(prefixes):
            ranges[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"][cut:]))
        elif cat == "cuda_runtime" or cat == "cuda_driver":
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches[corr] = (e["pid"], e["tid"], e["ts"])
        elif cat in GPU_CATS:
            gpu.append(e)
    starts = {k: [r[0] for r in sorted(v)] for k, v in ranges.items()}
    ranges = {k: sorted(v) for k, v in ranges.items()}

    def phase_of(corr) -> str:
        hit = launches.get(corr)
        if hit is None:
            return "-"
        pid, tid, ts = hit
        keys = [(pid, tid)] + ([k for k in ranges if k[0] == pid and k != (pid, tid)] if any_thread else [])
        for k in keys:              # the launching thread's own range first, then any other thread's
            rs = ranges.get(k)
            if not rs:
                continue
            i = bisect.bisect_right(starts[k], ts) - 1
            if i >= 0 and rs[i][0] <= ts <= rs[i][1]:
                return rs[i][2]
        return "-"

    out: dict[str, dict] = {}
    per = defaultdict(list)
    names = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e in gpu:
        ph = phase_of(e.get("args", {}).get("correlation"))
        a, d = float(e["ts"]), float(e.get("dur", 0))
        per[ph].append((a, a + d))
        n = names[ph][e.get("name", "?")]
        n[0] += d
        n[1] += 1
    for ph, iv in per.items():
        top = sorted(((k, v[0], v[1]) for k, v in names[ph].items()), key=lambda t: -t[1])
        out[ph] = {"kernel_us": sum(b - a for a, b in iv), "busy_us": _union(iv),
                   "span_us": max(b for _, b in iv) - min(a for a, _ in iv), "count": len(iv), "top": top}
    return out


def report(res: dict[str, dict], top: int = 12) -> str:
    lines = ["| phase | kernels | kernel ms | busy ms | span ms | busy/span |", "| --- | --- | --- | --- | --- | --- |"]
    for ph, r in sorted(res.items(), key=lambda kv: -kv[1]["span_us"]):
        lines.append(f"| {ph} | {r['count']} | {r['kernel_us'] / 1e3:.2f} | {r['busy_us'] / 1e3:.2f} | "
                     f"{r['span_us'] / 1e3:.2f} | {r['busy_us'] / max(r['span_us'], 1e-9):.2f} |")
    for ph, r in res.items():
        lines.append(f"\n{ph}: top kernels (ms, count)")
        for name, us, cnt in r["top"][:top]:
            lines.append(f"  {us / 1e3:9.3f} {cnt:6d}  {name[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--prefix", default="update/",
                    help="comma-separated range prefixes (default update/; e.g. engine/,scorer/: own thread only)")
    args = ap.parse_args(argv)
    prefixes = tuple(p for p in args.prefix.split(",") if p)
    print(report(phases(load(args.trace), prefixes, any_thread=prefixes == ("update/",)), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
