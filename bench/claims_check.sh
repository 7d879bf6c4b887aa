#!/usr/bin/env bash
# One device call (~6-7 min on a fresh H100), session 33: the splits' claims (OPPO_DECODE_CLAIM=1,
# bench +cl). Build; the decode GPU tests of the claims and of the default split merge; memcheck and
# racecheck of the claim cases; issue 7's split shapes and (1, 65536) with the default plan and with
# claims, in both plan orders, no Flex; the per-CTA stamps of both at (1, 32768) (where the SMs end).
#
#   OUT=$OUT bash bench/claims_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/claims_check}
mkdir -p "$O"
. bench/device_commit.sh
OUT="$O" BENCH_ONLY=1 SMOKE=0 PYTEST_FILES=tests/test_attention_gpu.py \
  PYTEST_K="claims or fast_merge or heads_as_n_keeps or long_context_splits or cuda_graph_replay" PYTEST_LIMIT=150 \
  bash bench/gpu_check.sh none > /dev/null 2>&1
grep -E "^\| (build|pytest)|passed|failed|FAILED|Error" "$O/report.md" | head -20
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --decode-only --decode-plans=v7:cl > "$O/$tool.txt" 2>&1
  echo "$tool rc=$?"; grep -E "SUMMARY|plan=v7:cl" "$O/$tool.txt" | tail -5
done
P=v7+l2,v7+l2+cl
R=v7+l2+cl,v7+l2
S=4,2,1x65536x32x8x128,0
timeout 150 python3 bench/decode_attention.py --no-flex --shapes "$S" --plans "$P" --out "$O/decode_claims.json" 2>&1 | tail -8
timeout 150 python3 bench/decode_attention.py --no-flex --shapes "$S" --plans "$R" --out "$O/decode_claims_reversed.json" 2>&1 | tail -8
timeout 120 python3 bench/decode_stamps.py --plans v7+l2,v7+l2+cl --shapes 4 --out "$O/decode_stamps_claims.json" 2>&1 | tail -8
