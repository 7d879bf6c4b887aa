"""One shape of the decode or prefill benchmark, for Nsight Compute: warm-up calls, then
`--calls` calls of the CUDA kernel (decode: the plan of OPPO_DECODE_PLAN, default v7; prefill:
OPPO_PREFILL_PLAN, default mma) on the same paged pool as bench/decode_attention.py and
bench/prefill_attention.py. Run under ncu through bench/ncu_attention.sh, which profiles the last
calls' kernels with the sections that say where the time goes (throughput, warp stalls,
occupancy). Prints the shape's floor so that the report can be read against it.

    python3 bench/ncu_attention.py --op decode --shape 1 [--calls 3] [--block-size 16]
    OPPO_PREFILL_PLAN=wgmma python3 bench/ncu_attention.py --op prefill --shape 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import paged_pool  # noqa: E402
from decode_attention import SHAPES as DECODE_SHAPES  # noqa: E402
from prefill_attention import SHAPES as PREFILL_SHAPES  # noqa: E402

import oppo_runtime.ops  # noqa: E402


def _load_extension() -> None:
    """torch.ops.oppo exists once the built extension is loaded (importing ops does not load it)."""
    if oppo_runtime.ops.extension() is None:
        sys.exit("ncu_attention: the oppo_runtime extension is not built (pip install -e . first)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--shape", type=int, required=True, help="index into the benchmark's SHAPES")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    _load_extension()
    if args.op == "decode":
        B, ctx, Hq, Hkv, D = DECODE_SHAPES[args.shape]
        n = 1
    else:
        B, prefix, n, Hq, Hkv, D = PREFILL_SHAPES[args.shape]
        ctx = prefix + n
    k_cache, v_cache, bt = paged_pool(B, ctx, Hkv, D, args.block_size, torch.bfloat16)
    ctx_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B * n, Hq, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device="cuda")
    for _ in range(args.calls):
        if args.op == "decode":
            torch.ops.oppo.paged_decode_attention(out, q, k_cache, v_cache, bt, ctx_lens, D ** -0.5)
        else:
            torch.ops.oppo.paged_prefill_attention(out, q, k_cache, v_cache, cu, ctx_lens, bt, D ** -0.5, n)
    torch.cuda.synchronize()
    kv = 2 * B * ctx * Hkv * D * 2
    if args.op == "decode":
        print(f"decode shape {args.shape}: B={B} ctx={ctx} Hq={Hq} Hkv={Hkv} D={D}: K/V bytes {kv / 1e6:.1f} MB "
              f"(at 4.28 TB/s: {kv / 4.28e12 * 1e6:.1f} us)", flush=True)
    else:
        flops = 4.0 * D * Hq * B * (n * (ctx - n) + n * (n + 1) / 2)
        print(f"prefill shape {args.shape}: B={B} prefix={ctx - n} chunk={n} Hq={Hq} Hkv={Hkv} D={D}: "
              f"{flops / 1e9:.0f} GFLOP (at 789 TFLOP/s: {flops / 789e12 * 1e6:.0f} us)", flush=True)


if __name__ == "__main__":
    main()
