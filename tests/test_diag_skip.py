"""OPPO_DIAG_SKIP_ELEMENTWISE (ops.fused.diag_skip): bench/engine.py's ceiling of folding the
add+RMSNorm and silu*mul kernels away (session 35 measured it: -0.32 ms of a 2.15 ms step at B=256).
It never touches CPU tensors, and on CUDA a name it does not know is an error, not silently nothing."""
import pytest
import torch

from oppo_runtime.ops import fused


def test_diag_skip_is_off_on_cpu(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setenv("OPPO_DIAG_SKIP_ELEMENTWISE", "norm+silu")
    assert fused.diag_skip("norm", x) is False
    out, res = fused.fused_add_rms_norm(x, x, torch.ones(8), 1e-6)
    assert torch.equal(res, x + x) and not torch.equal(out, x)
    assert fused.silu_mul(torch.cat([x, x], dim=-1)).shape == x.shape


@pytest.mark.gpu
def test_diag_skip_on_cuda_skips_and_checks_its_names(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    y = torch.randn(3, 8, device="cuda")
    monkeypatch.setenv("OPPO_DIAG_SKIP_ELEMENTWISE", "norm,silu")
    assert fused.diag_skip("norm", y) and fused.diag_skip("silu", y)
    out, res = fused.fused_add_rms_norm(y, y, torch.ones(8, device="cuda"), 1e-6)
    assert out is y and res is y
    monkeypatch.setenv("OPPO_DIAG_SKIP_ELEMENTWISE", "rotary")
    with pytest.raises(ValueError, match="comma list"):
        fused.diag_skip("norm", y)
