"""The decode kernels' resources as ptxas reports them for sm_90a, checked without a GPU.

Every decode plan's split count rests on how many CTAs of its kernel fit on an SM (the launcher
asks the occupancy API; the Python mirror, ``ops.attention.paged_decode_resident_ctas``, estimates
it from shared memory and a table of CTAs the registers allow). A code change that adds a few
registers can silently drop a kernel from 3 CTAs per SM to 2 (v6 at D=128: 2 stages, launch
bounds of 3) and change every plan. This test compiles each instantiation the launcher uses (bf16)
and checks: no spill, and registers x 128 threads x the mirror's CTAs per SM within the 65536
registers of an SM, so the mirror's table is what the hardware can do.
"""
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from _scripts import cuobjdump_path, nvcc_sm90a

from oppo_runtime.ops import attention as A

# the split kernel's parameters (csrc launch_decode_split's arguments)
SPLIT_SIG = ("void* __restrict__, bool, int64_t, int64_t, const T* __restrict__, int64_t, int64_t, const T* __restrict__, "
             "const T* __restrict__, int64_t, int, int, oppo::Divisor, int, const int* __restrict__, int64_t, int, "
             "const int* __restrict__, float* __restrict__, float* __restrict__, int, int, int, float, int, "
             "unsigned* __restrict__, oppo::attn::DecodeRope")

SOURCE = """
#include <cuda_bf16.h>
#include "paged_decode_attention.cuh"
using T = __nv_bfloat16;
template __global__ void oppo::attn::paged_decode_kernel<T, {D}, {S}>(""" + SPLIT_SIG + """);
template __global__ void oppo::attn::paged_decode_v4_kernel<T, {D}, {S4}>(const oppo::attn::DecodeV4Params);
"""

# plan -> (table of CTAs per SM by head dim, stages by head dim) of the Python mirror
MIRROR = {
    "v3": (A._DECODE_CTAS_BY_REGS, A._DECODE_STAGES),
    "v6": (A._DECODE_V6_CTAS_BY_REGS, A._DECODE_V6_STAGES),
    "v4": (A._DECODE_V4_CTAS_BY_REGS, A._DECODE_V4_STAGES),
}


def _ptxas(D: int, stages: int, stages_v4: int) -> dict[str, tuple[int, str]]:
    """{kernel kind: (registers, ptxas's lines)} for the split kernel with `stages` and the v4
    kernel with `stages_v4` at head dim D."""
    tmp = Path(tempfile.mkdtemp(prefix="decode_ptxas_"))
    try:
        report, _ = nvcc_sm90a(SOURCE.replace("{D}", str(D)).replace("{S}", str(stages)).replace("{S4}", str(stages_v4)),
                               tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kernels = {}
    # ptxas prints, per entry: "Compiling entry function '<mangled>'", then the stack/spill line
    # and "Used N registers"
    for block in re.split(r"Compiling entry function", report)[1:]:
        name = "v4" if "paged_decode_v4_kernel" in block.split("\n", 1)[0] else "split"
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        kernels[name] = (regs, block)
    assert set(kernels) == {"split", "v4"}, report
    return kernels


@pytest.mark.parametrize("D", [64, 128])
def test_decode_kernels_fit_the_ctas_per_sm_the_plans_assume(D):
    built = {}
    for plan in ("v3", "v6"):
        stages = MIRROR[plan][1][D]
        if stages not in built:
            built[stages] = _ptxas(D, stages, A._DECODE_V4_STAGES[D])
    for plan, (ctas, stages) in MIRROR.items():
        kernels = built[stages[D]] if plan != "v4" else next(iter(built.values()))
        regs, lines = kernels["v4" if plan == "v4" else "split"]
        assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", lines), (plan, D, lines)
        assert regs * 128 * ctas[D] <= 65536, (
            f"{plan} D={D}: {regs} registers x 128 threads x {ctas[D]} CTAs per SM (the plan mirror's "
            f"table) is past an SM's 65536 registers: the kernel no longer fits that many CTAs")


REDUCE = """
template __global__ void oppo::attn::paged_decode_reduce_kernel<T, {D}>(void* __restrict__, bool, int64_t, int64_t,
    const float* __restrict__, const float* __restrict__, const int* __restrict__, int, int, int);
"""
# SASS of a global read: a load, cp.async (LDGSTS), a bulk/TMA copy
_GLOBAL_READ = re.compile(r"\b(LDG|LDGSTS|LD|UBLKCP|UTMALDG)\b")


@pytest.mark.parametrize("D,stages", [(64, 3), (128, 3), (128, 2)])
def test_decode_kernels_read_nothing_before_the_pdl_wait(D, stages):
    """Under OPPO_DECODE_PDL=1 the split kernel and its reduction may start before the kernel ahead
    of them has finished; they are correct only if no global read comes before griddepcontrol.wait
    (SASS ACQBULK), and the split kernel lets its dependents go (PREEXIT) after its last load."""
    tmp = Path(tempfile.mkdtemp(prefix="decode_pdl_"))
    try:
        src = (SOURCE + REDUCE).replace("{D}", str(D)).replace("{S}", str(stages)).replace("{S4}", "3")
        _, sass = nvcc_sm90a(src, tmp, sass_with=cuobjdump_path())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    funcs = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = block.split("\n", 1)
        if "v4_kernel" in name:
            continue
        kind = "reduce" if "reduce_kernel" in name else "split"
        funcs[kind] = [ln.split(";")[0] for ln in body.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    assert set(funcs) == {"split", "reduce"}, sass[:2000]
    for kind, ins in funcs.items():
        wait = next((i for i, x in enumerate(ins) if "ACQBULK" in x), None)
        assert wait is not None, f"{kind}: no griddepcontrol.wait"
        early = [x.strip() for x in ins[:wait] if _GLOBAL_READ.search(x)]
        assert not early, f"{kind} D={D}: global reads before the PDL wait: {early}"
    split = funcs["split"]
    trigger = next(i for i, x in enumerate(split) if "PREEXIT" in x)
    last_copy = max(i for i, x in enumerate(split) if "LDGSTS" in x)
    assert trigger > last_copy, "the split kernel lets its dependents go before its last K/V load"


RS_SOURCE = """
#include <cuda_bf16.h>
#include "paged_decode_attention.cuh"
using T = __nv_bfloat16;
template __global__ void oppo::attn::paged_decode_kernel<T, 128, 3, true>(""" + SPLIT_SIG + """);
"""


def test_register_staged_decode_kernel_fits_two_ctas_and_loads_16_bytes():
    """OPPO_DECODE_REG_STAGE=1's kernel (D=128, 3 stages, kRS) is planned as the default kernel (2
    CTAs per SM): no spill, registers x 128 threads x 2 within an SM's 65536; its tiles come by
    16-byte global loads (SASS LDG.E.128), and nothing is read before the PDL wait."""
    tmp = Path(tempfile.mkdtemp(prefix="decode_rs_"))
    try:
        report, sass = nvcc_sm90a(RS_SOURCE, tmp, sass_with=cuobjdump_path())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    assert regs * 128 * A._DECODE_CTAS_BY_REGS[128] <= 65536, regs
    ins = [ln.split(";")[0] for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    assert any(re.search(r"\bLDG\.E\.(128|ENL2\.128)", x) or ("LDG" in x and ".128" in x) for x in ins), "no 16-byte LDG"
    wait = next(i for i, x in enumerate(ins) if "ACQBULK" in x)
    assert not [x for x in ins[:wait] if _GLOBAL_READ.search(x)], "global reads before the PDL wait"


HN_SOURCE = """
#include <cuda_bf16.h>
#include "paged_decode_attention.cuh"
using T = __nv_bfloat16;
template __global__ void oppo::attn::paged_decode_kernel<T, {D}, 3, false, {HN}>(""" + SPLIT_SIG + """);
"""


def _split_kernel_sass(D: int, hn: bool) -> tuple[int, list[str], str]:
    """(registers, SASS instructions, ptxas's report) of the split kernel at head dim D, 3 stages,
    with the heads as the mma's N or not."""
    tmp = Path(tempfile.mkdtemp(prefix="decode_hn_"))
    try:
        report, sass = nvcc_sm90a(HN_SOURCE.replace("{D}", str(D)).replace("{HN}", "true" if hn else "false"), tmp,
                                  sass_with=cuobjdump_path())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    ins = [ln.split(";")[0] for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    return regs, ins, report


@pytest.mark.parametrize("D", [64, 128])
def test_heads_as_n_decode_kernel_halves_the_mma_and_fits(D):
    """OPPO_DECODE_HEADS_AS_N=1's kernel (the split kernel with the heads as the mma's N, for groups of
    <= 8 query heads) is planned as the default kernel: no spill, registers within the CTAs per SM the
    mirror assumes; its tile loop issues half the default's HMMA and
    MUFU.EX2 (counted over the whole kernel, whose merge adds the same few exponentials to both), and
    its P^T goes through MOVM (movmatrix), and nothing is read before the PDL wait."""
    regs, ins, report = _split_kernel_sass(D, True)
    base_regs, base_ins, _ = _split_kernel_sass(D, False)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    assert regs * 128 * A._DECODE_CTAS_BY_REGS[D] <= 65536, (regs, base_regs)

    def count(pattern, xs):
        return sum(1 for x in xs if re.search(pattern, x))

    hmma, base_hmma = count(r"\bHMMA\.16816", ins), count(r"\bHMMA\.16816", base_ins)
    assert base_hmma > 0 and 2 * hmma <= base_hmma + 8, (hmma, base_hmma)
    ex2, base_ex2 = count(r"\bMUFU\.EX2", ins), count(r"\bMUFU\.EX2", base_ins)
    assert ex2 < base_ex2, (ex2, base_ex2)
    assert count(r"\bMOVM\b", ins) > 0
    print(f"D={D}: registers {regs} (default {base_regs}), HMMA {hmma} ({base_hmma}), MUFU.EX2 {ex2} ({base_ex2})")
    wait = next(i for i, x in enumerate(ins) if "ACQBULK" in x)
    assert not [x for x in ins[:wait] if _GLOBAL_READ.search(x)], "global reads before the PDL wait"


ROPE_SOURCE = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "paged_decode_attention.cuh"
using T = {T};
template __global__ void oppo::attn::paged_decode_kernel<T, {D}, 3, false, true, false, true>(""" + SPLIT_SIG + """);
"""


@pytest.mark.parametrize("T", ["__nv_bfloat16", "__half"])
@pytest.mark.parametrize("D", [64, 128])
def test_rotary_prologue_decode_kernel_fits_the_plans_ctas(T, D):
    """OPPO_DECODE_ROPE_IN's instantiation (the heads-as-N kernel with the rotary and the K/V append
    as its prologue) keeps the CTAs per SM the plan mirror assumes: no spill, registers within
    65536 / (128 threads x CTAs per SM), and nothing read before the PDL wait."""
    tmp = Path(tempfile.mkdtemp(prefix="decode_rope_"))
    try:
        report, sass = nvcc_sm90a(ROPE_SOURCE.replace("{D}", str(D)).replace("{T}", T), tmp, sass_with=cuobjdump_path())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    assert regs * 128 * A._DECODE_CTAS_BY_REGS[D] <= 65536, regs
    ins = [ln.split(";")[0] for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    wait = next(i for i, x in enumerate(ins) if "ACQBULK" in x)
    assert not [x for x in ins[:wait] if _GLOBAL_READ.search(x)], "global reads before the PDL wait"
    print(f"D={D} {T}: registers {regs}")
