"""Training attention on the GPU: FlashAttention-2 varlen (``_FlashVarlen``) against the float32
reference (the padded path of ``varlen_causal_attention`` on float32 copies), forward and backward,
on ragged packed sequences with GQA."""
from __future__ import annotations

import os

import pytest
import torch

from oppo_runtime.ops import attention as A

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D,lens", [(14, 2, 64, [1, 37, 300, 128, 513]), (8, 8, 128, [64, 7, 1000]),
                                             (28, 4, 128, [2049, 5])])
def test_flash_varlen_matches_reference_forward_and_backward(dtype, Hq, Hkv, D, lens, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(sum(lens) + Hq)
    N = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(N, h, D, device="cuda", generator=g).to(dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    go = torch.randn(N, Hq, D, device="cuda", generator=g).to(dtype)
    scale = D ** -0.5
    monkeypatch.delenv("OPPO_TRAIN_ATTENTION", raising=False)
    assert A._training_attention_backend(q) == "flash"
    out = A.varlen_causal_attention(q, k, v, cu, scale, max_seqlen=max(lens))
    out.backward(go)
    assert torch.isfinite(out).all()
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    monkeypatch.setenv("OPPO_TRAIN_ATTENTION", "sdpa")
    ref = A.varlen_causal_attention(q32, k32, v32, cu, scale, max_seqlen=max(lens))
    ref.backward(go.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert rel_err(out, ref) < tol
    for a, b in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert rel_err(a, b) < 2 * tol
    # no information crosses sequences: changing the last sequence leaves the others' outputs
    with torch.no_grad():
        q2 = q.detach().clone()
        q2[-lens[-1]:] += 1
        k2 = k.detach().clone()
        k2[-lens[-1]:] += 1
        out2 = A.varlen_causal_attention(q2, k2, v.detach(), cu, scale, max_seqlen=max(lens))
    keep = N - lens[-1]
    # not bitwise (measured: FA2's result for a sequence moved with its neighbours' values), but at
    # rounding level, while the changed sequence moves by O(1)
    assert rel_err(out2[:keep], out.detach()[:keep]) < 1e-2
    assert rel_err(out2[keep:], out.detach()[keep:]) > 1e-1


def test_flash_is_refused_with_a_clear_error_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("OPPO_TRAIN_ATTENTION", "flash")
    q = torch.zeros(4, 2, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match="OPPO_TRAIN_ATTENTION=flash needs"):
        A._training_attention_backend(q)
