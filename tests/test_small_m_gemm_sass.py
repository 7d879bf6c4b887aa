"""The small-M GEMM kernels' machine code (sm_90a SASS), checked without a GPU: gate_up_silu
(kernels/gate_up_silu.cuh) and linear_ksplit (kernels/linear_ksplit.cuh), which share one K loop.

Their design holds only if ptxas keeps the MMAs asynchronous: two earlier forms of gate_up_silu made
it serialize every wgmma (C7515: register fences on the accumulators inside the K loop with a group
in flight; zero-initialised accumulators with accumulate = 1). This compiles every instantiation
(bf16 / fp16; gate_up_silu's kLag 1 / 0) and checks: no performance-loss warning, no spill, and the
K loop's shape: one barrier; the step's MMAs (m64n80k16 / m64n64k16) as one batch of 8 or 4 (the
warpgroup's row blocks that hold rows < M; no wait or arrive inside a batch, one completion signal);
then the refill's cp.async copies a thread (8 rows of x, then the weights' 3 / 2) with no branch
among x's 8; then a wait down to kLag MMA groups in flight (1, the default: the tensor pipe runs
across steps; 0, gate_up_silu's A/B with one more stage of copies in flight); the copies' wait
leaving 3 - kLag groups in flight; no division. linear_ksplit's end: two cluster barriers, only the
first (the partials' release) with a memory barrier before it.
"""
import functools
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from _scripts import cuobjdump_path, nvcc_sm90a
from test_prefill_wgmma_sass import _instructions, _opcode, innermost_loop

SOURCES = {
    "gate_up_silu": """
#include "gate_up_silu.cuh"
using T = {T};
template __global__ void oppo::mlp::gate_up_silu_kernel<T, {LAG}>(T*, int64_t, const T*, int64_t, const T*, int, int,
                                                                  int);
""",
    "linear_ksplit": """
#include "linear_ksplit.cuh"
using T = {T};
template __global__ void oppo::mlp::linear_ksplit_kernel<T>(T*, int64_t, const T*, int64_t, const T*, int, int, int);
""",
}
# (kernel, dtype, kLag), and per kernel (its MMA's shape, the weight rows' copies a thread a step)
VARIANTS = [("gate_up_silu", "__nv_bfloat16", 1), ("gate_up_silu", "__half", 1), ("gate_up_silu", "__nv_bfloat16", 0),
            ("gate_up_silu", "__half", 0), ("linear_ksplit", "__nv_bfloat16", 1), ("linear_ksplit", "__half", 1)]
SHAPE = {"gate_up_silu": ("64x80x16", 3), "linear_ksplit": ("64x64x16", 2)}


@functools.lru_cache(maxsize=None)
def _build(kernel: str, dtype: str, lag: int = 1) -> tuple[str, str]:
    tmp = Path(tempfile.mkdtemp(prefix=f"sass_{kernel}_{dtype}_{lag}_"))
    try:
        return nvcc_sm90a(SOURCES[kernel].replace("{T}", dtype).replace("{LAG}", str(lag)), tmp,
                          sass_with=cuobjdump_path())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def k_loop(sass: str) -> list[str]:
    """The K loop: the innermost backward branch whose body holds the HGMMAs."""
    best = innermost_loop(sass, lambda body: any("HGMMA" in x for x in body))
    assert best is not None, "no loop with the MMAs"
    return best


@pytest.mark.parametrize("kernel,dtype,lag", VARIANTS)
def test_small_m_gemm_keeps_its_mmas_asynchronous(kernel, dtype, lag):
    report, sass = _build(kernel, dtype, lag)
    mma_shape, w_copies = SHAPE[kernel]
    assert "Potential Performance Loss" not in report, report       # no serialized wgmma (C75xx)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    body = k_loop(sass)
    ops = [_opcode(x) for x in body]
    # a step's MMAs: a batch of 8 (both row blocks) or of 4 (the first: M ends in it), each opened by
    # one arrive, with no wait inside and only its last MMA signalling
    batches, cur = [], None
    for i, x in enumerate(body):
        if "WARPGROUP.ARRIVE" in x:
            cur = []
            batches.append(cur)
        elif "HGMMA" in x:
            assert cur is not None and mma_shape in x, x
            cur.append(i)
        elif "WARPGROUP.DEPBAR" in x:
            cur = None
    assert sorted(len(b) for b in batches) == [4, 8], batches
    for b in batches:
        assert [i for i in b if "gsb0" in body[i]] == [b[-1]], [body[i] for i in b]
    mma = sorted(i for b in batches for i in b)
    assert ops.count("BAR.SYNC") == 1 or sum(o.startswith("BAR") for o in ops) == 1, ops
    bar = next(i for i, o in enumerate(ops) if o.startswith("BAR"))
    assert bar < mma[0]                                              # the stage is everyone's first
    copies = [i for i, o in enumerate(ops) if o.startswith("LDGSTS")]
    assert len(copies) == 8 + w_copies and copies[0] > mma[-1], (copies, mma)   # the refill after the MMAs
    xs = copies[:8]
    assert not any(o == "BRA" for o in ops[xs[0]:xs[-1]]), ops[xs[0]:xs[-1]]   # x's copies: no branch
    waits = [re.search(r"gsb0,\s*(0x[0-9a-f]+)", x).group(1) for x in body if "WARPGROUP.DEPBAR" in x]
    assert waits == [f"0x{lag}"], waits                              # kLag groups left in flight
    cp_waits = [re.search(r"SB0,\s*(0x[0-9a-f]+)", x).group(1) for x in body if re.search(r"\bDEPBAR\.LE SB0", x)]
    assert cp_waits == [f"0x{3 - lag}"], cp_waits                    # the copies of 4 - kLag steps ahead
    assert not [o for o in ops if re.match(r"^(I2F|F2I|MUFU\.RCP)", o)], ops


@pytest.mark.parametrize("dtype", ["__nv_bfloat16", "__half"])
def test_linear_ksplit_ends_with_two_cluster_barriers(dtype):
    """After the loop: the partial to shared memory, a cluster barrier whose arrive releases it (the
    one memory barrier), the reduction's loads from the other CTAs, the store, and a relaxed cluster
    barrier (no memory barrier: only that every CTA has read) before the exit."""
    _, sass = _build("linear_ksplit", dtype)
    ops = [_opcode(t) for _, t in _instructions(sass)]
    arv = [i for i, o in enumerate(ops) if o.startswith("UCGABAR_ARV")]
    wait = [i for i, o in enumerate(ops) if o.startswith("UCGABAR_WAIT")]
    assert len(arv) == 2 and len(wait) == 2 and arv[0] < wait[0] < arv[1] < wait[1], (arv, wait)
    membar = [i for i, o in enumerate(ops) if o.startswith("MEMBAR") and not o.startswith("MEMBAR.ALL.CTA")]
    assert len(membar) == 1 and arv[0] - 4 <= membar[0] < arv[0], (membar, arv)   # (CTA scope: the proxy fence)
    assert any(o.startswith("STG") for o in ops[wait[0]:arv[1]])
