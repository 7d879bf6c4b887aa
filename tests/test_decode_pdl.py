"""OPPO_DECODE_PDL=2 in the engine: the decode attention launched with programmatic dependent launch
behind the rotary kernel, which releases it at its start, with its first K/V tiles read before its
wait (csrc/paged_decode_attention.cu, kernels/paged_decode_attention.cuh's kPW). The kernel's own
contract tests are in test_attention_gpu.py (test_decode_pdl2_reads_only_older_rows_before_the_wait)
and its SASS order in test_decode_kernel_ptxas.py."""
import pytest
import torch

from oppo_runtime.ops import fused_triton
from oppo_runtime.ops._backend import backends
from test_decode_gemm_fusion import ENGINE_CFG


def _prompts(n: int = 24) -> list[list[int]]:
    """Ragged prompts of 3 to ~250 tokens: with 24 new tokens some contexts cross 129 (the first two
    64-token tiles end before the appended row from there), some stay short, some start long."""
    g = torch.Generator().manual_seed(5)
    lens = [3 + (247 * i) // (n - 1) for i in range(n)]
    return [torch.randint(0, 512, (k,), generator=g).tolist() for k in lens]


def test_rotary_trigger_only_under_pdl2_on_a_cuda_device(monkeypatch):
    """The rotary kernel lets its dependents go early only under OPPO_DECODE_PDL=2 and on CUDA (the
    interpreter and the CPU never compile the instruction)."""
    for value in ("", "0", "1", "2"):
        monkeypatch.setenv("OPPO_DECODE_PDL", value)
        assert not fused_triton.rotary_pdl_trigger(torch.device("cpu"))
    if torch.cuda.is_available():
        monkeypatch.setenv("OPPO_DECODE_PDL", "2")
        assert fused_triton.rotary_pdl_trigger(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fold", ["0", "1"])
def test_engine_greedy_tokens_equal_under_pdl2(fold, monkeypatch):
    """Greedy generation of 24 ragged prompts (24 tokens each, contexts from 3 to 273 tokens: the
    first tiles hold the appended row for some sequences, not for others, and some cross) by engines
    in CUDA graphs, OPPO_DECODE_PDL 0 and 2, unfolded and norm-folded: the same tokens, and the
    first decode step's hidden states bit for bit (the attention reads the same bytes in the same
    order; only when it reads them moves). The run logs the rotary trigger."""
    from oppo_runtime import ops
    from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams
    from oppo_runtime.memory import KVGeometry, PagePool
    from oppo_runtime.models import ModelConfig, build_model
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    monkeypatch.setenv("OPPO_DECODE_NORM_FOLD", fold)
    runs = []
    for pdl in ("0", "2"):
        monkeypatch.setenv("OPPO_DECODE_PDL", pdl)
        m = build_model(ModelConfig.from_dict(ENGINE_CFG), seed=0, dtype=torch.bfloat16, device="cuda").eval()
        geo = KVGeometry(*m.kv_geometry(), torch.bfloat16)
        eng = ActorEngine(m, PagePool(400, PagePool.page_bytes_for([geo], 16), "cuda"),
                          EngineConfig(max_num_seqs=32, async_decode=False))
        assert eng.warmup() > 0 and eng.runner.use_graphs
        seqs = [eng.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=24), target_len=24)
                for p in _prompts()]
        while eng.stats["decode_steps"] == 0:
            eng.step()
        hidden = eng.runner.graphs[24][1]["hidden"][:24].clone()
        while eng.has_unfinished():
            eng.step()
        runs.append(([list(s.output_ids) for s in seqs], hidden))
        if pdl == "2":
            assert backends()["rotary_pdl_trigger"] == "on (OPPO_DECODE_PDL=2)"
    (want_ids, want_h), (got_ids, got_h) = runs
    assert all(len(t) == 24 for t in want_ids)
    assert torch.equal(got_h, want_h)
    assert got_ids == want_ids
