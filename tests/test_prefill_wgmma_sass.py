"""The wgmma prefill kernel's machine code (sm_90a SASS), checked without a GPU.

What ptxas does with the kernel decides whether its design holds at all, and two of its choices
have bitten: it serializes every wgmma of the kernel when any path reads an accumulator before the
matching wait (warning C7514/C7519-style "Potential Performance Loss"), and it hoists a bare
``wgmma.wait_group 0`` up to the ``wait_group 1`` before it, which undoes the intra-warpgroup
overlap (the softmax of tile t while tile t-1's P V runs). This test compiles the kernel for
sm_90a with nvcc (bf16, head dims 64 and 128), reads ptxas's report and the SASS, and checks:
no performance-loss warning, no spills, HGMMAs issued in batches, and the overlap's shape (a
DEPBAR 1, then the tile's exponentials, then the DEPBAR 0).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = """
#include <cuda_bf16.h>
#include "paged_prefill_wgmma.cuh"
#define ARGS(T) void* __restrict__, int, int64_t, int64_t, const T* __restrict__, int64_t, int64_t, \\
  const T* __restrict__, const T* __restrict__, int64_t, int, int, const int* __restrict__, \\
  const int* __restrict__, const int* __restrict__, int64_t, int, float, int, int
template __global__ void oppo::attn::wgp::paged_prefill_wgmma_kernel<__nv_bfloat16, {D}>(ARGS(__nv_bfloat16));
"""


def _tools():
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if not os.path.exists(cuobjdump):
        try:
            import triton
            cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        except ImportError:
            pass
    if not (os.path.exists(nvcc) and os.path.exists(cuobjdump)):
        pytest.skip("needs nvcc and cuobjdump")
    return nvcc, cuobjdump


def _compile(D: int, tmp_path: Path) -> tuple[str, list[str]]:
    nvcc, cuobjdump = _tools()
    src = tmp_path / f"wgmma_{D}.cu"
    src.write_text(SOURCE.replace("{D}", str(D)))
    cubin = tmp_path / f"wgmma_{D}.cubin"
    out = subprocess.run([nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                          "--expt-relaxed-constexpr", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                          "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                          f"-I{ROOT / 'kernels'}", "-cubin", "-o", str(cubin), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr[-2000:]
    events = []
    for line in sass.stdout.splitlines():
        if "WARPGROUP.DEPBAR" in line:
            events.append("DEPBAR" + re.search(r"gsb0,\s*(0x[0-9a-f]+)", line).group(1))
        elif "MUFU.EX2" in line:
            events.append("EX2")
        elif "HGMMA" in line:
            events.append("HGMMA")
        elif re.search(r"\bDEPBAR\.LE SB0", line):      # cp.async.wait_group N (the producer's)
            events.append("CPWAIT" + re.search(r"SB0,\s*(0x[0-9a-f]+)", line).group(1))
    return out.stdout + out.stderr, events


@pytest.mark.parametrize("D", [64, 128])
def test_wgmma_prefill_sass_keeps_its_batches_and_its_overlap(D, tmp_path):
    report, ev = _compile(D, tmp_path)
    assert "Potential Performance Loss" not in report, report      # no serialized wgmma (C75xx)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert regs <= 168, f"{regs} registers: setmaxnreg's split (128 x 56 + 256 x 224) needs <= 168 at launch"
    runs, n = [], 0                                # HGMMAs issued back to back, not one per wait
    for e in ev + ["END"]:
        if e == "HGMMA":
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert max(runs) >= 8, runs
    # the overlap: after a "DEPBAR 0x1", the tile's exponentials come before the next "DEPBAR 0x0"
    i = ev.index("DEPBAR0x1")
    j = ev.index("DEPBAR0x0", i)
    assert ev[i + 1:j].count("EX2") >= 64, ev[i:j + 1]


@pytest.mark.parametrize("D", [64, 128])
def test_wgmma_prefill_producer_keeps_its_copies_in_flight(D, tmp_path):
    """With 4 stages (D=64) the producer publishes the previous tile after cp.async.wait_group 1
    (two tiles' copies in flight); with 3 (D=128) after wait_group 0, before the next stage wait."""
    _, ev = _compile(D, tmp_path)
    waits = {e for e in ev if e.startswith("CPWAIT")}
    assert ("CPWAIT0x1" in waits) == (D == 64), waits

