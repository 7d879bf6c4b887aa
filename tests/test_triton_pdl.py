"""OPPO_TRITON_PDL: the add+RMSNorm, rotary and silu*mul Triton kernels launched with programmatic
dependent launch (ops.fused_triton.pdl_enabled).

CPU: the switch's parsing, and each kernel compiled for sm_90 here waits (griddepcontrol.wait)
before anything else when USE_GDC is on and carries no griddepcontrol when it is off.
GPU (``-m gpu``): each kernel with the switch on, launched right behind a long cuBLAS matmul that
writes its input (eager and captured in a CUDA graph, replayed), gives bit for bit what it gives
with the switch off; without the in-kernel wait it would read the matmul's output half written.
"""
import inspect

import pytest
import torch

from oppo_runtime.ops import fused_triton

triton = pytest.importorskip("triton")


def test_switch_parsing(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("OPPO_TRITON_PDL", raising=False)
    assert fused_triton.pdl_enabled(cpu) is False
    monkeypatch.setenv("OPPO_TRITON_PDL", "0")
    assert fused_triton.pdl_enabled(cpu) is False
    monkeypatch.setenv("OPPO_TRITON_PDL", "yes")
    with pytest.raises(ValueError, match="OPPO_TRITON_PDL must be 0 or 1"):
        fused_triton.pdl_enabled(cpu)
    monkeypatch.setenv("OPPO_TRITON_PDL", "1")
    assert fused_triton.pdl_enabled(cpu) is False          # CPU tensors: nothing to launch with PDL
    assert fused_triton._pdl_args(cpu) == {"USE_GDC": False}


KERNELS = {   # kernel -> its constexprs besides USE_GDC (the decode shapes of Qwen2.5-0.5B)
    "_add_rms_norm_kernel": dict(HAS_RESIDUAL=True, BLOCK=1024),
    "_rotary_qk_kernel": dict(HALF=32, BLOCK_HQ=16, BLOCK_HKV=2, BLOCK_D=32, HAS_NORM=False, WRITE_KV=True),
    "_silu_mul_kernel": dict(BLOCK=1024),
}


def _ptx(name: str, use_gdc: bool) -> str:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time API: {e}")
    fn = getattr(fused_triton, name)
    if not hasattr(fn, "fn"):
        pytest.skip("kernels are interpreted (TRITON_INTERPRET set)")
    consts = dict(KERNELS[name], USE_GDC=use_gdc)
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        if p.endswith("_ptr"):
            sig[p] = {"cache_ptr": "*fp32", "pos_ptr": "*i64", "slot_ptr": "*i64"}.get(p, "*bf16")
        elif p in consts:
            sig[p] = "constexpr"
        else:
            sig[p] = "fp32" if p == "eps" else "i32"
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4))
    except (TypeError, RuntimeError) as e:
        if "ptxas" in str(e).lower():
            pytest.skip(f"cannot compile for sm_90 here: {str(e)[:200]}")
        raise
    return k.asm["ptx"]


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_wait_first_only_when_launched_with_pdl(name):
    on, off = _ptx(name, True), _ptx(name, False)
    assert "griddepcontrol" not in off
    assert "griddepcontrol.wait" in on
    body = on[on.index("griddepcontrol.wait"):]
    before = on[:on.index("griddepcontrol.wait")]
    assert "ld.global" not in before, "a global load is issued before the wait"
    assert "ld.global" in body and "st.global" in body
    if name != "_add_rms_norm_kernel":
        assert "griddepcontrol.launch_dependents" in on


GPU_CHECK = r"""
import os, torch
from oppo_runtime.ops import fused_triton as ft
dev = torch.device("cuda")
torch.manual_seed(0)
N, H, Hq, Hkv, D, I = 256, 896, 14, 2, 64, 4864
big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)   # a long matmul ahead of each kernel
def inputs():
    a = torch.randn(N, 8192, device=dev, dtype=torch.bfloat16) / 90
    w1 = torch.randn(H, 8192, device=dev, dtype=torch.bfloat16)
    w2 = torch.randn((Hq + 2 * Hkv) * D, 8192, device=dev, dtype=torch.bfloat16)
    w3 = torch.randn(2 * I, 8192, device=dev, dtype=torch.bfloat16)
    res = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
    nw = torch.rand(H, device=dev, dtype=torch.bfloat16) + 0.5
    cache = torch.randn(4096, D, device=dev)
    pos = torch.randint(0, 4096, (N,), device=dev)
    kc = torch.zeros(64, 16, Hkv, D, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(64 * 16, device=dev)[:N]
    return a, w1, w2, w3, res, nw, cache, pos, kc, vc, slots
def step(a, w1, w2, w3, res, nw, cache, pos, kc, vc, slots):
    torch.mm(big, big)                        # keep the GPU busy so the launches overlap a running kernel
    x = a @ w1.t()                            # the kernels' inputs come straight out of cuBLAS
    normed, new_res = ft.add_rms_norm(x, res, nw, 1e-6)
    qkv = a @ w2.t()
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k = ft.rotary_qk(q.view(N, Hq, D), k.view(N, Hkv, D), cache, pos, None, None, 1e-6,
                        kv=(v.view(N, Hkv, D), kc, vc, slots))
    act = ft.silu_mul(a @ w3.t())
    return normed, new_res, q, k, act, kc.clone(), vc.clone()
ins = inputs()
os.environ["OPPO_TRITON_PDL"] = "0"
ref = step(*ins)
os.environ["OPPO_TRITON_PDL"] = "1"
assert ft.pdl_enabled(dev)
for rep in range(3):
    got = step(*ins)
    for r, g in zip(ref, got):
        assert torch.equal(r, g), (rep, (r.float() - g.float()).abs().max().item())
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    step(*ins)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    out = step(*ins)
for rep in range(3):
    for t in ins[-3:-1]:
        t.zero_()
    g.replay()
    torch.cuda.synchronize()
    for r, o in zip(ref, out):
        assert torch.equal(r, o), ("graph", rep, (r.float() - o.float()).abs().max().item())
print("ok")
"""


@pytest.mark.gpu
def test_pdl_launches_equal_plain_launches_behind_cublas_eager_and_in_a_graph():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", GPU_CHECK], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_diag_skip_is_off_on_cpu_and_checks_its_names(monkeypatch):
    """OPPO_DIAG_SKIP_ELEMENTWISE (bench/engine.py's ceiling of folding the elementwise kernels away)
    never touches CPU tensors, and a name it does not know is an error, not silently nothing."""
    from oppo_runtime.ops import fused
    x = torch.randn(3, 8)
    monkeypatch.setenv("OPPO_DIAG_SKIP_ELEMENTWISE", "norm,silu")
    assert fused.diag_skip("norm", x) is False
    out, res = fused.fused_add_rms_norm(x, x, torch.ones(8), 1e-6)
    assert torch.equal(res, x + x) and not torch.equal(out, x)
    if torch.cuda.is_available():
        y = x.cuda()
        assert fused.diag_skip("norm", y) and fused.diag_skip("silu", y)
        monkeypatch.setenv("OPPO_DIAG_SKIP_ELEMENTWISE", "rotary")
        with pytest.raises(ValueError, match="comma list"):
            fused.diag_skip("norm", y)
