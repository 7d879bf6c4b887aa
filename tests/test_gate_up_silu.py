"""The decode MLP's gate_up GEMM and silu*mul as one kernel (``ops.fused.gate_up_silu``,
kernels/gate_up_silu.cuh; opt-in for decode steps: ``OPPO_DECODE_GATE_UP_SILU=1``).

CPU: the reference against float64 arithmetic, the op's checks and refusals, and a model's decode
step routed through it (the reference) against the unfused step. GPU (``-m gpu``, sm_90a): the
kernel against the reference over real model shapes and ragged ones (outputs poisoned, strided rows,
K not a multiple of 64, a partial last column block, 1..256 rows), in a CUDA graph replayed on new
inputs, and the engine's first decode step in its graphs against the unfused layer.
"""
import pytest
import torch

from oppo_runtime.ops import backends
from oppo_runtime.ops import fused

from _small_m import graph_replays_on_new_inputs, kernel_matches_reference, need_kernel, rel_err  # noqa: E402
from test_decode_gemm_fusion import _model, decode_step, engine_first_decode_hidden  # noqa: E402


def _operands(M, K, I, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(2 * I, K, generator=g) * K ** -0.5).to(device, dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_silu_of_the_gate_times_the_up_product(dtype):
    x, w = _operands(7, 24, 10, dtype)
    gu = x.double() @ w.double().t()
    want = gu[:, :10] / (1 + torch.exp(-gu[:, :10])) * gu[:, 10:]
    got = fused.gate_up_silu_ref(x, w)
    assert got.dtype == dtype and got.shape == (7, 10)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=tol, atol=tol)


def test_op_runs_the_reference_on_the_cpu_and_writes_out():
    x, w = _operands(5, 16, 6, torch.float32)
    out = torch.full((5, 6), float("nan"))
    got = fused.gate_up_silu(x, w, out=out)
    assert got is out and torch.equal(out, fused.gate_up_silu_ref(x, w))
    assert backends()["gate_up_silu"] == "reference"
    assert torch.equal(fused.gate_up_silu(x, w), out)


def test_op_checks_shapes_and_says_what_the_kernel_refuses():
    x, w = _operands(5, 16, 6, torch.float32)
    with pytest.raises(ValueError, match=r"weight \[2I, K\]"):
        fused.gate_up_silu(x, w[:, :8])
    with pytest.raises(ValueError, match=r"weight \[2I, K\]"):
        fused.gate_up_silu(x, w[:11])
    with pytest.raises(ValueError, match=r"out must be \[5, 6\]"):
        fused.gate_up_silu(x, w, out=torch.empty(5, 7))
    assert fused.gate_up_silu_refuses(x, w) is None                       # the CPU: the reference serves
    assert fused.gate_up_silu_refuses(x, w, torch.zeros(12)) == "a gate/up bias"
    assert "257 rows" in fused.gate_up_silu_refuses(torch.empty(257, 16), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_through_gate_up_silu_matches_the_unfused_one_on_cpu(dtype, monkeypatch):
    """The switch routes the decode layers' MLP through gate_up_silu (the reference here): the logits
    and caches as the unfused step's, to float32 rounding (float32) or the one rounding of the
    gate/up products it skips (bfloat16)."""
    model = _model("qwen2", dtype)
    model.fuse_projections()
    monkeypatch.setenv("OPPO_DECODE_GATE_UP_SILU", "0")
    want, want_caches = decode_step(model, monkeypatch=monkeypatch)
    monkeypatch.setenv("OPPO_DECODE_GATE_UP_SILU", "1")
    got, got_caches = decode_step(model, monkeypatch=monkeypatch)
    assert backends()["decode_mlp"] == "gate_up_silu (one kernel)", backends()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert 0 < err < 2e-2, err         # not the same path: the products are not rounded in between
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches):   # layer 0's pages come before any MLP
        assert gk.shape == wk.shape and gv.shape == wv.shape
    assert torch.equal(got_caches[0][0], want_caches[0][0])


def test_decode_step_logs_why_the_kernel_does_not_serve(monkeypatch):
    """A gate/up bias (Llama's mlp_bias): the decode MLP keeps the GEMM and silu_mul, and says why."""
    model = _model("llama-bias", torch.float32)
    model.fuse_projections()
    monkeypatch.setenv("OPPO_DECODE_GATE_UP_SILU", "1")
    got, _ = decode_step(model, monkeypatch=monkeypatch)
    assert backends()["decode_mlp"] == "gate_up GEMM + silu_mul (a gate/up bias)", backends()
    monkeypatch.setenv("OPPO_DECODE_GATE_UP_SILU", "0")
    want, _ = decode_step(model, monkeypatch=monkeypatch)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("lag", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_the_reference_on_gpu(dtype, lag, monkeypatch):
    need_kernel()
    monkeypatch.setenv("OPPO_GATE_UP_SILU_LAG", lag)        # the default form and its A/B
    # (K, I): Qwen2.5-0.5B, 1.5B, the engine tests' model, K % 64 != 0 with a partial last column
    # block (104 = 2 x 40 + 24), one block of K
    kernel_matches_reference(fused.gate_up_silu, fused.gate_up_silu_ref, _operands, lambda i: i,
                             ((896, 4864), (1536, 8960), (512, 1024), (72, 104), (64, 40)), dtype,
                             2e-3 if dtype == torch.bfloat16 else 1e-3)
    assert backends()["gate_up_silu"] == "cuda"


@pytest.mark.gpu
def test_kernel_in_a_cuda_graph_replays_on_new_inputs():
    need_kernel()
    graph_replays_on_new_inputs(fused.gate_up_silu, fused.gate_up_silu_ref, _operands, lambda i: i, 896, 4864)


@pytest.mark.gpu
def test_kernel_refuses_what_it_cannot_take_on_gpu(monkeypatch):
    need_kernel()
    x, w = _operands(300, 64, 40, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="300 rows"):
        fused.gate_up_silu(x, w, backend="cuda")
    x, w = _operands(8, 64, 40, torch.bfloat16, "cuda")
    monkeypatch.setenv("OPPO_GATE_UP_SILU_LAG", "2")
    with pytest.raises(RuntimeError, match="OPPO_GATE_UP_SILU_LAG must be 0 or 1"):
        fused.gate_up_silu(x, w, backend="cuda")
    monkeypatch.delenv("OPPO_GATE_UP_SILU_LAG")
    x, w = _operands(8, 64, 40, torch.float32, "cuda")
    assert "dtype" in fused.gate_up_silu_refuses(x, w)
    got = fused.gate_up_silu(x, w)                              # auto: the reference, logged
    assert torch.equal(got, fused.gate_up_silu_ref(x, w))
    assert backends()["gate_up_silu"].startswith("reference (dtype")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_decode_step_in_cuda_graphs_with_gate_up_silu(dtype, monkeypatch):
    """The one-kernel MLP captured in the engine's decode graphs (24 sequences): the first decode
    step's hidden states as the unfused engine's within the dtype's rounding; each run logs its MLP."""
    need_kernel()
    hidden = []
    for on in ("0", "1"):
        monkeypatch.setenv("OPPO_DECODE_GATE_UP_SILU", on)
        hidden.append(engine_first_decode_hidden(dtype))
        if on == "1":
            assert backends()["decode_mlp"] == "gate_up_silu (one kernel)", backends()
    err = rel_err(hidden[1], hidden[0])
    assert 0 < err < (2e-2 if dtype == torch.bfloat16 else 5e-3), err
