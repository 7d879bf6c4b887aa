#!/usr/bin/env bash
# One device call (~6 min on a fresh machine), session 27: the heads as the mma's N made decode's
# default for groups of 2..8 heads (OPPO_DECODE_HEADS_AS_N unset). Builds; the decode GPU tests
# (the whole GPU suite: every decode test and the engine's now run the new default); issue 7's
# five shapes and a group-size sweep (G = 1, 2, 3, 7, 8 at both head dims, split and not) with the
# default (v7+l2), the 16-row form (+hn0) and the forced switch (+hn), in both plan orders; the
# engine's decode step with the default and with OPPO_DECODE_HEADS_AS_N=0; racecheck and memcheck of
# the default plans v7 and v3; then the loads alone (+lo) on the three large shapes (on an H200 they
# read 0.81-0.84 of copy where SDPA reads 1.02: is the loader the limit there?).
#
#   OUT=$OUT bash bench/hn_default_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/hn_default_check}
mkdir -p "$O"
. bench/device_commit.sh
S=0,1,2,3,4,64x4096x8x8x128,64x4096x16x8x128,64x4096x24x8x128,64x4096x64x8x128,1x32768x16x8x128,1x32768x56x8x128,256x1024x2x2x64,256x1024x4x2x64,256x1024x16x2x64
P=v7+l2,v7+l2+hn0,v7+l2+hn
R=$(echo "$P" | tr , '\n' | tac | paste -sd,)
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=150 PYTEST_LIMIT=240 PYTEST_FILES=tests \
  ARGS_decode_attention="--no-flex --shapes $S --plans $P" \
  ARGS_engine="--shapes qwen2.5-0.5b --batches 256,64 --hf-min-batch 100000 --decode-env hn0:OPPO_DECODE_HEADS_AS_N=0" \
  OUT="$O" bash bench/gpu_check.sh decode_attention engine > /dev/null 2>&1
mv "$O/decode_attention.json" "$O/decode_hn_default.json"
tail -9 "$O/report.md"
grep -E "passed|failed" "$O/log.txt" | tail -4
grep -E "^FAILED" "$O/log.txt" | head -10
grep -A16 "^ours = plan\|^  B    ctx" "$O/log.txt" | head -18
grep -a "B=256\|B=64" "$O/log.txt" | tail -4
timeout 150 python3 bench/decode_attention.py --no-flex --shapes "$S" --plans "$R" \
  --out "$O/decode_hn_default_reversed.json" 2>&1 | tail -16
bash bench/sanitize_decode.sh "$O" default --decode-plans=v7,v3 150
timeout 90 python3 bench/decode_attention.py --no-flex --shapes 0,2,3 --plans v7+l2,v7+l2+lo,v7+l2+hn0+lo \
  --out "$O/decode_lo.json" 2>&1 | tail -5
