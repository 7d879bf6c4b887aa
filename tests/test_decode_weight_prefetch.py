"""``OPPO_DECODE_WEIGHT_PREFETCH``: each decode layer's attention call is handed the weights the step
reads after it (o_proj, gate_up, down_proj, the next layer's qkv) as ``paged_decode_attention``'s
``l2_prefetch``, which its CTAs fetch into L2 as their loops end. A hint: nothing computed changes.

CPU: the switch's values; the lists each layer hands over (unfolded and norm-folded, the last layer
without a next qkv, nothing with the switch off); the decode step bit for bit with and without (the
reference checks the list and ignores it). GPU (``-m gpu``): the engine's decode graphs give the
same hidden states bit for bit under 0, 1 and 2, unfolded and folded. The kernel side is
tests/test_attention_gpu.py::test_decode_l2_prefetch_changes_nothing.
"""
import pytest
import torch

from oppo_runtime.models import transformer as T
from oppo_runtime.ops.attention import decode_weight_prefetch

from test_decode_gemm_fusion import ENGINE_CFG, _model, decode_step, engine_prompts  # noqa: E402


def test_the_switch_reads_0_1_2_and_refuses_the_rest(monkeypatch):
    monkeypatch.delenv("OPPO_DECODE_WEIGHT_PREFETCH", raising=False)
    assert decode_weight_prefetch() == 0
    for v in ("0", "1", "2"):
        monkeypatch.setenv("OPPO_DECODE_WEIGHT_PREFETCH", v)
        assert decode_weight_prefetch() == int(v)
    for bad in ("3", "-1", "yes"):
        monkeypatch.setenv("OPPO_DECODE_WEIGHT_PREFETCH", bad)
        with pytest.raises(ValueError, match="OPPO_DECODE_WEIGHT_PREFETCH"):
            decode_weight_prefetch()


def _recorded_step(model, monkeypatch, prefetch: str, fold: str):
    """One decode step with the switches set; (logits, [(l2_prefetch, l2_evict_last) per attention call])."""
    calls = []
    real = T.paged_decode_attention

    def spy(*a, **kw):
        calls.append((list(kw.get("l2_prefetch", ())), kw.get("l2_evict_last", False)))
        return real(*a, **kw)

    monkeypatch.setattr(T, "paged_decode_attention", spy)
    monkeypatch.setenv("OPPO_DECODE_WEIGHT_PREFETCH", prefetch)
    monkeypatch.setenv("OPPO_DECODE_NORM_FOLD", fold)
    logits, _ = decode_step(model, monkeypatch=monkeypatch)
    monkeypatch.setattr(T, "paged_decode_attention", real)
    return logits, calls


def _same(got, want) -> bool:
    return len(got) == len(want) and all(g is w for g, w in zip(got, want))


@pytest.mark.parametrize("fold", ["0", "1"])
def test_each_layer_hands_over_what_the_step_reads_after_its_attention(monkeypatch, fold):
    model = _model("qwen2", torch.float32)
    model.fuse_projections()
    layers = list(model.model.layers)
    assert len(layers) >= 2
    want_logits, calls = _recorded_step(model, monkeypatch, "0", fold)
    assert [c for c in calls] == [([], False)] * len(layers)
    for mode in ("1", "2"):
        logits, calls = _recorded_step(model, monkeypatch, mode, fold)
        assert torch.equal(logits, want_logits)          # a hint: the reference ignores it
        assert len(calls) == len(layers)
        for i, (layer, (got, evict_last)) in enumerate(zip(layers, calls)):
            assert evict_last == (mode == "2")
            attn, mlp = layer.self_attn, layer.mlp
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if fold == "1":
                want = [attn.o_proj.weight, layer.norm_fold.gate_up, mlp.down_proj.weight]
                want += [nxt.norm_fold.qkv] if nxt is not None else []
            else:
                want = [attn.o_proj.weight, mlp.gate_up.weight, mlp.down_proj.weight]
                want += [nxt.self_attn.qkv.weight] if nxt is not None else []
            assert _same(got, want), (i, [tuple(t.shape) for t in got])


def test_unfused_projections_are_left_out(monkeypatch):
    model = _model("qwen2", torch.float32)          # not fused: no qkv / gate_up tensor to hand over
    _, calls = _recorded_step(model, monkeypatch, "1", "0")
    layers = list(model.model.layers)
    for layer, (got, _) in zip(layers, calls):
        assert _same(got, [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight])


def test_the_reference_checks_the_list(monkeypatch):
    from oppo_runtime.ops import attention as A
    q = torch.randn(2, 4, 64)
    kc = torch.randn(3, 16, 2, 64)
    bt = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    ctx = torch.tensor([20, 5], dtype=torch.int32)
    want = A.paged_decode_attention(q, kc, kc, bt, ctx, 0.125)
    got = A.paged_decode_attention(q, kc, kc, bt, ctx, 0.125, l2_prefetch=[torch.ones(5)], l2_evict_last=True)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="at most 4"):
        A.paged_decode_attention(q, kc, kc, bt, ctx, 0.125, l2_prefetch=[torch.ones(5)] * 5)
    with pytest.raises(ValueError, match="contiguous"):
        A.paged_decode_attention(q, kc, kc, bt, ctx, 0.125, l2_prefetch=[torch.ones(4, 4).t()])


@pytest.mark.gpu
@pytest.mark.parametrize("fold", ["0", "1"])
def test_engine_decode_graphs_are_unchanged_by_the_prefetch(fold, monkeypatch):
    """The engine's decode graphs captured with the prefetch (the attention calls carry the next
    weights' pointers): the first decode step of 24 sequences gives the same hidden states bit for
    bit under OPPO_DECODE_WEIGHT_PREFETCH 0, 1 and 2."""
    from oppo_runtime import ops
    from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams
    from oppo_runtime.memory import KVGeometry, PagePool
    from oppo_runtime.models import ModelConfig, build_model
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    monkeypatch.setenv("OPPO_DECODE_NORM_FOLD", fold)
    hidden = []
    for mode in ("0", "1", "2"):
        monkeypatch.setenv("OPPO_DECODE_WEIGHT_PREFETCH", mode)
        m = build_model(ModelConfig.from_dict(ENGINE_CFG), seed=0, dtype=torch.bfloat16, device="cuda").eval()
        geo = KVGeometry(*m.kv_geometry(), torch.bfloat16)
        eng = ActorEngine(m, PagePool(400, PagePool.page_bytes_for([geo], 16), "cuda"),
                          EngineConfig(max_num_seqs=32, async_decode=False))
        assert eng.warmup() > 0 and eng.runner.use_graphs
        for p in engine_prompts():
            eng.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=8), target_len=8)
        while eng.stats["decode_steps"] == 0:
            eng.step()
        hidden.append(eng.runner.graphs[24][1]["hidden"][:24].float().clone())
        assert ops.backends()["paged_decode_attention"] == "cuda"
    assert torch.isfinite(hidden[0]).all()
    assert torch.equal(hidden[1], hidden[0]) and torch.equal(hidden[2], hidden[0])
