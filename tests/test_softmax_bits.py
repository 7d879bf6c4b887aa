"""The prefill wgmma kernel's two softmax bit tricks (plans _ip and _pe, kernels/paged_prefill_wgmma.cuh),
replayed in float32 on the CPU from the kernel's own source text: the cubic's coefficients and
constants are read from ex2_fma, so an edit there that breaks the error bound or the masked keys'
exact zero fails here before a GPU sees it. The GPU tests (test_attention_gpu.py
test_prefill_int_pack_and_poly_exp_match_reference) check the kernel itself against the fp32 reference."""
import re
from pathlib import Path

import numpy as np
import torch

SRC = (Path(__file__).resolve().parents[1] / "kernels" / "paged_prefill_wgmma.cuh").read_text()


def _body(name: str) -> str:
    start = SRC.index(f"__device__ __forceinline__ {name}")
    return SRC[start:SRC.index("\n}\n", start)]


def _ex2_fma_np(x: np.ndarray) -> np.ndarray:
    """ex2_fma step by step in float32 (the kernel's operations and constants)."""
    body = _body("float ex2_fma")
    clamp = np.float32(re.search(r"fmaxf\(x, (-?[0-9.]+)f\)", body).group(1))
    magic = np.float32(re.search(r"x \+ ([0-9.]+)f", body).group(1))
    c3, c2, c1, c0 = (np.float32(v) for v in re.search(
        r"fmaf\(fmaf\(fmaf\(([0-9.e-]+)f, f, ([0-9.e-]+)f\), f, ([0-9.e-]+)f\), f, ([0-9.e-]+)f\)", body).groups())
    assert "<< 23" in body
    x = np.maximum(x.astype(np.float32), clamp)
    t = (x + magic).astype(np.float32)
    f = (x - (t - magic)).astype(np.float32)
    p = ((c3 * f + c2) * f + c1) * f + c0   # fmaf rounds once per step; float32 steps round twice (within the bound)
    p = p.astype(np.float32)
    bits = p.view(np.int32).astype(np.int64) + ((t.view(np.int32).astype(np.int64) << 23) & 0xFFFFFFFF)
    bits = ((bits + 2**31) % 2**32 - 2**31).astype(np.int32)
    return bits.view(np.float32)


def test_ex2_fma_relative_error_below_bf16_step():
    x = np.concatenate([np.linspace(-126.0, 0.0, 400_001, dtype=np.float32),
                        -np.random.default_rng(0).exponential(3.0, 100_000).astype(np.float32)])
    x = x[x > -126.0]
    got = _ex2_fma_np(x).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    rel = np.abs(got / want - 1.0)
    assert rel.max() < 2.5e-4, rel.max()      # bf16's step for P is 2^-8 = 3.9e-3


def test_ex2_fma_masked_and_underflowing_keys_are_zero():
    """-inf (a masked key's score) and x <= -127 give exactly 0, as ex2.approx.ftz does: 0 x a
    poisoned V past the context stays 0 only if P is exactly 0."""
    x = np.array([-np.inf, -127.0, -200.0, -1e30], dtype=np.float32)
    assert np.all(_ex2_fma_np(x) == 0.0)
    assert np.all(np.isfinite(_ex2_fma_np(np.linspace(-127, 0, 10_001, dtype=np.float32))))
    assert _ex2_fma_np(np.array([0.0], dtype=np.float32))[0] == 1.0


def test_pack_bf16_alu_rounds_to_nearest_on_unit_interval():
    """pack_bf16_alu: add 0x8000 to the bits, keep the upper half (PRMT 0x7632 takes the upper
    halves of x and y, x low). Equal to round-to-nearest-even except at exact ties, which it rounds up."""
    body = _body("uint32_t pack_bf16_alu")
    assert "0x8000u" in body and "0x7632" in body
    g = torch.Generator().manual_seed(0)
    p = torch.cat([torch.rand(1_000_000, generator=g), torch.tensor([0.0, 1.0, 2.0**-130, 0.5])])
    bits = p.view(torch.int32).to(torch.int64)
    mine = (((bits + 0x8000) >> 16) & 0xFFFF).to(torch.int32)
    rne = p.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    tie = (bits & 0xFFFF) == 0x8000
    assert torch.equal(mine[~tie], rne[~tie])
    assert torch.all(mine[tie] - rne[tie] <= 1)
    assert int(mine[p == 1.0][0]) == 0x3F80                      # 1.0 cannot carry into the sign
    # the pair: x in the low half, y in the high half (as cvt.rn.bf16x2.f32 packs Mma::pack's (x, y))
    x, y = 0x3F12_3456, 0x3E65_4321
    sel = [(0x7632 >> (4 * k)) & 0xF for k in range(4)]
    src = [(x + 0x8000) >> (8 * b) & 0xFF for b in range(4)] + [(y + 0x8000) >> (8 * b) & 0xFF for b in range(4)]
    packed = sum(src[s] << (8 * k) for k, s in enumerate(sel))
    assert packed == (((y + 0x8000) >> 16) << 16) | ((x + 0x8000) >> 16)
