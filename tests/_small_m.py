"""Helpers of the small-M GEMM kernels' tests (test_gate_up_silu.py, test_linear_ksplit.py): each op
is ``op(x, w, out=None, backend=None)`` with a reference ``ref(x, w)``, operands made by
``make(M, K, n, dtype, device, seed)`` -> (x [M, K], w), and ``cols(n)`` output columns."""
import pytest
import torch


def need_kernel():
    from oppo_runtime.ops._backend import sm90a_kernels
    if not torch.cuda.is_available() or not sm90a_kernels():
        pytest.skip("needs an sm_90 device and the extension built for 9.0a")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


ROWS = (1, 37, 64, 128, 129, 200, 256)   # each warpgroup with 0, 1 or 2 row blocks


def kernel_matches_reference(op, ref, make, cols, cases, dtype, tol):
    """The kernel against the reference over ``cases`` of (K, n) and ROWS, the output poisoned with
    NaN (every element must be written); then strided rows (x a column slice of a wider buffer, out
    written into a wider one whose other columns stay untouched) at the first case."""
    for K, n in cases:
        for M in ROWS:
            x, w = make(M, K, n, dtype, "cuda", seed=M + K)
            want = ref(x, w)
            out = torch.full((M, cols(n)), float("nan"), dtype=dtype, device="cuda")
            assert op(x, w, out=out, backend="cuda") is out
            assert not torch.isnan(out).any(), (K, n, M, "not every element written")
            err = rel_err(out, want)
            assert err < tol, (K, n, M, err)
    K, n = cases[0]
    M = 100
    xb, w = make(M, K + 64, n, dtype, "cuda", seed=5)
    x, w = xb[:, 32:32 + K], w[:, :K].contiguous()
    big = torch.full((M, cols(n) + 8), float("nan"), dtype=dtype, device="cuda")
    op(x, w, out=big[:, :cols(n)], backend="cuda")
    assert rel_err(big[:, :cols(n)], ref(x, w)) < tol
    assert torch.isnan(big[:, cols(n):]).all()


def graph_replays_on_new_inputs(op, ref, make, cols, K, n):
    """The op captured in a CUDA graph (after one eager call, which sets the kernel's attributes),
    replayed on new x twice."""
    M = 256
    x, w = make(M, K, n, torch.bfloat16, "cuda", seed=1)
    out = torch.empty(M, cols(n), dtype=torch.bfloat16, device="cuda")
    op(x, w, out=out, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(x, w, out=out, backend="cuda")
    for seed in (2, 3):
        x.copy_(make(M, K, n, torch.bfloat16, "cuda", seed=seed)[0])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref(x, w)) < 2e-3
