#!/usr/bin/env bash
# One device call (~3 min on a fresh machine): the register-staged decode loader
# (OPPO_DECODE_REG_STAGE=1, bench +rs, head dim 128) beside the default (v7+l2) on issue 7's four
# D=128 shapes in both plan orders, after its GPU tests; racecheck and memcheck of v7:rs and v3:rs.
# Session 25 ran earlier versions of this script in its calls 2-4 (b77d99f, e90e2d3, da8c739: git log
# and bench/RESULTS.md): +rs measured 2-3.5% faster on the long-CTA shapes in call 2 and 3-5% slower in
# call 4 with the same loop; run it twice, on two machines, before reading one number.
#
#   OUT=$OUT bash bench/reg_stage_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/reg_stage_check}
mkdir -p "$O"
. bench/device_commit.sh
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=100 PYTEST_LIMIT=100 PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K="reg_stage" \
  ARGS_decode_attention="--no-flex --shapes 0,2,3,4 --plans v7+l2,v7+l2+rs" \
  OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
mv "$O/decode_attention.json" "$O/decode_rs.json"
tail -8 "$O/report.md"
grep -E "passed|failed" "$O/log.txt" | tail -4
timeout 100 python3 bench/decode_attention.py --no-flex --shapes 0,2,3,4 --plans v7+l2+rs,v7+l2 \
  --out "$O/decode_rs_reversed.json" 2>&1 | tail -7
bash bench/sanitize_decode.sh "$O" rs --decode-plans=v7:rs,v3:rs
