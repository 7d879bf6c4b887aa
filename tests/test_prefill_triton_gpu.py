"""The Triton chunk-prefill kernel (``ops/prefill_triton.py``) on the GPU against the fp32 reference.

Same cases and tolerances as the CUDA kernel's prefill tests in ``test_attention_gpu.py`` (shuffled
pages of a pool with a page stride larger than one page, garbage in unused slots, -1 in unused
block-table entries, NaN-poisoned output, ragged lengths, prefix 0, chunks of 1 and of 4096, GQA
1/3/4/7/8/16, D 64/128, bf16/fp16, block sizes 8/16/32/48/64/256), plus CUDA-graph replay and
the backend dispatch. Tests run one fixed config (OPPO_TRITON_AUTOTUNE=0, set in conftest) except
the graph-replay test, which autotunes.
"""
from __future__ import annotations

import math

import pytest
import torch

from oppo_runtime.ops import attention as A
from oppo_runtime.ops import backends, prefill_triton
from test_attention_gpu import PREFILL_SHAPES, TOL_F32_OUT, PagedKV, _prefill_case, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not prefill_triton.available(), reason="needs triton")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_triton_prefill_error_in_float32_out(dtype, shape):
    Hq, Hkv, D, bs, prefixes, chunks = shape
    out, ref = _prefill_case(Hq, Hkv, D, bs, prefixes, chunks, dtype, torch.float32, backend="triton")
    assert rel_err(out, ref) < TOL_F32_OUT[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [16, 64])
def test_triton_prefill_native_dtype_output(dtype, bs):
    out, ref = _prefill_case(32, 8, 128, bs, [0, 333], [300, 45], dtype, dtype, backend="triton")
    rounding = rel_err(ref.to(dtype), ref)
    assert rel_err(out, ref) < rounding + TOL_F32_OUT[dtype]


def test_triton_prefill_after_kv_append_of_the_chunk():
    out, ref = _prefill_case(28, 4, 128, 16, [0, 70, 513], [100, 1, 64], torch.bfloat16, torch.float32,
                             via_kv_append=True, backend="triton")
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("bs", [16, 64])
def test_triton_prefill_long_chunk_and_padded_max_seqlen(bs):
    out, ref = _prefill_case(16, 4, 128, bs, [700, 0], [4096, 3], torch.bfloat16, torch.float32, pad_max=100,
                             backend="triton")
    assert rel_err(out, ref) < 2e-3


def test_triton_prefill_single_token_chunks():
    out, ref = _prefill_case(32, 8, 128, 16, [10, 400, 0], [1, 1, 1], torch.bfloat16, torch.float32,
                             backend="triton")
    assert rel_err(out, ref) < 2e-3


def test_triton_prefill_matches_cuda_kernel():
    if not A.has_cuda_kernels():
        pytest.skip("the CUDA extension is not built")
    torch.manual_seed(0)
    args = (32, 8, 128, 16, [0, 37, 500], [1, 200, 77], torch.bfloat16, torch.float32)
    out_t, ref_t = _prefill_case(*args, backend="triton")
    out_c, ref_c = _prefill_case(*args, backend="cuda")       # fresh random inputs: its own reference
    assert rel_err(out_t, ref_t) < 2e-3 and rel_err(out_c, ref_c) < 2e-3


def test_triton_prefill_cuda_graph_replay(monkeypatch):
    """Captured once (after an eager call that autotunes), replayed on new queries and lengths.
    The one test that runs the autotuner (conftest turns it off elsewhere: it compiles every config)."""
    monkeypatch.setenv("OPPO_TRITON_AUTOTUNE", "1")
    Hq, Hkv, D, bs, B, max_chunk, max_prefix = 32, 8, 128, 16, 3, 300, 900
    full = [max_chunk + max_prefix] * B
    kv = PagedKV(num_blocks=B * math.ceil(full[0] / bs) + 3, block_size=bs, Hkv=Hkv, D=D, dtype=torch.bfloat16)
    bt = kv.tables(full)
    kv.fill(bt, full)
    Nq = B * max_chunk
    q = torch.randn(Nq, Hq, D, device="cuda").bfloat16()
    cu = torch.tensor([0, 100, 350, 400], dtype=torch.int32, device="cuda")
    ctx = torch.tensor([500, 260, 950], dtype=torch.int32, device="cuda")
    out = torch.empty(Nq, Hq, D, device="cuda", dtype=torch.float32)

    def call():
        A.paged_prefill_attention(q, kv.k, kv.v, cu, ctx, bt, 0.088, out=out, max_seqlen_q=max_chunk,
                                  backend="triton")
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        chunks = torch.randint(1, max_chunk + 1, (B,))
        cu.copy_(torch.cat([torch.zeros(1, dtype=torch.long), chunks.cumsum(0)]).to(torch.int32))
        ctx.copy_((chunks + torch.randint(0, max_prefix + 1, (B,))).to(torch.int32))
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        out.fill_(float("nan"))
        graph.replay()
        n = int(cu[-1])
        ref = A.paged_prefill_attention_ref(q[:n], kv.k, kv.v, cu, ctx, bt, 0.088,
                                            out=torch.empty(n, Hq, D, device="cuda"))
        torch.cuda.synchronize()
        assert torch.isfinite(out[:n]).all() and rel_err(out[:n], ref) < 2e-3


def test_auto_backend_rule(monkeypatch):
    """Auto, head dim 64: on sm_90 the CUDA kernel in bf16 when its wgmma plans are built (the
    three-warpgroup plan, session 17), Triton in fp16 (the three-warpgroup plan is bf16 only) and
    in bf16 without sm_90a code; elsewhere the CUDA kernel when built. The env var forces one."""
    monkeypatch.delenv("OPPO_PREFILL_BACKEND", raising=False)
    monkeypatch.delenv("OPPO_OP_BACKEND", raising=False)
    monkeypatch.delenv("OPPO_PREFILL_PLAN", raising=False)
    sm90 = torch.cuda.get_device_capability()[0] == 9
    for dtype in (torch.bfloat16, torch.float16):
        _prefill_case(8, 2, 64, 16, [5], [7], dtype, torch.float32, backend=None)
        if sm90:
            wgmma3 = dtype == torch.bfloat16 and A.prefill_wgmma_available(plan="wgmma3_pp_ov_qp_xc_ps")
            expect = "cuda" if wgmma3 else "triton"
        else:
            expect = "cuda" if A.has_cuda_kernels() else "triton"
        assert backends()["paged_prefill_attention"] == expect, dtype
    monkeypatch.setenv("OPPO_PREFILL_BACKEND", "reference")
    _prefill_case(8, 2, 64, 16, [5], [7], torch.bfloat16, torch.float32, backend=None)
    assert backends()["paged_prefill_attention"] == "reference"
    monkeypatch.setenv("OPPO_PREFILL_BACKEND", "triton")
    _prefill_case(8, 2, 64, 16, [5], [7], torch.bfloat16, torch.float32, backend=None)
    assert backends()["paged_prefill_attention"] == "triton"
