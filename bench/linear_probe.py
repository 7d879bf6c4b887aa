"""The decode step's projections (F.linear) as the engine runs them: warm (a loop of one GEMM, whose
weights stay in L2) and cold (an L2 flush before each call: in the engine every layer's weights
come from DRAM), under each BLAS library PyTorch offers here, over the bytes' floor.

    python bench/linear_probe.py [--shapes qwen2.5-0.5b] [--batches 64,256]
                                 [--libs cublas,cublaslt,inductor,lt_all,gus,ksplit]
                                 [--max-algos 16] [--out bench/results/linear_probe.json]

Why: the engine's kernel profile (H100, B=256) has the QKV projection at 5.4 us and o_proj at 4.5
us per call for ~1 us of bytes, and down_proj at 10.2 us for ~3.7 us. Before writing a GEMM of our
own, this says how much of that is the cold L2 (nothing to win by a better tile) and whether the
other library's heuristics pick better tiles (a one-line switch). ``inductor``: the same F.linear
under ``torch.compile(mode="max-autotune-no-cudagraphs")``, which times its Triton GEMM templates
against cuBLAS for this shape and keeps the faster (its table of configs goes to the log): whether a
Triton GEMM of our own can beat cuBLAS at these small-M shapes, before writing one. ``lt_all``
(bench/lt_probe.py): every answer of cuBLASLt's heuristic (up to --max-algos) and their split-K
versions, each timed cold (each checked against the fp32 product first); one row for the fastest,
with its configuration, and the JSON's ``lt_all`` list has them all. Floor: weights +
input + output bytes over the copy bandwidth measured in the same run. No timing assertion.

``gus`` (session 42): the decode MLP's gate_up GEMM and silu*mul as a unit, three rows at each batch:
``cublas+silu_mul`` (what the engine runs: cuBLAS's gate_up, then the Triton silu*mul over its
output), ``gate_up_silu`` (our one sm_90a kernel, kernels/gate_up_silu.cuh) and ``gate_up_silu_lag0``
(the same with OPPO_GATE_UP_SILU_LAG=0: one more stage of copies in flight), each checked against
the float32 reference first; the floor is the larger of the bytes (weights + x + act) over the copy
bandwidth and the FLOPs over the bf16 matmul rate, both measured in the same run. ``ksplit``
(session 42): o_proj and down_proj through ``linear_ksplit`` (kernels/linear_ksplit.cuh: all rows a
cluster of 8 CTAs that split K, the partials summed through distributed shared memory), beside the
same projections' cuBLAS rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (L2Flush, copy_bandwidth, device_info, env_var, matmul_flops, print_table,  # noqa: E402
                    results_path, time_ms, write_json)

SHAPES = {   # hidden, intermediate, Hq, Hkv, D
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128),
}
COLUMNS = [("shape", "shape", "s"), ("B", "B", "d"), ("proj", "proj", "s"), ("K", "K", "d"), ("N", "N", "d"),
           ("lib", "lib", "s"), ("floor_us", "floor us", ".2f"), ("warm_us", "warm us", ".2f"),
           ("cold_us", "cold us", ".2f"), ("cold_over_floor", "cold/floor", ".2f")]


def projections(h: int, i: int, hq: int, hkv: int, d: int) -> list[tuple[str, int, int, bool]]:
    """(name, in features K, out features N, bias) of one decoder layer's projections."""
    return [("qkv", h, (hq + 2 * hkv) * d, True), ("o_proj", hq * d, h, False),
            ("gate_up", h, 2 * i, False), ("down", i, h, False)]


def inductor_linear(x, w, b):
    """A call that returns F.linear(x, w, b) through a max-autotuned torch.compile (the autotuning,
    with its table of Triton configs against cuBLAS, runs at the first call; the output is the
    compiled code's own allocation, as the engine's F.linear's is)."""
    import torch._inductor.config as ic
    ic.max_autotune_gemm_backends = "ATEN,TRITON"
    fn = torch.compile(lambda x, w, b: F.linear(x, w, b), mode="max-autotune-no-cudagraphs", dynamic=False,
                       fullgraph=True)

    def run():
        return fn(x, w, b)
    return run


def lt_all(lt, x, w, b, out, ref, workspace, flusher, max_algos: int, key: dict) -> dict:
    """Every cuBLASLt candidate (bench/lt_probe.py) for this GEMM, each checked against the fp32 product
    and timed cold; the row of the fastest (``lt_all``: them all, ``lt_rejected``: those whose output
    was wrong or that failed to run)."""
    import lt_probe
    B, K = x.shape
    N = w.shape[0]
    plan, cands = lt_probe.candidates(lt, B, N, K, b is not None, max_algos)
    timed, rejected = [], []
    for i, c in enumerate(cands):
        def run(i=i):
            lt.lt_run(plan, i, x, w, b, out, workspace)
        try:
            out.fill_(float("nan"))
            run()
            torch.cuda.synchronize()
            err = float((out.float() - ref).norm() / ref.norm())
            if not err < 2e-2:
                rejected.append({**c, "why": f"relative error {err:.2e}"})
                continue
            cold = time_ms(run, cold_l2=flusher, reps=7, warmup_ms=5.0) * 1e3
        except RuntimeError as e:
            rejected.append({**c, "why": str(e)[:200]})
            continue
        timed.append({**c, "cold_us": cold, "rel_err": err, "label": lt_probe.label(c)})
    assert timed, f"lt_all {key}: no cuBLASLt candidate ran ({rejected[:3]})"
    timed.sort(key=lambda t: t["cold_us"])
    best = timed[0]
    first = next((t for t in timed if t["rank"] == 0), None)
    print(f"{key['shape']} B={B} {key['proj']} {K}->{N} lt_all: {len(timed)} ran ({len(rejected)} rejected), best "
          f"{best['cold_us']:.2f} us cold ({best['label']}), heuristic's first "
          f"{first['cold_us'] if first else float('nan'):.2f} us", flush=True)
    return {**key, "lib": "lt_all", "warm_us": float("nan"), "cold_us": best["cold_us"],
            "cold_over_floor": best["cold_us"] / key["floor_us"], "rel_err": best["rel_err"], "lt_best": best["label"],
            "lt_first_cold_us": first["cold_us"] if first else None, "lt_candidates": len(timed),
            "lt_all": timed, "lt_rejected": rejected}


def gate_up_silu_rows(x, w, flusher, bw: float, mm: float, key: dict) -> list[dict]:
    """The gate_up GEMM + silu*mul unit, as the engine runs it and as our one kernel (see the doc)."""
    from oppo_runtime.ops import fused
    B, K = x.shape
    inter = w.shape[0] // 2
    gu = torch.empty(B, 2 * inter, device="cuda", dtype=x.dtype)
    act = torch.empty(B, inter, device="cuda", dtype=x.dtype)
    ref = fused.gate_up_silu_ref(x, w).float()
    floor_us = max(2 * (w.numel() + x.numel() + act.numel()) / bw, 2 * B * K * 2 * inter / mm) * 1e6
    runs = {"cublas+silu_mul": lambda: fused.silu_mul(torch.matmul(x, w.t(), out=gu), backend="triton"),
            "gate_up_silu": lambda: fused.gate_up_silu(x, w, out=act, backend="cuda"),
            "gate_up_silu_lag0": lambda: fused.gate_up_silu(x, w, out=act, backend="cuda")}
    rows = []
    for lib, run in runs.items():
        with env_var("OPPO_GATE_UP_SILU_LAG", "0" if lib.endswith("lag0") else "1"):   # read at every call
            act.fill_(float("nan"))
            err = float((run().float() - ref).norm() / ref.norm())
            assert err < 2e-2, f"{key} {lib}: relative error {err:.2e}"
            warm = time_ms(run) * 1e3
            cold = time_ms(run, cold_l2=flusher) * 1e3
        rows.append({**key, "proj": "gate_up+silu", "lib": lib, "floor_us": floor_us, "warm_us": warm, "cold_us": cold,
                     "cold_over_floor": cold / floor_us, "rel_err": err, "matmul_flops": mm})
        print(f"{key['shape']} B={B} gate_up+silu {K}->{inter} {lib}: warm {warm:.2f} us, cold {cold:.2f} us, "
              f"floor {floor_us:.2f} us", flush=True)
    for r in rows[1:]:
        r["speedup_vs_cublas_cold"] = rows[0]["cold_us"] / r["cold_us"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-0.5b")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--libs", default="cublas,cublaslt")
    ap.add_argument("--max-algos", type=int, default=16, help="lt_all: how many heuristic answers to ask for")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    assert libs and set(libs) <= {"cublas", "cublaslt", "inductor", "lt_all", "gus", "ksplit"}, \
        f"--libs takes cublas, cublaslt, inductor, lt_all, gus and/or ksplit, got {args.libs!r}"
    lt = None
    if "lt_all" in libs:
        import lt_probe
        lt = lt_probe.build()
        workspace = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    info = device_info()
    bw = copy_bandwidth()
    mm = matmul_flops() if "gus" in libs else None
    print(f"{info['card']}  torch {info['torch']}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)"
          + (f"  bf16 matmul {mm / 1e12:.0f} TFLOP/s" if mm else ""))
    flusher = L2Flush()
    rows = []
    before = torch.backends.cuda.preferred_blas_library()
    try:
        for name in (s.strip() for s in args.shapes.split(",") if s.strip()):
            for B in (int(b) for b in args.batches.split(",") if b.strip()):
                for proj, K, N, has_bias in projections(*SHAPES[name]):
                    x = torch.randn(B, K, device="cuda", dtype=torch.bfloat16)
                    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
                    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if has_bias else None
                    out = torch.empty(B, N, device="cuda", dtype=torch.bfloat16)
                    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
                    floor_us = 2 * (N * K + B * K + B * N) / bw * 1e6
                    for lib in libs:
                        if lib == "gus":
                            if proj == "gate_up":
                                rows.extend(gate_up_silu_rows(x, w, flusher, bw, mm, dict(shape=name, B=B, K=K, N=N)))
                            continue
                        if lib == "lt_all":
                            rows.append(lt_all(lt, x, w, b, out, ref, workspace, flusher, args.max_algos,
                                               dict(shape=name, B=B, proj=proj, K=K, N=N, floor_us=floor_us)))
                            continue
                        if lib == "ksplit" and (b is not None or proj not in ("o_proj", "down")):
                            continue            # the decode layers' o_proj and down_proj (no bias)
                        torch.backends.cuda.preferred_blas_library("cublas" if lib in ("inductor", "ksplit") else lib)
                        if lib == "inductor":
                            run = inductor_linear(x, w, b)
                        elif lib == "ksplit":
                            from oppo_runtime.ops import fused

                            def run():
                                return fused.linear_ksplit(x, w, out=out, backend="cuda")
                        else:
                            def run():
                                torch.matmul(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)

                        got = run()
                        got = out if got is None else got
                        err = float((got.float() - ref).norm() / ref.norm())
                        assert err < 2e-2, f"{name} {proj} B={B} {lib}: relative error {err:.2e}"
                        warm = time_ms(run) * 1e3
                        cold = time_ms(run, cold_l2=flusher) * 1e3
                        rows.append({"shape": name, "B": B, "proj": proj, "K": K, "N": N, "lib": lib,
                                     "floor_us": floor_us, "warm_us": warm, "cold_us": cold,
                                     "cold_over_floor": cold / floor_us, "rel_err": err})
                        print(f"{name} B={B} {proj} {K}->{N} {lib}: warm {warm:.2f} us, cold {cold:.2f} us, "
                              f"floor {floor_us:.2f} us", flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library(before)
    print_table(rows, COLUMNS)
    for r in rows:
        if r["lib"] == "lt_all":
            base = next((q for q in rows if q["lib"] == "cublaslt" and all(q[k] == r[k] for k in ("shape", "B", "proj"))),
                        None)
            if base is not None:
                r["speedup_vs_cublaslt_cold"] = base["cold_us"] / r["cold_us"]
                print(f"{r['shape']} B={r['B']} {r['proj']}: best of {r['lt_candidates']} cuBLASLt algorithms "
                      f"{r['cold_us']:.2f} us cold ({r['lt_best']}), F.linear (cublaslt) {base['cold_us']:.2f} us: "
                      f"{r['speedup_vs_cublaslt_cold']:.2f}x")
    path = results_path("linear_probe", args.out)
    write_json(path, {**info, "copy_bandwidth_Bps": bw, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
