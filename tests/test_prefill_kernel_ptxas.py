"""The sm_90a prefill kernel's resources as ptxas reports them, checked without a GPU.

The warp-specialized prefill (kernels/paged_prefill_wgmma.cuh) runs its consumers at the edge of
their registers (three consumer warpgroups: 160 each after setmaxnreg). A change that needs a few
more makes ptxas spill or, worse, serialize every wgmma of the kernel ("C7512 ... wgmma.mma_async
instructions are serialized due to insufficient register resources"), which costs the whole kernel
its tensor-core overlap and shows up only as a slower benchmark. Session 19 hit both with the merged
item stream (plans _mi) as a runtime flag: all three kernels, the default plans included. This test
compiles each instantiation the launcher uses and checks: no wgmma serialization anywhere, no spill
in the kernels of the plans without _mi, and the _mi kernels' spills within what they had when
measured (12 bytes in the three-warpgroup one, session 19); the key-split kernel (_ks) spills none.
"""
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from _scripts import nvcc_sm90a

SIG = ("void*, int, int64_t, int64_t, const T*, int64_t, int64_t, const T*, const T*, int64_t, oppo::Divisor, "
       "oppo::Divisor, const int*, const int*, const int*, int64_t, oppo::Divisor, float, oppo::Divisor, int")
# (dtype, head dim, consumer warpgroups, merged items, key split): the launcher's instantiations
KERNELS = [("__nv_bfloat16", 128, 2, False, False), ("__half", 128, 2, False, False),
           ("__nv_bfloat16", 64, 2, False, False), ("__half", 64, 2, False, False),
           ("__nv_bfloat16", 64, 3, False, False), ("__nv_bfloat16", 64, 3, True, False),
           ("__nv_bfloat16", 128, 2, True, False), ("__nv_bfloat16", 64, 3, False, True)]
MERGED_SPILL_BYTES = 64   # the _mi kernels' bound (12 and 0 bytes when measured)


def _report(T: str, D: int, NC: int, merge: bool, key_split: bool) -> str:
    src = (f'#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include "paged_prefill_wgmma.cuh"\nusing T = {T};\n'
           f"template __global__ void oppo::attn::wgp::paged_prefill_wgmma_kernel<T, {D}, {NC}, "
           f"{'true' if merge else 'false'}, {'true' if key_split else 'false'}>({SIG});\n")
    tmp = Path(tempfile.mkdtemp(prefix="prefill_ptxas_"))
    try:
        report, _ = nvcc_sm90a(src, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


@pytest.mark.parametrize("T,D,NC,merge,key_split", KERNELS)
def test_prefill_wgmma_kernels_keep_their_registers(T, D, NC, merge, key_split):
    report = _report(T, D, NC, merge, key_split)
    assert "Compiling entry function" in report, report
    assert not re.search(r"C75\d\d|Performance Loss", report), report
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills, report
    assert max(spills) <= (MERGED_SPILL_BYTES if merge else 0), report
    # setmaxnreg.inc draws only on the registers the CTA's own setmaxnreg.dec released (PTX: "a
    # pool of available registers is maintained per-CTA"): the split (Cfg<D, NC>: producer,
    # consumers) must fit in what the CTA was given at launch, or the launcher refuses the plan
    # (launch_kernel's check: the increase would wait forever). Session 29's four-warpgroup
    # kernel (640 threads, 96 each at launch) could give its consumers 112, not 120.
    if D == 128 or NC == 3:
        producer, consumer = (32, 160) if NC == 3 else (56, 224)
        used = int(re.search(r"Used (\d+) registers", report).group(1))
        assert used * 128 * (NC + 1) >= 128 * producer + 128 * NC * consumer, report
