#!/usr/bin/env bash
# One device call (~5 min on a fresh machine), session 25: the register-staged decode loader
# (OPPO_DECODE_REG_STAGE=1, bench +rs, head dim 128) beside the default (v7+l2) on issue 7's five
# shapes in both plan orders, after the decode GPU tests; memcheck and racecheck of the +rs cases;
# then issue 7's table with FlexAttention (bench/results/decode_attention.json).
# Session 25's call 2 ran this script's first version (b77d99f: the A/B with +sm as well, no Flex).
#
#   OUT=$OUT bash bench/reg_stage_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/reg_stage_check}
mkdir -p "$O"
. bench/device_commit.sh
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=100 PYTEST_LIMIT=150 PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K="decode or kv_append" \
  ARGS_decode_attention="--no-flex --plans v7+l2,v7+l2+rs" \
  OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
mv "$O/decode_attention.json" "$O/decode_rs2.json"
tail -10 "$O/report.md"
grep -E "passed|failed" "$O/log.txt" | tail -4
timeout 100 python3 bench/decode_attention.py --no-flex --plans v7+l2+rs,v7+l2 \
  --out "$O/decode_rs2_reversed.json" 2>&1 | tail -8
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$SAN" --tool $tool --error-exitcode 9 \
    python3 bench/sanitize_attention.py --decode-only --decode-plans=v7:rs,v3:rs > "$O/${tool}_rs.txt" 2>&1
  echo "$tool rs rc=$?"; grep -E "SUMMARY" "$O/${tool}_rs.txt" | tail -1
done
timeout 200 python3 bench/decode_attention.py --out "$O/decode_attention.json" 2>&1 | tail -9
