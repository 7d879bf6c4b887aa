"""The fused decode kernel (ops.fused_triton._norm_dual_gemm_kernel) compiled for sm_90 on the CPU
machine (scripts/aot_dual_gemm.py): the configs the decode layer launches keep their K loop
software-pipelined (cp.async into a shared-memory ring), use wgmma from 64 rows, and spill nothing.
A change that breaks pipelining (e.g. a load the pipeliner cannot take) fails here, not on a GPU."""
import os

import pytest

from _scripts import ROOT, load_script

triton = pytest.importorskip("triton")

CONFIGS = [  # (qkv, BLOCK_M, BLOCK_N, BLOCK_K, stages, HALF): what the wrappers pick for the model shapes
    (False, 64, 32, 64, 3, 32),    # gate_up, B <= 64
    (False, 64, 64, 64, 3, 64),    # gate_up, B > 64
    (True, 16, 16, 64, 3, 32),     # QKV, head_dim 64, B <= 16: heads in 16-column slices
    (True, 64, 64, 64, 3, 64),     # QKV, head_dim 128 with a q/k norm (whole heads)
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{'qkv' if c[0] else 'gate_up'}-bm{c[1]}-bn{c[2]}")
def test_dual_gemm_kernel_compiles_pipelined_for_sm90(cfg):
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("triton ships no cuobjdump here")
    aot = load_script(ROOT / "scripts", "aot_dual_gemm")
    r = aot.compile_config(*cfg)
    assert r["cp_async"] > 0, r          # the K loop's loads go through cp.async (pipelined)
    assert r["local"] == 0, r            # no spills
    assert (r["wgmma"] > 0) == (cfg[1] >= 64) and (r["mma_sync"] > 0) == (cfg[1] < 64), r
