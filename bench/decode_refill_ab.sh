#!/usr/bin/env bash
# One device call (~4 min on a fresh machine): decode's early refill (+rf) with and without the L2
# prefetch, on v7 (3 stages, 2 CTAs per SM at D=128) and v6 (2 stages, 3 per SM), at issue 7's two
# shapes under 0.9 of copy, in both plan orders, then the per-CTA stamps of v7, v7+rf, v6, v6+rf there.
# Session 23's first call had +rf only beside the prefetch, whose path it changes (NOTES).
#
#   OUT=$OUT bash bench/decode_refill_ab.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/decode_refill_ab}
mkdir -p "$O"
A=v7+l2,v7,v7+rf,v7+l2+rf,v6+l2,v6+rf,v6+l2+rf
R=v6+l2+rf,v6+l2,v6+rf,v7+l2+rf,v7+rf,v7,v7+l2
BENCH_ONLY=1 BENCH_LIMIT=150 SMOKE_PLANS=wgmma3_pp_ov_qp_xc_ps \
  ARGS_decode_attention="--shapes 1,4 --no-flex --plans $A" \
  REPORT_TAIL=12 OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
tail -14 "$O/report.md"
timeout 150 python3 bench/decode_attention.py --shapes 1,4 --no-flex --plans $R --out "$O/decode_attention_reversed.json" 2>&1 | tail -6
timeout 150 python3 bench/decode_stamps.py --plans v7,v7+rf,v6,v6+rf --shapes 1,4 --out "$O/decode_stamps.json" 2>&1 | tail -8
bash bench/pack_out.sh "$O"
