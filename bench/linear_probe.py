"""The decode step's projections (F.linear) as the engine runs them: warm (a loop of one GEMM, whose
weights stay in L2) and cold (an L2 flush before each call: in the engine every layer's weights
come from DRAM), under each BLAS library PyTorch offers here, over the bytes' floor.

    python bench/linear_probe.py [--shapes qwen2.5-0.5b] [--batches 64,256] [--libs cublas,cublaslt,inductor]
                                 [--out bench/results/linear_probe.json]

Why: the engine's kernel profile (H100, B=256) has the QKV projection at 5.4 us and o_proj at 4.5
us per call for ~1 us of bytes, and down_proj at 10.2 us for ~3.7 us. Before writing a GEMM of our
own, this says how much of that is the cold L2 (nothing to win by a better tile) and whether the
other library's heuristics pick better tiles (a one-line switch). ``inductor``: the same F.linear
under ``torch.compile(mode="max-autotune-no-cudagraphs")``, which times its Triton GEMM templates
against cuBLAS for this shape and keeps the faster (its table of configs goes to the log): whether a
Triton GEMM of our own can beat cuBLAS at these small-M shapes, before writing one. Floor: weights +
input + output bytes over the copy bandwidth measured in the same run. No timing assertion.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import L2Flush, copy_bandwidth, device_info, print_table, results_path, time_ms, write_json  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-0.5b")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--libs", default="cublas,cublaslt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    assert libs and set(libs) <= {"cublas", "cublaslt", "inductor"}, \
        f"--libs takes cublas, cublaslt and/or inductor, got {args.libs!r}"
    info = device_info()
    bw = copy_bandwidth()
    print(f"{info['card']}  torch {info['torch']}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
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
                        torch.backends.cuda.preferred_blas_library("cublas" if lib == "inductor" else lib)
                        if lib == "inductor":
                            run = inductor_linear(x, w, b)
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
    path = results_path("linear_probe", args.out)
    write_json(path, {**info, "copy_bandwidth_Bps": bw, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
