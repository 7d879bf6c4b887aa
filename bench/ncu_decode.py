"""One shape of the decode benchmark, for Nsight Compute: warm-up calls, then `--calls` calls
of the decode kernel (the plan of OPPO_DECODE_PLAN, default v3) on the same paged pool as
bench/decode_attention.py. Run under ncu through bench/ncu_decode.sh, which profiles the last
call's kernels with the sections that say where the memory time goes (throughput, warp stalls,
occupancy). Prints the shape's floor so that the report can be read against it.

    python3 bench/ncu_decode.py --shape 1 [--calls 3] [--block-size 16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import paged_pool  # noqa: E402
from decode_attention import SHAPES  # noqa: E402

import oppo_runtime.ops  # noqa: E402,F401  (registers torch.ops.oppo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, required=True, help=f"index into SHAPES (0..{len(SHAPES) - 1})")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    B, ctx, Hq, Hkv, D = SHAPES[args.shape]
    k_cache, v_cache, bt = paged_pool(B, ctx, Hkv, D, args.block_size, torch.bfloat16)
    ctx_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(args.calls):
        torch.ops.oppo.paged_decode_attention(out, q, k_cache, v_cache, bt, ctx_lens, D ** -0.5)
    torch.cuda.synchronize()
    kv = 2 * B * ctx * Hkv * D * 2
    print(f"shape {args.shape}: B={B} ctx={ctx} Hq={Hq} Hkv={Hkv} D={D}: K/V bytes {kv / 1e6:.1f} MB "
          f"(at 4.28 TB/s: {kv / 4.28e12 * 1e6:.1f} us)", flush=True)


if __name__ == "__main__":
    main()
