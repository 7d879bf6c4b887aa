"""Shared pieces of the microbenchmarks: timing with CUDA events (over CUDA-graph replays where
the callable allows it), the two ceilings measured in the same run (device-to-device copy
bandwidth, bf16 matmul rate), a paged KV pool, and JSON output that records date, card and
command.

    ms = time_ms(fn)                      # median ms per call
    bw = copy_bandwidth()                 # bytes/s, read + written
    fl = matmul_flops()                   # FLOP/s of a large bf16 matmul on random data
    write_json(path, {"rows": rows, "summary": {...}})
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

__all__ = ["attention_bench_setup", "time_ms", "L2Flush", "copy_bandwidth", "matmul_flops", "device_info", "write_json", "print_table",
           "paged_pool", "results_path"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"



def lognormal_lengths(n: int, median: float, cap: int, seed: int = 0) -> list[int]:
    """Response lengths lognormal (sigma 1) around ``median``, in [1, cap]: intra_overlap's and
    rollout_probe's workload (one torch draw, so both time the same lengths)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    return [int(min(cap, max(1, round(math.exp(math.log(median) + 1.0 * float(x)))))) for x in z]

def _sync():
    torch.cuda.synchronize()


def events_ms(fn: Callable[[], object], n: int = 1) -> float:
    """Device milliseconds of ``n`` back-to-back calls of ``fn``, between two CUDA events recorded
    on the current stream (the host waits for the second)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def _warm(fn: Callable[[], object], ms: float) -> None:
    """Calls of ``fn`` until they have kept the device busy for ``ms`` (device time, by events; in
    batches that double, so the host never queues much more than that): a card that idled, e.g.
    while the previous shape compiled FlexAttention on the CPU, is back at its working clocks
    before the clock starts (the likely reason why the first kernel timed after such a pause read
    13% slow: decode v3 at (1, 32768) on an H100, session 13, 64.9 us, and 57.1 us for the same
    plan later in the same shape's block; decode_attention.py's repeat of its first plan shows
    whether a spread remains)."""
    spent, n = 0.0, 1
    while spent < ms:
        spent += events_ms(fn, n)
        n = min(2 * n, 1024)


class L2Flush:
    """Evicts the L2 cache by reading a buffer of twice its size (a read, not a write: dirty lines
    left by a write would be written back during the timed kernel, DRAM traffic that is not its own).
    ``flush()`` is capturable (time_ms's ``cold_l2`` times it alone and subtracts it)."""

    def __init__(self):
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        self.buf = torch.ones(1024, max(1, (2 * l2) // 4096), device="cuda", dtype=torch.float32)
        self.out = torch.empty(1024, device="cuda", dtype=torch.float32)

    def flush(self) -> None:
        torch.sum(self.buf, dim=1, out=self.out)


def time_ms(fn: Callable[[], object], *, calls_per_replay: int = 10, reps: int = 15, warmup: int = 3,
            graph: bool = True, warmup_ms: float = 30.0, cold_l2: L2Flush | None = None) -> float:
    """Median milliseconds of one call of ``fn``.

    ``cold_l2``: each call preceded by that L2 flush, and the flush's own median time (timed the
    same way) subtracted: ``fn`` as it runs between other kernels whose bytes filled the L2 (the
    engine's decode attention runs between GEMMs), not as a loop that finds last call's bytes there.

    With ``graph`` the calls are captured ``calls_per_replay`` times into one CUDA graph and each
    timed replay is divided by that count (no launch gaps); if capture fails, eager calls are
    timed instead. Events bracket each replay; the median over ``reps`` replays is returned.
    Before anything is timed: ``warmup`` calls, then calls for ``warmup_ms`` of device time
    (``_warm``).
    """
    if cold_l2 is not None:
        kw = dict(calls_per_replay=calls_per_replay, reps=reps, warmup=warmup, graph=graph, warmup_ms=warmup_ms)

        def pair():
            cold_l2.flush()
            fn()
        return time_ms(pair, **kw) - time_ms(cold_l2.flush, **kw)
    for _ in range(warmup):
        fn()
    _sync()
    if warmup_ms > 0:
        _warm(fn, warmup_ms)
    run = None
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            _sync()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(calls_per_replay):
                    fn()
            run = g.replay
            run()
            _sync()
        except Exception as e:  # noqa: BLE001 (some callables cannot be captured: time them eagerly)
            print(f"  (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}; timing eagerly)")
            run = None
            _sync()
    if run is None:
        def run():
            for _ in range(calls_per_replay):
                fn()
        run()
        _sync()
    return statistics.median(events_ms(run) / calls_per_replay for _ in range(reps))


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    # Timed both eagerly and as graph replays, the faster kept: on an H100 (2026-11-25) the
    # graph-captured copy_ (a memcpy node) gave 2.45 TB/s while contiguous SDPA read ~3.0 TB/s in
    # the same run, so a graph-only copy understates the ceiling.
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = min(time_ms(lambda: dst.copy_(src), calls_per_replay=5, reps=10, graph=g) for g in (False, True))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def matmul_flops(n: int = 8192) -> float:
    """bf16 matmul rate (FLOP/s) of an n x n x n product on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.mm(a, b, out=c), calls_per_replay=5, reps=10)
    return 2 * n ** 3 / (ms * 1e-3)


@contextlib.contextmanager
def env_var(name: str, value: str):
    """Environment variable ``name`` = ``value`` inside, the caller's value (or none) restored after:
    for the switches the kernels' launchers read at every call (OPPO_DECODE_PLAN, OPPO_PREFILL_PLAN,
    OPPO_FUSE_KV_APPEND), so also at a graph capture inside time_ms."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def shape_arg(spec: str, shapes: list[tuple], form: str) -> tuple:
    """One --shapes item of an attention bench: an index into its issue's `shapes`, or a shape of its own
    written as `form` (numbers joined by x, e.g. decode's BxCTXxHQxHKVxD; the last three Hq, Hkv, D)."""
    spec = spec.strip()
    if "x" not in spec:
        return shapes[int(spec)]
    parts = spec.split("x")
    ok = len(parts) == len(shapes[0]) and all(p.isdigit() for p in parts)
    assert ok, f"--shapes takes indices or {form} shapes, got {spec!r}"
    vals = tuple(int(p) for p in parts)
    B, (Hq, Hkv, D) = vals[0], vals[-3:]
    assert B > 0 and Hkv > 0 and Hq % Hkv == 0 and Hq > 0 and D in (64, 128), \
        f"--shapes {spec!r}: B > 0, Hq a multiple of Hkv, D 64 or 128"
    return vals


def tree_commit() -> str | None:
    """The commit of the tree that runs: OPPO_COMMIT where set (the device machine's copy of the
    tree keeps a stale .git, so call scripts write the session's HEAD there), else git's HEAD."""
    if os.environ.get("OPPO_COMMIT"):
        return os.environ["OPPO_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return out or None


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {
        "commit": tree_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "card": p.name,
        "sm_count": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
    }


def results_path(name: str, out: str | None) -> Path:
    return Path(out) if out else RESULTS_DIR / f"{name}.json"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format) -> a plain aligned table on stdout."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for k, _, f in cols:
            v = r.get(k)
            line.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, c in enumerate(cells):
        print("  ".join(s.rjust(w) for s, w in zip(c, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def median_span_stamps(run: Callable[[], object], stamps: torch.Tensor, reps: int) -> torch.Tensor:
    """`run` launched reps times, one at a time, the stamp buffer zeroed before each; the host copy
    of the launch whose span (last end - first start) is the median (rows never written: zero)."""
    kept = []
    for _ in range(reps):
        stamps.zero_()
        run()
        torch.cuda.synchronize()
        s = stamps.cpu()
        ran = s[s[:, 1] > 0]
        kept.append((int(ran[:, 1].max()) - int(ran[:, 0].min()), s))
    kept.sort(key=lambda p: p[0])
    return kept[len(kept) // 2][1]


def stamp_stats(stamps: torch.Tensor, sms: int, clock_tag: bool = False) -> dict:
    """Where a one-launch kernel's SM time goes, from per-CTA (program, or work item) stamps: rows
    (start ns, end ns, SM id in the lower 32 bits) on the host, rows that were not written all zero
    (dropped). Times are us from the first start. ``sm_idle_fraction``: the time between each SM's last end and the kernel's end,
    summed over all ``sms`` SMs (an unused SM idles throughout), over sms x the span: ncu's
    1 - SM active / elapsed, less the start. ``sm_idle_start_fraction``: the same before each SM's
    first start (the launch's ramp). CTA durations as percentiles; ``cta_us_by_load``: the median
    CTA duration by the number of CTAs its SM ran (does a CTA sharing its SM with more run longer?).
    ``clock_tag``: the tag is the CTA's SM cycles (the decode kernel's stamps): ``sm_mhz_*``, the
    SM clock of the CTAs that ran at least 2 us (cycles / ns; shorter ones are the timer's grain)."""
    s = stamps[stamps[:, 1] > 0]
    t0 = int(s[:, 0].min())
    start, end = (s[:, 0] - t0).double() / 1e3, (s[:, 1] - t0).double() / 1e3
    smid = (s[:, 2] & 0xFFFFFFFF).tolist()          # (the upper half may carry a tag)
    span = float(end.max())
    first, finish, count = {}, {}, {}
    for a, e, m in zip(start.tolist(), end.tolist(), smid):
        first[m] = min(first.get(m, span), a)
        finish[m] = max(finish.get(m, 0.0), e)
        count[m] = count.get(m, 0) + 1
    idle = sum(span - f for f in finish.values()) + (sms - len(finish)) * span
    fin = sorted(finish.values())
    dur = sorted((end - start).tolist())

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    by_load: dict[int, list[float]] = {}
    for a, e, m in zip(start.tolist(), end.tolist(), smid):
        by_load.setdefault(count[m], []).append(e - a)
    clock = {}
    if clock_tag:
        ns = (s[:, 1] - s[:, 0]).double()
        mhz = sorted(((s[:, 2] >> 32).double() / ns * 1e3)[ns >= 2000].tolist())
        if mhz:
            clock = {"sm_mhz_p10": pct(mhz, 0.1), "sm_mhz_median": pct(mhz, 0.5), "sm_mhz_p90": pct(mhz, 0.9)}
    return {**clock, "span_us": span, "ctas": len(dur), "sms_used": len(finish),
            "programs_per_sm_min": min(count.values()), "programs_per_sm_max": max(count.values()),
            "sm_finish_us_min": fin[0], "sm_finish_us_median": statistics.median(fin), "sm_finish_us_max": fin[-1],
            "sm_idle_fraction": idle / (sms * span),
            "sm_idle_start_fraction": sum(first.values()) / (sms * span),
            "last_start_us": float(start.max()),
            "cta_us_min": dur[0], "cta_us_p10": pct(dur, 0.1), "cta_us_median": pct(dur, 0.5),
            "cta_us_p90": pct(dur, 0.9), "cta_us_max": dur[-1],
            "cta_us_by_load": {str(k): round(statistics.median(v), 2) for k, v in sorted(by_load.items())},
            "sm_finish_us_by_smid": [round(finish.get(m, 0.0), 2) for m in range(sms)]}


def paged_pool(num_seqs: int, ctx: int, Hkv: int, D: int, block_size: int, dtype=torch.bfloat16,
               seed: int = 0, head_major: bool = False, layers: int = 1, engine_prompt: int = 0):
    """A page pool holding num_seqs sequences of ctx tokens on shuffled pages.

    Each page holds one layer's K and V ([2, block_size, Hkv, D]), so the K and V views have a page
    stride of twice a page's K (as in the engine's shared pool); ``layers`` > 1: each page holds that
    many layers' K and V ([layers, 2, block_size, Hkv, D], the engine's page) and the views are layer
    0's, a page stride of ``layers`` times more bytes over a pool that much larger. ``engine_prompt``
    > 0: pages numbered as the engine's pool hands them out (lowest free id first) to sequences that
    prefilled prompts of that many tokens together and then decoded in lockstep: sequence i's prompt
    pages i * p .. i * p + p - 1, then its k-th decode page num_seqs * p + k * num_seqs + i (at each
    page boundary every sequence takes the next id), instead of a random permutation. Returns k_cache, v_cache,
    block_tables [num_seqs, ceil(ctx / block_size)] int32. ``head_major``: pages [2, Hkv,
    block_size, D] instead (each kv head's tokens of a page contiguous), returned as the same
    [num_blocks, block_size, Hkv, D] views with strides (page, D, block_size * D, 1).
    """
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    per_seq = math.ceil(ctx / block_size)
    nblocks = num_seqs * per_seq
    one = block_size * Hkv * D
    pool = torch.randn(nblocks, layers * 2 * one, device="cuda", dtype=dtype, generator=g)
    shape, stride = (nblocks, block_size, Hkv, D), (layers * 2 * one, Hkv * D, D, 1)
    if head_major:
        stride = (layers * 2 * one, D, block_size * D, 1)
    k_cache = pool.as_strided(shape, stride, 0)
    v_cache = pool.as_strided(shape, stride, one)
    if engine_prompt > 0:
        p = min(per_seq, math.ceil(engine_prompt / block_size))
        i = torch.arange(num_seqs, device="cuda").view(-1, 1)
        k = torch.arange(per_seq, device="cuda").view(1, -1)
        block_tables = torch.where(k < p, i * p + k, num_seqs * p + (k - p) * num_seqs + i).to(torch.int32)
    else:
        perm = torch.randperm(nblocks, device="cuda", generator=g).to(torch.int32)
        block_tables = perm.view(num_seqs, per_seq).contiguous()
    return k_cache, v_cache, block_tables


def attention_bench_setup(doc: str, argv: list[str] | None = None):
    """Arguments, kernel check and compiled FlexAttention shared by the attention benchmarks.
    ``argv``: the arguments to parse (default sys.argv[1:]; a bench with options of its own passes
    the rest, and sys.argv stays whole for the recorded command).

    Returns (args, flex_attention or None, create_block_mask or None)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES or shapes of their own (their numbers joined by x, e.g. 64x4096x16x8x128)")
    ap.add_argument("--extra-block-sizes", default="", help="prefill: also time the Triton kernel on the same "
                    "K/V in pages of these sizes (comma-separated), e.g. 64")
    args = ap.parse_args(argv)

    import oppo_runtime.ops  # noqa: F401  (loads torch.ops.oppo)
    from oppo_runtime.ops import has_cuda_kernels
    assert has_cuda_kernels(), "oppo_runtime._C was built without CUDA kernels"
    flex = create_block_mask = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention unavailable: {e}")
    return args, flex, create_block_mask
