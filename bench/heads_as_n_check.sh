#!/usr/bin/env bash
# One device call (~5 min on a fresh machine), session 26: decode's tiles with the heads as the mma's
# N (OPPO_DECODE_HEADS_AS_N=1, bench +hn: half the mma and exponentials for groups of <= 8 heads) and
# fewer, longer splits (OPPO_DECODE_SPLIT_SLOTS=1, bench +s1: 16 splits at (1, 32768)) beside the
# 16-row form (v7+l2+hn0, session 26's default) on issue 7's five shapes, in both plan orders, after
# their GPU tests; racecheck and memcheck of v7:hn and v3:hn.
#
#   OUT=$OUT bash bench/heads_as_n_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/heads_as_n_check}
mkdir -p "$O"
. bench/device_commit.sh
P=v7+l2+hn0,v7+l2+hn,v7+l2+hn0+s1,v7+l2+hn+s1   # +hn0: session 26's default (the 16-row form)
R=$(echo "$P" | tr , '\n' | tac | paste -sd,)
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=120 PYTEST_LIMIT=150 PYTEST_FILES=tests/test_attention_gpu.py \
  PYTEST_K="heads_as_n or split_slots or mirror" ARGS_decode_attention="--no-flex --plans $P" \
  OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
mv "$O/decode_attention.json" "$O/decode_hn_s1.json"
tail -8 "$O/report.md"
grep -E "passed|failed" "$O/log.txt" | tail -4
grep -A9 "^ours = plan" "$O/log.txt" | tail -9
timeout 120 python3 bench/decode_attention.py --no-flex --plans "$R" --out "$O/decode_hn_s1_reversed.json" 2>&1 | tail -7
bash bench/sanitize_decode.sh "$O" hn --decode-plans=v7:hn,v3:hn
