"""The decode layer's norm fold (``OPPO_DECODE_NORM_FOLD=1``): each RMSNorm's weight folded into the
projection after it, each row's RMSNorm scale applied by the rotary / silu*mul kernel after the
projection, the residual adds inside o_proj / down_proj (ops.fused, models.transformer._NormFold).

CPU: the kernels (interpreted) against their references; a model's folded decode step against the
unfolded one (float32 to float rounding, bfloat16 no further from a float32 model than the
unfolded step is); the refusals; the fold refreshed after in-place weight updates and only then,
and by ``ActorEngine.update_weights`` after a fused optimizer's step (which bumps no version counter).
GPU (``-m gpu``): the kernels over real shapes, and the engine's decode graphs after the actor's
weights change between two replays.
"""
import textwrap

import pytest
import torch

from oppo_runtime.ops import backends

from _scripts import run_check  # noqa: E402
from test_decode_gemm_fusion import MODEL_DECODE_CHECK, _model, decode_step, engine_after_first_decode  # noqa: E402

FOLD_CHECK = textwrap.dedent("""
    import torch
    from oppo_runtime.ops import fused
    dev = "{dev}"
    g = torch.Generator().manual_seed(1)

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    def close(a, b, tol, what):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (what, "NaN where the reference has none, or not")
        a, b = torch.nan_to_num(a.float()), torch.nan_to_num(b.float())
        if tol < 1e-3:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)
        else:
            err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert err < tol, (what, err)

    for dtype in ({dtypes}):
        # float32: 1e-4, element by element. The rows below include ones of tiny norm (row scales
        # up to ~100, outputs up to ~1e4), where the float32 reference itself is 2.5x 1e-5 from float64
        tol = {{torch.float32: 1e-4, torch.bfloat16: {half_tol}, torch.float16: {half_tol}}}[dtype]
        for H, D, Hq, Hkv, I in ({shapes}):
            inv = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))
            cache = fused.rotary_cos_sin_cache(inv, 40000, dev)
            for M in ({rows}):
                # the stream at a real model's scale (rows of very different norms) and a projection of it
                s = randn(M, H, dtype=dtype, scale=3.0) * randn(M, 1, dtype=dtype, scale=4.0)
                raw = randn(M, (Hq + 2 * Hkv) * D, dtype=dtype, scale=20.0)
                pos = torch.randint(0, 40000, (M,), generator=g).to(dev)
                nblk, bs = M // 4 + 3, 16
                slots = torch.randperm(nblk * bs, generator=g)[:M].to(dev)
                slots[::3] = -1
                qkn = (randn(D, dtype=dtype, scale=0.1) + 1, randn(D, dtype=dtype, scale=0.1) + 1)
                for bias, norms in ((None, (None, None)), (randn((Hq + 2 * Hkv) * D, dtype=dtype), (None, None)),
                                    (None, qkn)):
                    outs = []
                    for fn, kw in ((fused.folded_qkv_rotary, dict(backend="triton")), (fused.folded_qkv_rotary_ref, {{}})):
                        pool = torch.full((nblk, 2 * bs * Hkv * D), float("nan"), dtype=dtype, device=dev)
                        shape, stride = (nblk, bs, Hkv, D), (2 * bs * Hkv * D, Hkv * D, D, 1)
                        kc, vc = pool.as_strided(shape, stride, 0), pool.as_strided(shape, stride, bs * Hkv * D)
                        q = fn(raw, s, 1e-6, bias, Hq, Hkv, cache, pos, kc, vc, slots, *norms, 1e-5, **kw)
                        outs.append((q, pool))
                    what = f"qkv {{dtype}} H={{H}} D={{D}} Hq={{Hq}} Hkv={{Hkv}} M={{M}} bias={{bias is not None}} qk_norm={{norms[0] is not None}}"
                    close(outs[0][0], outs[1][0], tol, "q " + what)
                    close(outs[0][1], outs[1][1], tol, "pages " + what)
                gu = randn(M, 2 * I, dtype=dtype, scale=20.0)
                for bias in (None, randn(2 * I, dtype=dtype)):
                    got = fused.folded_silu_mul(gu, s, 1e-6, bias, backend="triton")
                    want = fused.folded_silu_mul_ref(gu, s, 1e-6, bias)
                    close(got, want, tol, f"silu {{dtype}} H={{H}} I={{I}} M={{M}} bias={{bias is not None}}")
    seen = fused.record_backend.__globals__["_seen"]
    assert seen["folded_qkv_rotary"] == "triton" and seen["folded_silu_mul"] == "triton", seen
    print("ok")
""")


def test_fold_kernels_equal_references_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(FOLD_CHECK.format(dev="cpu", dtypes="torch.float32, torch.bfloat16", half_tol=3e-2,  # truncates
                                shapes="(64, 32, 4, 2, 96), (96, 64, 3, 1, 4500)", rows="1, 5, 33"), interpret=True)   # 4500: 2 blocks


NORM_FOLD_CHECK = dict(switch="OPPO_DECODE_NORM_FOLD", kernel_ops=("folded_qkv_rotary", "folded_silu_mul"),
                       families=("qwen2", "llama3-rope", "qwen3"), layer="norm-folded (7 launches)")


def test_folded_decode_step_runs_the_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    run_check(MODEL_DECODE_CHECK.format(dev="cpu", dtype="float32", tol=1e-5, batches="1, 5", **NORM_FOLD_CHECK),
              interpret=True)


def _decode(model, fold, monkeypatch, **kw):
    monkeypatch.setenv("OPPO_DECODE_NORM_FOLD", "1" if fold else "0")
    return decode_step(model, fused=False, monkeypatch=monkeypatch, **kw)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("family", ["qwen2", "llama3-rope", "qwen3"])
def test_folded_decode_step_equals_the_unfolded_one_on_cpu(family, monkeypatch):
    """float32: equal to float rounding (logits and the pages the step wrote). bfloat16: the folded
    step is no further from the float32 model than the unfolded bfloat16 step is (the fold moves
    where the rounding happens, it must not lose precision)."""
    model = _model(family, torch.float32)
    model.fuse_projections()
    want, want_caches = _decode(model, False, monkeypatch)
    assert backends()["decode_layer"] == "unfused (9 launches)"
    got, got_caches = _decode(model, True, monkeypatch)
    assert backends()["decode_layer"] == "norm-folded (7 launches)"
    assert _rel(got, want) < 1e-5
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches):
        assert _rel(gk, wk) < 1e-5 and _rel(gv, wv) < 1e-5
    half = _model(family, torch.bfloat16)
    half.fuse_projections()
    unfolded = _rel(_decode(half, False, monkeypatch)[0], want)
    folded = _rel(_decode(half, True, monkeypatch)[0], want)
    assert folded < max(1.5 * unfolded, 1e-3), (folded, unfolded)


def test_fold_refusals_are_logged_and_keep_the_unfolded_layer(monkeypatch):
    model = _model("llama-bias", torch.float32)
    model.fuse_projections()
    _decode(model, True, monkeypatch)
    assert backends()["decode_layer"] == "unfused (9 launches: no norm fold with an o_proj/down_proj bias)"
    model = _model("qwen2", torch.float16)
    model.fuse_projections()
    _decode(model, True, monkeypatch)
    assert "no norm fold for torch.float16" in backends()["decode_layer"]
    model = _model("qwen2", torch.float32)
    _decode(model, True, monkeypatch)                      # the runner fuses them on CUDA
    assert backends()["decode_layer"] == "unfused (9 launches: projections not fused)"
    model.fuse_projections()
    monkeypatch.setenv("OPPO_DECODE_GEMM_FUSION", "1")
    monkeypatch.setenv("OPPO_DECODE_NORM_FOLD", "1")
    monkeypatch.setattr(monkeypatch, "setenv", lambda k, v: None)      # decode_step keeps both on
    with pytest.raises(ValueError, match="choose one"):
        decode_step(model, fused=True, monkeypatch=monkeypatch)


def test_fold_is_refreshed_after_in_place_updates_and_only_then(monkeypatch):
    """An optimizer-like in-place update of a projection or a norm weight (and a copy_ through
    update_weights' path) is seen by the next folded step; a step with no update folds nothing."""
    model = _model("qwen2", torch.float32)
    model.fuse_projections()
    _decode(model, True, monkeypatch)
    folds = [layer.norm_fold for layer in model.model.layers]
    assert all(f is not None and f.refreshes == 1 for f in folds)
    _decode(model, True, monkeypatch)
    assert all(f.refreshes == 1 for f in folds)            # nothing changed: no fold again
    assert model.refresh_norm_folds() == 0
    layer = model.model.layers[1]
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        layer.self_attn.k_proj.weight.add_(torch.randn(layer.self_attn.k_proj.weight.shape, generator=g) * 0.2)
        layer.post_attention_layernorm.weight.mul_(1.7)
        params = dict(model.named_parameters())
        params["model.layers.0.input_layernorm.weight"].copy_(params["model.layers.0.input_layernorm.weight"] * 0.6)
    unfolded, _ = _decode(model, False, monkeypatch)
    before = _decode(model, True, monkeypatch)[0]
    assert [f.refreshes for f in folds] == [2, 2]
    assert _rel(before, unfolded) < 1e-5
    # a write through .data bypasses the version counter: a stale fold shows, until forced
    with torch.no_grad():
        layer.mlp.up_proj.weight.data.mul_(1.5)
    unfolded, _ = _decode(model, False, monkeypatch)
    stale = _decode(model, True, monkeypatch)[0]
    assert _rel(stale, unfolded) > 1e-3
    assert model.refresh_norm_folds(force=True) == 2
    assert _rel(_decode(model, True, monkeypatch)[0], unfolded) < 1e-5


def test_a_fused_optimizer_step_is_folded_by_update_weights(monkeypatch):
    """The PPO loop's shared actor: the trainer's AdamW(fused=True) updates the parameters in place
    and bumps no version counter, so only the forced refresh of ``ActorEngine.update_weights`` (which
    the loop calls after every step) folds the new weights: without it the folded step is stale."""
    from oppo_runtime.engine import ActorEngine, EngineConfig
    from oppo_runtime.memory import KVGeometry, PagePool
    model = _model("qwen2", torch.float32)
    model.fuse_projections()
    _decode(model, True, monkeypatch)
    L, Hkv, D = model.kv_geometry()
    engine = ActorEngine(model, PagePool(16, PagePool.page_bytes_for([KVGeometry(L, Hkv, D, torch.float32)], 4)),
                         EngineConfig(seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    unfolded, _ = _decode(model, False, monkeypatch)
    assert model.refresh_norm_folds() == 0                 # no counter moved: what the check alone sees
    stale, _ = _decode(model, True, monkeypatch)
    assert _rel(stale, unfolded) > 1e-3
    engine.update_weights(1)
    assert all(layer.norm_fold.refreshes == 2 for layer in model.model.layers)
    assert _rel(_decode(model, True, monkeypatch)[0], unfolded) < 1e-5


def test_fold_follows_the_model_to_another_dtype(monkeypatch):
    """.to() drops the folds (they are rebuilt from the moved weights on the next folded step)."""
    model = _model("qwen2", torch.float32)
    model.fuse_projections()
    _decode(model, True, monkeypatch)
    model.to(torch.bfloat16)
    assert all(layer.norm_fold is None for layer in model.model.layers)
    _decode(model, True, monkeypatch)
    assert all(layer.norm_fold.qkv.dtype == torch.bfloat16 for layer in model.model.layers)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float32"])
def test_fold_kernels_equal_references_on_gpu(dtype):
    run_check(FOLD_CHECK.format(dev="cuda", dtypes=dtype + ",", half_tol=1e-2,
                                shapes="(896, 64, 14, 2, 4864), (1536, 128, 12, 2, 8960), (2048, 128, 32, 8, 5632)",
                                rows="1, 7, 64, 257"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("float32", 1e-5)])
def test_folded_decode_step_matches_the_unfolded_one_on_gpu(dtype, tol):
    run_check(MODEL_DECODE_CHECK.format(dev="cuda", dtype=dtype, tol=tol, batches="1, 5, 64, 200", **NORM_FOLD_CHECK))


@pytest.mark.gpu
def test_engine_decode_graphs_fold_the_new_weights_after_update_weights(monkeypatch):
    """The hazard of the fold: a decode graph reads the folded copies, which only a refresh updates.
    Three bf16 engines (unfolded; folded; folded with every refresh turned off: the runner's before
    replays and ``update_weights``' forced one, 582d820) run the same greedy prefill and first decode
    step in CUDA graphs, take the same new weights through ``update_weights`` (norms scaled,
    projections moved: in-place copies), and replay the second decode step. Where the rows' inputs
    agree, the folded engine's hidden states equal the unfolded one's within bf16 rounding; the
    engine that skipped the refresh is far off (what the test would see of a stale fold)."""
    from oppo_runtime import ops
    if not ops.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")

    def run(fold: bool, refresh: bool = True):
        monkeypatch.setenv("OPPO_DECODE_NORM_FOLD", "1" if fold else "0")
        eng, m = engine_after_first_decode(torch.bfloat16)
        assert backends()["decode_layer"] == ("norm-folded (7 launches)" if fold else "unfused (9 launches)")
        if not refresh:      # no refresh anywhere: neither the runner's before a replay nor update_weights'
            eng.runner._refresh_folds = None
            m.refresh_norm_folds = lambda force=False: 0
        w = torch.Generator().manual_seed(11)
        new = {}
        for k, v in m.state_dict().items():
            if "layernorm" in k:
                new[k] = v * (1 + torch.rand(v.shape, generator=w).to(v.device, v.dtype))
            elif "proj" in k and k.endswith("weight"):
                new[k] = v + (torch.randn(v.shape, generator=w) * 0.02).to(v.device, v.dtype)
        eng.update_weights(1, new)
        while eng.stats["decode_steps"] == 1:
            eng.step()
        st = eng.runner.graphs[24][1]
        return st["input_ids"][:24].clone(), st["hidden"][:24].float().clone()

    ids, want = run(False)
    fids, got = run(True)
    sids, stale = run(True, refresh=False)
    same = (ids == fids) & (ids == sids)
    assert same.sum() >= 12, same
    err = ((got[same] - want[same]).norm() / want[same].norm()).item()
    stale_err = ((stale[same] - want[same]).norm() / want[same].norm()).item()
    assert err < 2e-2, err
    assert stale_err > 5 * max(err, 2e-2), (stale_err, err)
