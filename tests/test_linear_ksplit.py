"""The decode step's o_proj and down_proj as one kernel in clusters of 8 CTAs that split K
(``ops.fused.linear_ksplit``, kernels/linear_ksplit.cuh; opt-in: ``OPPO_DECODE_LINEAR_KSPLIT=1``).

CPU: the reference against float64 arithmetic, the op's checks and refusals, and a model's decode
step routed through it (the reference) against the unrouted step. GPU (``-m gpu``, sm_90a): the
kernel against the reference over real model shapes and ragged ones (outputs poisoned, strided rows,
K shorter than 8 k-blocks so that some CTAs of a cluster have none, a partial column tile, 1..256
rows), in a CUDA graph replayed on new inputs, and the engine's first decode step in its graphs.
"""
import pytest
import torch

from oppo_runtime.ops import backends
from oppo_runtime.ops import fused

from test_decode_gemm_fusion import _model, decode_step, engine_first_decode_hidden  # noqa: E402
from _small_m import graph_replays_on_new_inputs, kernel_matches_reference, need_kernel, rel_err  # noqa: E402


def _operands(M, K, N, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device, dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_float32_product_rounded_once(dtype):
    x, w = _operands(7, 40, 16, dtype)
    want = (x.double() @ w.double().t()).to(dtype)
    got = fused.linear_ksplit_ref(x, w)
    assert got.dtype == dtype and got.shape == (7, 16)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def test_op_runs_the_reference_on_the_cpu_checks_and_refuses():
    x, w = _operands(5, 16, 8, torch.float32)
    out = torch.full((5, 8), float("nan"))
    assert fused.linear_ksplit(x, w, out=out) is out and torch.equal(out, fused.linear_ksplit_ref(x, w))
    assert backends()["linear_ksplit"] == "reference"
    with pytest.raises(ValueError, match=r"weight \[N, K\]"):
        fused.linear_ksplit(x, w[:, :8])
    with pytest.raises(ValueError, match=r"out must be \[5, 8\]"):
        fused.linear_ksplit(x, w, out=torch.empty(5, 9))
    assert fused.linear_ksplit_refuses(x, w) is None
    assert fused.linear_ksplit_refuses(x, w, torch.zeros(8)) == "a bias"
    assert "257 rows" in fused.linear_ksplit_refuses(torch.empty(257, 16), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_through_linear_ksplit_matches_the_plain_one_on_cpu(dtype, monkeypatch):
    """The switch routes the decode layers' o_proj and down_proj through linear_ksplit (the reference
    here): the logits as the plain step's, to float32 rounding (float32) or within bf16's (one rounding
    of a float32 sum against F.linear's own)."""
    model = _model("qwen2", dtype)
    model.fuse_projections()
    monkeypatch.setenv("OPPO_DECODE_LINEAR_KSPLIT", "0")
    want, _ = decode_step(model, monkeypatch=monkeypatch)
    monkeypatch.setenv("OPPO_DECODE_LINEAR_KSPLIT", "1")
    got, _ = decode_step(model, monkeypatch=monkeypatch)
    assert backends()["decode_linear"] == "linear_ksplit", backends()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert rel_err(got, want) < 2e-2


def test_decode_step_logs_why_the_kernel_does_not_serve(monkeypatch):
    """Biases on o_proj and down_proj (Llama's attention_bias / mlp_bias): F.linear, and why."""
    model = _model("llama-bias", torch.float32)
    model.fuse_projections()
    monkeypatch.setenv("OPPO_DECODE_LINEAR_KSPLIT", "1")
    got, _ = decode_step(model, monkeypatch=monkeypatch)
    assert backends()["decode_linear"] == "F.linear (a bias)", backends()
    monkeypatch.setenv("OPPO_DECODE_LINEAR_KSPLIT", "0")
    want, _ = decode_step(model, monkeypatch=monkeypatch)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_the_reference_on_gpu(dtype):
    need_kernel()
    # (K, N): 0.5B's down_proj and o_proj, 1.5B's, the engine tests' model's down_proj; K of 2 k-blocks
    # (6 CTAs of each cluster without one) with a partial column tile; one k-block in all
    kernel_matches_reference(fused.linear_ksplit, fused.linear_ksplit_ref, _operands, lambda n: n,
                             ((4864, 896), (896, 896), (8960, 1536), (1536, 1536), (1024, 512), (72, 24), (64, 8)),
                             dtype, 2e-3 if dtype == torch.bfloat16 else 1e-3)
    assert backends()["linear_ksplit"] == "cuda"


@pytest.mark.gpu
def test_kernel_in_a_cuda_graph_replays_on_new_inputs():
    need_kernel()
    graph_replays_on_new_inputs(fused.linear_ksplit, fused.linear_ksplit_ref, _operands, lambda n: n, 4864, 896)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_decode_step_in_cuda_graphs_with_linear_ksplit(dtype, monkeypatch):
    """o_proj and down_proj through linear_ksplit, captured in the engine's decode graphs (24
    sequences): the first decode step's hidden states as the plain engine's within the dtype's rounding."""
    need_kernel()
    hidden = []
    for on in ("0", "1"):
        monkeypatch.setenv("OPPO_DECODE_LINEAR_KSPLIT", on)
        hidden.append(engine_first_decode_hidden(dtype))
        if on == "1":
            assert backends()["decode_linear"] == "linear_ksplit", backends()
    err = rel_err(hidden[1], hidden[0])
    assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), err
