"""The Triton chunk-prefill kernel on the CPU, through the Triton interpreter, against the fp32 reference.

``TRITON_INTERPRET=1`` is read when a kernel is decorated (at import), so the cases run in one
child process that imports the kernel with it set; each test here checks one case's result.
Pages are shuffled, slots past each context hold NaN, the output is poisoned with NaN.

Interpreter differences from the GPU: its ``tl.dot`` multiplies bf16 bit patterns as integers
(the kernel's ``DOT_F32`` switch, on only in the interpreter, feeds fp32 operands instead), and
its fp32 -> bf16 cast truncates where the GPU rounds to nearest, which doubles the error of P's
bf16 rounding: hence the wider bf16 tolerance here (the GPU tests keep 2e-3).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent

# Hq, Hkv, D, block_size, prefixes, chunks, dtype, (BLOCK_M, BLOCK_N), max_seqlen_q padding
CASES = {
    "ragged_G4_page16_multi_page_tiles": (8, 2, 64, 16, [0, 37, 70], [1, 50, 33], "float16", (128, 64), 0),
    "bf16_G4_page16": (8, 2, 64, 16, [0, 37, 70], [1, 50, 33], "bfloat16", (128, 64), 0),
    "G7_page64_tile_in_one_page": (7, 1, 64, 64, [5, 0, 130], [40, 90, 2], "float16", (128, 64), 5),
    "G1_page48_not_pow2_D32": (4, 4, 32, 48, [95, 13], [31, 20], "float16", (128, 64), 0),
    "G8_small_tiles_bn16": (8, 1, 64, 32, [64, 3], [20, 17], "float16", (64, 16), 0),
    "D128_G2_bf16": (4, 2, 128, 16, [17, 0], [9, 24], "bfloat16", (128, 64), 0),
    "diagonal_at_tile_edges_G1": (2, 2, 64, 16, [62, 63, 64, 127], [10, 3, 70, 1], "float16", (128, 64), 0),
    "chunk1_only": (8, 2, 64, 16, [10, 0, 31], [1, 1, 1], "float16", (128, 64), 0),
}
TOL = {"float16": 1e-3, "bfloat16": 4e-3}


def _run_case(Hq, Hkv, D, bs, prefixes, chunks, dtype_name, cfg, pad, seed):
    from oppo_runtime.ops import attention as A
    from oppo_runtime.ops import prefill_triton as T

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    lens = [p + c for p, c in zip(prefixes, chunks)]
    need = [math.ceil(n / bs) for n in lens]
    nb = sum(need) + 3
    page_elems = 2 * 2 * bs * Hkv * D            # [layer][k|v] of 2 layers: page stride > one page
    pool = ((torch.rand(nb, page_elems, generator=g) * 2 - 1) * 50).to(dtype)
    one = bs * Hkv * D
    shape, stride = (nb, bs, Hkv, D), (page_elems, Hkv * D, D, 1)
    k, v = pool.as_strided(shape, stride, 2 * one), pool.as_strided(shape, stride, 3 * one)
    perm = torch.randperm(nb, generator=g)
    bt = torch.full((len(lens), max(need + [1]) + 1), -1, dtype=torch.int32)
    at = 0
    for b, nblk in enumerate(need):
        bt[b, :nblk] = perm[at:at + nblk].to(torch.int32)
        at += nblk
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        blocks = bt[b, pos // bs].long()
        for c in (k, v):
            c[blocks, pos % bs] = torch.randn(n, Hkv, D, generator=g).to(dtype)
        if n % bs:                                # the rest of the last page: NaN
            k[bt[b, n // bs].long(), n % bs:] = float("nan")
            v[bt[b, n // bs].long(), n % bs:] = float("nan")
    cu = torch.tensor([0] + torch.tensor(chunks).cumsum(0).tolist(), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    Nq = int(cu[-1])
    q = torch.randn(Nq, Hq, D, generator=g).to(dtype)
    out = torch.full((Nq, Hq, D), float("nan"), dtype=torch.float32)
    T.paged_prefill_attention(q, k, v, cu, ctx, bt, D ** -0.5, out=out, max_seqlen_q=max(chunks) + pad, config=cfg)
    out_native = T.paged_prefill_attention(q, k, v, cu, ctx, bt, D ** -0.5, max_seqlen_q=max(chunks) + pad,
                                           config=cfg)
    ref = A.paged_prefill_attention_ref(q, k, v, cu, ctx, bt.clamp_min(0), D ** -0.5, out=torch.empty(Nq, Hq, D))

    def rel(x):
        return float((x.double() - ref.double()).norm() / ref.double().norm())
    return {"finite": bool(torch.isfinite(out).all()) and bool(torch.isfinite(out_native.float()).all()),
            "native_dtype": str(out_native.dtype), "err_f32_out": rel(out), "err_native_out": rel(out_native),
            "rounding": rel(ref.to(dtype))}


def _child():
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        try:
            results[name] = _run_case(*case, seed=i)
        except Exception as e:  # noqa: BLE001
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, f"interpreter child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_prefill_matches_reference_in_interpreter(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    dtype = CASES[name][6]
    assert r["finite"], "unwritten or non-finite output"
    assert r["native_dtype"] == f"torch.{dtype}"
    assert r["err_f32_out"] < TOL[dtype], r
    assert r["err_native_out"] < r["rounding"] + TOL[dtype], r


# ----------------------------------------------------------------------------- sm_90 code, no GPU
def _compile_sm90(G, D, page, block_n, warps, stages):
    """ptxas verbose output and PTX of the kernel compiled ahead of time for sm_90a (no device)."""
    import re
    import tempfile

    from oppo_runtime.ops import prefill_triton as T
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time API: {e}")
    fn = T._prefill_kernel
    if not hasattr(fn, "arg_names"):
        pytest.skip("kernels are interpreted (TRITON_INTERPRET set)")
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "CU": "*i32", "CTX": "*i32", "BT": "*i32"}
    consts = {"G": G, "HEAD_DIM": D, "PAGE": page, "BLOCK_M": 128, "BLOCK_N": block_n, "DOT_F32": False}
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else "fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in ptrs or n.startswith("stride")}          # as the launcher specialises them
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
    except (TypeError, RuntimeError) as e:
        if "ptxas" in str(e).lower() or "signature" in str(e).lower():
            pytest.skip(f"cannot compile for sm_90 here: {str(e)[:200]}")
        raise
    ptx = k.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("no ptxas shipped with triton")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                           capture_output=True, text=True, timeout=120)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill", r.stderr)]
    return ptx, spills, r.stderr


@pytest.mark.parametrize("G,D,page,block_n,warps", [(4, 128, 16, 64, 8), (7, 64, 16, 64, 4), (4, 128, 64, 128, 8)])
def test_compiles_to_wgmma_and_async_copies_without_spills(G, D, page, block_n, warps):
    ptx, spills, log = _compile_sm90(G, D, page, block_n, warps, 3)
    assert "wgmma.mma_async" in ptx and "mma.sync" not in ptx
    assert "cp.async" in ptx, "K/V loads not pipelined"
    assert spills and max(spills) == 0, log


# ----------------------------------------------------------------------------- dispatch (CPU)
def _tiny(dtype=torch.bfloat16, D=64):
    k = torch.zeros(2, 16, 1, D, dtype=dtype)
    q = torch.randn(3, 2, D).to(dtype)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    ctx = torch.tensor([5], dtype=torch.int32)
    bt = torch.tensor([[0]], dtype=torch.int32)
    return q, k, k, cu, ctx, bt


def test_triton_backend_on_cpu_raises_instead_of_falling_back():
    from oppo_runtime.ops import MissingKernelError, paged_prefill_attention
    with pytest.raises(MissingKernelError, match="Triton kernel requested but not available"):
        paged_prefill_attention(*_tiny(), 0.125, backend="triton")


def test_triton_backend_rejects_uncovered_inputs():
    from oppo_runtime.ops import paged_prefill_attention
    with pytest.raises(ValueError, match="triton kernel takes bf16/fp16"):
        paged_prefill_attention(*_tiny(torch.float32), 0.125, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        paged_prefill_attention(*_tiny(), 0.125, backend="flash")


def test_env_forces_the_prefill_backend(monkeypatch):
    from oppo_runtime.ops import MissingKernelError, backends, paged_prefill_attention
    monkeypatch.setenv("OPPO_PREFILL_BACKEND", "triton")
    with pytest.raises(MissingKernelError):
        paged_prefill_attention(*_tiny(), 0.125)            # CPU tensors: no Triton here
    paged_prefill_attention(*_tiny(torch.float32), 0.125)   # fp32: no kernel covers it, the reference runs
    assert backends()["paged_prefill_attention"] == "reference"
    monkeypatch.setenv("OPPO_PREFILL_BACKEND", "reference")
    out = paged_prefill_attention(*_tiny(), 0.125)
    assert out.shape == (3, 2, 64) and backends()["paged_prefill_attention"] == "reference"


if __name__ == "__main__":
    _child()


def test_cuda_prefill_plan_mirrors_the_launchers_default(monkeypatch):
    """The plan the CUDA launcher runs, as the log and the auto rule read it: a named
    OPPO_PREFILL_PLAN wins; unset or auto, wgmma_pp_ov_qp_xc_ps for head dim 128 and
    wgmma3_pp_ov_qp_xc_ps for head dim 64 in bf16 (not fp16: the three-warpgroup kernel is built for
    bf16 only), only where the wgmma plans can run (sm_90 with sm_90a code, asked once per device)
    and OPPO_PREFILL_WGMMA_OFF does not switch that plan off (read at every call), else mma."""
    from oppo_runtime.ops import attention as A
    q64 = torch.zeros(2, 4, 64)
    monkeypatch.delenv("OPPO_PREFILL_PLAN", raising=False)
    monkeypatch.delenv("OPPO_PREFILL_WGMMA_OFF", raising=False)
    assert A._cuda_prefill_plan(torch.zeros(2, 4, 128)) == "mma"       # a CPU tensor: no wgmma

    def fake_q(d, dtype=torch.bfloat16):
        return type("Q", (), {"shape": (2, 4, d), "dtype": dtype, "device": torch.device("cuda", 0)})()
    fake, fake64, fake64h, fake96 = fake_q(128), fake_q(64), fake_q(64, torch.float16), fake_q(96)
    asked = []
    monkeypatch.setattr(A, "_WGMMA_HERE", {})
    monkeypatch.setattr(A, "_is_sm90", lambda device: True)
    monkeypatch.setattr(A, "prefill_wgmma_available", lambda device=None, plan=None: asked.append(device) or True)
    assert A._cuda_prefill_plan(fake) == "wgmma_pp_ov_qp_xc_ps"
    assert A._cuda_prefill_plan(fake) == "wgmma_pp_ov_qp_xc_ps" and len(asked) == 1     # cached per device
    assert A._cuda_prefill_plan(fake64) == "wgmma3_pp_ov_qp_xc_ps"
    assert A._cuda_prefill_plan(fake_q(128, torch.float16)) == "wgmma_pp_ov_qp_xc_ps"
    assert A._cuda_prefill_plan(fake64h) == "mma"          # fp16 at D=64: no three-warpgroup kernel
    assert A._cuda_prefill_plan(fake96) == "mma"
    monkeypatch.setenv("OPPO_PREFILL_PLAN", "auto")
    assert A._cuda_prefill_plan(fake) == "wgmma_pp_ov_qp_xc_ps"
    monkeypatch.setenv("OPPO_PREFILL_PLAN", "mma")
    assert A._cuda_prefill_plan(fake) == "mma"
    monkeypatch.setenv("OPPO_PREFILL_PLAN", "wgmma_pp")
    assert A._cuda_prefill_plan(fake64) == "wgmma_pp"
    monkeypatch.delenv("OPPO_PREFILL_PLAN")
    for off in ("wgmma_pp_ov_qp_xc_ps", "wgmma, all", "all"):
        monkeypatch.setenv("OPPO_PREFILL_WGMMA_OFF", off)
        assert A._cuda_prefill_plan(fake) == "mma", off
    monkeypatch.setenv("OPPO_PREFILL_WGMMA_OFF", "wgmma3_pp_ov_qp_xc_ps")
    assert A._cuda_prefill_plan(fake64) == "mma" and A._cuda_prefill_plan(fake) == "wgmma_pp_ov_qp_xc_ps"
    monkeypatch.setenv("OPPO_PREFILL_WGMMA_OFF", "wgmma_pp_ov_ps")     # another plan: not the default's
    assert A._cuda_prefill_plan(fake) == "wgmma_pp_ov_qp_xc_ps"
    monkeypatch.setattr(A, "_WGMMA_HERE", {})
    monkeypatch.setattr(A, "prefill_wgmma_available", lambda device=None, plan=None: False)   # no sm_90a code
    assert A._cuda_prefill_plan(fake) == "mma"
    assert A._cuda_prefill_plan(fake64) == "mma"
    assert A._cuda_prefill_plan(q64) == "mma"
