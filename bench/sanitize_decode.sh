#!/usr/bin/env bash
# compute-sanitizer racecheck and memcheck of decode sanitizer cases (bench/sanitize_attention.py
# --decode-only), one log per tool, its exit code and SUMMARY line printed. Used by the device-call
# scripts that A/B a decode switch (epilogue_check.sh, reg_stage_check.sh, heads_as_n_check.sh).
#
#   bash bench/sanitize_decode.sh OUT_DIR TAG --decode-plans=CASE[,CASE...] [TIMEOUT_S]
#   (logs: OUT_DIR/racecheck_TAG.txt, OUT_DIR/memcheck_TAG.txt; TIMEOUT_S per tool, default 60)
set -u
cd "$(dirname "$0")/.."
O=$1 TAG=$2 CASES=$3 LIMIT=${4:-60}
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in racecheck memcheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$LIMIT" "$SAN" --tool $tool --error-exitcode 9 \
    python3 bench/sanitize_attention.py --decode-only "$CASES" > "$O/${tool}_${TAG}.txt" 2>&1
  echo "$tool $TAG rc=$?"; grep -E "SUMMARY" "$O/${tool}_${TAG}.txt" | tail -1
done
