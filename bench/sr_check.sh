#!/usr/bin/env bash
# One device call (~6 min on a fresh H100), written in session 29 for the next: each item's rows
# stored through the warpgroup's Q rows as whole-row 16-byte stores (plans _sr, kFlagSmemRows; built,
# not yet run on a GPU) against the defaults. Build; the plans once each in their own process; the
# prefill GPU tests (the _sr ones compare bit for bit with the plans without it); memcheck and
# racecheck of the _sr plans; issue 8's table with both forms beside Flex, then the other order;
# the turn stamps with _sr (the epilogue was 0.85-1.1 us per item at D=64 without it).
#
#   OUT=$OUT bash bench/sr_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/sr_check}
mkdir -p "$O"
. bench/device_commit.sh
OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_sr_ps,wgmma3_pp_ov_qp_xc_sr_ps \
  PYTEST_FILES=tests/test_attention_gpu.py PYTEST_LIMIT=150 PYTEST_K="prefill" \
  ARGS_prefill_attention="--plans wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_sr_ps,wgmma3_pp_ov_qp_xc_sr_ps" \
  ARGS_prefill_turns="--shapes 1 --plan wgmma3_pp_ov_qp_xc_sr_ps" \
  bash bench/gpu_check.sh prefill_attention prefill_turns
tail -12 "$O/report.md"
grep -E "^  CTA|output unchanged" "$O/log.txt" | head -8
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma_pp_ov_qp_xc_sr_ps,wgmma3_pp_ov_qp_xc_sr_ps > "$O/$tool.txt" 2>&1
  echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|_sr" "$O/$tool.txt" | tail -4
done
timeout 100 python3 bench/prefill_attention.py --no-flex --plans wgmma_pp_ov_qp_xc_sr_ps,wgmma3_pp_ov_qp_xc_sr_ps,wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps \
  --out "$O/prefill_sr_reversed.json" 2>&1 | grep -E "done" | cut -c1-400
