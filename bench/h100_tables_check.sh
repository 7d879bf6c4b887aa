#!/usr/bin/env bash
# One device call (~6 min on a fresh machine, ~4 warm), session 28, for an H100 (issue 7's and 8's
# card): issue 8's table and issue 7's engine row at the tree (bench/prefill_engine_check.sh: the
# default prefill plans, the engine's B=256 step kernel by kernel), then G = 1: the 16-row form
# (+hn0) against the default (v7+l2, the heads as N at G = 1 since a73b465; session 28 ran it as
# v7+l2 against +hn, the default then the 16-row form) at three G = 1 shapes, both orders; then
# issue 8's D=64 rate at 1x, 2x and 4x the keys per item (below).
#
#   OUT=$OUT bash bench/h100_tables_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/h100_tables_check}
mkdir -p "$O"
. bench/device_commit.sh
OUT="$O" bash bench/prefill_engine_check.sh 2>&1 | grep -v "^|.*| 0 |" | tail -40
S=3,64x4096x8x8x128,256x1024x2x2x64
for P in v7+l2+hn0,v7+l2 v7+l2,v7+l2+hn0; do
  timeout 120 python3 bench/decode_attention.py --no-flex --shapes "$S" --plans "$P" \
    --out "$O/decode_g1_${P//[,+]/_}.json" 2>&1 | tail -6
done
# Session 22's open question, no build: is D=64's per-item cost (the stamps' 3.3-5 us intercept per
# 192-row item) real? The same rows per (sequence, kv head) with 2x and 4x the keys per item (about
# the same FLOPs): if the per-item cost is ~2.5 tiles' worth, TFLOP/s rises ~10% and ~17%.
timeout 120 python3 bench/prefill_attention.py --no-flex --shapes 1,32x2304x256x14x2x64,16x4864x256x14x2x64 \
  --plans wgmma3_pp_ov_qp_xc_ps --out "$O/prefill_item_keys.json" 2>&1 | tail -6
