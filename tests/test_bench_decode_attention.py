"""bench/decode_attention.py's parts that run without a GPU: the --ragged row's lengths, its
SDPA mask (against SDPA on each sequence's own keys), the summary that keeps it apart from
issue 7's minima, and the plan names' switches."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _scripts import load_script

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_ragged_lengths_are_a_fixed_mix_of_short_and_long_contexts():
    d = load_script(BENCH, "decode_attention")
    lens = d.ragged_lengths(128)
    assert lens == d.ragged_lengths(128) and len(lens) == 128
    assert all(129 <= n <= 128 + 4096 for n in lens)
    assert max(lens) > 4 * (sum(lens) / len(lens))        # one long context beside many short ones


def test_ragged_mask_equals_attention_over_each_sequences_own_keys():
    d = load_script(BENCH, "decode_attention")
    B, Hkv, G, D, ctx = 3, 2, 7, 16, 40
    lens = torch.tensor([40, 13, 1], dtype=torch.int32)
    q, k, v = torch.randn(B, Hkv, G, D), torch.randn(B, Hkv, ctx, D), torch.randn(B, Hkv, ctx, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=d.ragged_mask(lens, ctx))
    for b, n in enumerate(lens.tolist()):
        own = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        torch.testing.assert_close(out[b:b + 1], own, atol=1e-5, rtol=1e-5)


def test_summary_keeps_the_ragged_row_out_of_issue_7s_minima():
    d = load_script(BENCH, "decode_attention")
    rows = [{"plan": "v3", "ours_frac_copy_bw": 0.9, "speedup_vs_sdpa": 1.1, "speedup_vs_flex": 3.0},
            {"plan": "v3", "ours_frac_copy_bw": 0.7, "speedup_vs_sdpa": 0.9, "speedup_vs_flex": 2.0},
            {"plan": "v3", "ragged": True, "ours_frac_copy_bw": 0.4, "speedup_vs_sdpa": 5.0, "speedup_vs_flex": 0.5}]
    s = d._summary(rows)
    assert (s["min_fraction_of_copy_bw"], s["min_speedup_vs_sdpa_contiguous"], s["min_speedup_vs_flex"]) == (0.7, 0.9, 2.0)
    assert s["shapes"] == 2
    assert (s["ragged_fraction_of_copy_bw"], s["ragged_speedup_vs_sdpa_padded"], s["ragged_speedup_vs_flex"]) == (0.4, 5.0, 0.5)
    assert "ragged_fraction_of_copy_bw" not in d._summary(rows[:2])


def test_plan_switches_set_every_decode_switch_and_restore_them(monkeypatch):
    """A plan name states all of its switches: +lo sets OPPO_DECODE_DIAG_LOADS_ONLY=1, +rf
    OPPO_DECODE_REFILL=1, +rs OPPO_DECODE_REG_STAGE=1, their absence 0, +hn and +hn0
    OPPO_DECODE_HEADS_AS_N=1 and 0, their absence empty (the runtime's default, by the group), +sN OPPO_DECODE_SPLIT_SLOTS=N,
    its absence 0, and +sm OPPO_DECODE_FAST_MERGE=0, its absence 1 (the runtime's
    default) (so an A/B is one plan with a switch and one without,
    whatever the caller's environment), beside +pdl and +l2 / +l2x2; the caller's values come back
    after."""
    D = load_script(BENCH, "decode_attention")
    monkeypatch.setenv("OPPO_DECODE_DIAG_LOADS_ONLY", "caller")
    names = ("OPPO_DECODE_PLAN", "OPPO_DECODE_PDL", "OPPO_DECODE_PREFETCH", "OPPO_DECODE_DIAG_LOADS_ONLY",
             "OPPO_DECODE_REFILL", "OPPO_DECODE_FAST_MERGE", "OPPO_DECODE_REG_STAGE", "OPPO_DECODE_SPLIT_SLOTS",
             "OPPO_DECODE_HEADS_AS_N")
    want = {"v7+l2": ("v7", "0", "1", "0", "0", "1", "0", "0", ""),
            "v7+l2+lo": ("v7", "0", "1", "1", "0", "1", "0", "0", ""),
            "v7+rf+lo": ("v7", "0", "0", "1", "1", "1", "0", "0", ""),
            "v3+pdl+l2x2+lo+rf": ("v3", "1", "2", "1", "1", "1", "0", "0", ""),
            "v7+l2+sm": ("v7", "0", "1", "0", "0", "0", "0", "0", ""), "v6": ("v6", "0", "0", "0", "0", "1", "0", "0", ""),
            "v7+l2+rs": ("v7", "0", "1", "0", "0", "1", "1", "0", ""),
            "v7+l2+s1": ("v7", "0", "1", "0", "0", "1", "0", "1", ""),
            "v7+s12+lo": ("v7", "0", "0", "1", "0", "1", "0", "12", ""),
            "v7+l2+hn+s1": ("v7", "0", "1", "0", "0", "1", "0", "1", "1"),
            "v7+l2+hn0": ("v7", "0", "1", "0", "0", "1", "0", "0", "0")}
    for plan, values in want.items():
        assert D._SPLIT_PLAN.fullmatch(plan), plan
        with D.plan_env(plan):
            assert tuple(os.environ[n] for n in names) == values, plan
    assert os.environ["OPPO_DECODE_DIAG_LOADS_ONLY"] == "caller"
    assert not D._SPLIT_PLAN.fullmatch("v7+lo2")
    assert not D._SPLIT_PLAN.fullmatch("v7+fm")
    assert not D._SPLIT_PLAN.fullmatch("v7+s")


def test_shapes_take_indices_or_shapes_of_their_own():
    """--shapes: an index into issue 7's SHAPES, or BxCTXxHQxHKVxD (a group-size sweep beside them);
    anything else, a GQA ratio that does not divide or a head dim without a kernel, is a clear error."""
    D = load_script(BENCH, "decode_attention")
    assert D.parse_shape("4") == D.SHAPES[4]
    assert D.parse_shape(" 64x4096x16x8x128") == (64, 4096, 16, 8, 128)
    for bad in ("64x4096x16x8", "64x4096x12x8x128", "64x4096x16x8x96", "0x4096x16x8x128", "ax1x1x1x64"):
        with pytest.raises(AssertionError, match="--shapes"):
            D.parse_shape(bad)
    P = load_script(BENCH, "prefill_attention")       # prefill's shapes through the same helper: a prefix may be 0
    assert P.shape_arg("32x0x512x14x2x64", P.SHAPES, "") == (32, 0, 512, 14, 2, 64)
    assert P.shape_arg("1", P.SHAPES, "") == P.SHAPES[1]
    with pytest.raises(AssertionError, match="--shapes"):
        P.shape_arg("32x512x14x2x64", P.SHAPES, "")
