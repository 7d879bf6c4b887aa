#!/usr/bin/env bash
# One device call (~3 min on a fresh machine), session 25: the register-staged decode loader
# (OPPO_DECODE_REG_STAGE=1, bench +rs: registers from tile 2 on, stored at the top of each iteration;
# =2, +rs2: tile 2 by cp.async, registers from tile 3 on) beside the default (v7+l2) on issue 7's
# four D=128 shapes in both plan orders, after their GPU tests; memcheck and racecheck of +rs2.
# Session 25's calls 2 and 3 ran this script's earlier versions (b77d99f and e90e2d3, git log).
#
#   OUT=$OUT bash bench/reg_stage_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/reg_stage_check}
mkdir -p "$O"
. bench/device_commit.sh
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=100 PYTEST_LIMIT=100 PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K="reg_stage" \
  ARGS_decode_attention="--no-flex --shapes 0,2,3,4 --plans v7+l2,v7+l2+rs,v7+l2+rs2" \
  OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
mv "$O/decode_attention.json" "$O/decode_rs3.json"
tail -8 "$O/report.md"
grep -E "passed|failed" "$O/log.txt" | tail -4
timeout 100 python3 bench/decode_attention.py --no-flex --shapes 0,2,3,4 --plans v7+l2+rs2,v7+l2+rs,v7+l2 \
  --out "$O/decode_rs3_reversed.json" 2>&1 | tail -7
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in racecheck memcheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 "$SAN" --tool $tool --error-exitcode 9 \
    python3 bench/sanitize_attention.py --decode-only --decode-plans=v7:rs2,v7:rs > "$O/${tool}_rs.txt" 2>&1
  echo "$tool rs rc=$?"; grep -E "SUMMARY" "$O/${tool}_rs.txt" | tail -1
done
