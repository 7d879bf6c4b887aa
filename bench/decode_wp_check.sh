#!/usr/bin/env bash
# Session 24's one call for the warp-private refills (OPPO_DECODE_WARP_PIPE, bench +wp): build, the
# decode GPU tests that exercise the switch, issue 7's table with and without it (both plan orders),
# the loads probe, and memcheck + racecheck of the v7:wp sanitizer cases. OUT=$OUT bash bench/decode_wp_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
PLANS=${PLANS:-v7+l2+lo,v7+l2+wp+lo,v7+l2,v7+l2+wp,v7+wp}
REV=$(echo "$PLANS" | tr ',' '\n' | tac | paste -sd, -)
BENCH_ONLY=1 SMOKE=0 OUT=$OUT PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K="WARP_PIPE or loads_only" \
  ARGS_decode_attention="--no-flex --plans $PLANS" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
python3 bench/decode_attention.py --shapes 1,4 --no-flex --plans "$REV" --out "$OUT/rev.json" > "$OUT/rev.txt" 2>&1
python3 bench/decode_loads_probe.py --out "$OUT/loads_probe.json" > "$OUT/probe.txt" 2>&1
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --decode-only --decode-plans=v7:wp >> "$OUT/san.txt" 2>&1
  echo "$tool rc=$?" >> "$OUT/san.txt"
done
tail -30 "$OUT/report.md"; tail -6 "$OUT/rev.txt"; grep -v Warning "$OUT/probe.txt" | tail -10
grep -E "rc=|SUMMARY|FAIL|rel err" "$OUT/san.txt" | tail -20
