"""Compile the fused decode kernel (ops.fused_triton._norm_dual_gemm_kernel) for sm_90 on a machine
without a GPU, and report what the GPU would run: whether the K loop is software-pipelined
(cp.async into a shared-memory ring), wgmma vs mma.sync, shared memory, registers, spills.

    python scripts/aot_dual_gemm.py                     # the installed Triton
    PYTHONPATH=/tmp/t36 python scripts/aot_dual_gemm.py # another Triton (pip install --target)

Pointer and stride arguments are declared divisible by 16, as the JIT specializes them at run time
for the model shapes (without that hint Triton cannot use cp.async and does not pipeline: an AOT
compile without it says nothing about the GPU).
"""
from __future__ import annotations

import inspect
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from oppo_runtime.ops import fused_triton

INTS = {"M", "K", "LIMIT_A", "OFFSET_B", "LIMIT_B", "HQ", "HKV", "max_pos", "block_size"}
DIV16 = {"x_stride", "res_stride", "res_out_stride", "w_stride", "K", "LIMIT_A", "OFFSET_B", "LIMIT_B",
         "out_stride", "cache_stride", "page_stride"}


def signature(fn) -> tuple[list[str], dict]:
    params = list(inspect.signature(fn.fn).parameters)
    sig = {}
    for p in params:
        if p.endswith("_ptr"):
            sig[p] = {"cache_ptr": "*fp32", "pos_ptr": "*i64", "slot_ptr": "*i64"}.get(p, "*bf16")
        elif p in ("eps", "qk_eps"):
            sig[p] = "fp32"
        elif p.isupper() and p not in INTS:
            sig[p] = "constexpr"
        else:
            sig[p] = "i32"
    return params, sig


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, HALF): QKV of head_dim 64 (HALF 32) in 16-column slices (SPLIT 2,
# no q/k norm) or whole heads, and of head_dim 128 (HALF 64)
CONFIGS = ((16, 16, 64, 3, 32), (16, 32, 64, 3, 32), (64, 32, 64, 3, 32), (64, 64, 64, 3, 64), (64, 32, 128, 3, 32))


def compile_config(qkv: bool, bm: int, bn: int, bk: int, stages: int, half: int) -> dict:
    """Compile one config for sm_90; its PTX counts, shared memory, registers and local memory."""
    fn = fused_triton._norm_dual_gemm_kernel
    params, sig = signature(fn)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*") or p in DIV16}
    cst = dict(EPI_QKV=qkv, HAS_QK_NORM=qkv and bn == half, HAS_RESIDUAL=True, HAS_BIAS=True, BLOCK_M=bm,
               BLOCK_N=bn, BLOCK_K=bk, HALF=half, SPLIT=half // bn, DOT_F32=False, IEEE=False)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=stages))
    ptx = k.asm["ptx"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    res = dict(kv.split(":") for ln in usage.splitlines() if ln.strip().startswith("REG") for kv in ln.split())
    return {"cp_async": ptx.count("cp.async"), "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync"), "shared": k.metadata.shared,
            "regs": int(res.get("REG", -1)), "local": int(res.get("LOCAL", -1))}


def main():
    print(f"triton {triton.__version__}, sm_90")
    for qkv in (False, True):
        for bm, bn, bk, stages, half in CONFIGS:
            r = compile_config(qkv, bm, bn, bk, stages, half)
            print(f"{'qkv' if qkv else 'gate_up':8s} BM={bm:3d} BN={bn:3d} BK={bk:3d} stages={stages} "
                  f"split={half // bn}: cp.async {r['cp_async']:3d}, wgmma {r['wgmma']:2d}, "
                  f"mma.sync {r['mma_sync']:2d}, shared {r['shared']} B, {r['regs']} registers, "
                  f"{r['local']} B local")


if __name__ == "__main__":
    main()
