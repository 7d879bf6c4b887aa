#!/usr/bin/env bash
# One device call (~5 min on a fresh H100), session 29: where issue 8's D=64 per-item cost sits.
# Build; the GPU tests of the turn stamps (bit for bit the plain kernel's output, each warpgroup's
# chain in order), the item stamps and the wgmma3 plans; bench/prefill_turns.py at issue 8's D=64
# shape (each consumer warpgroup's turns on CTAs 0 and 1: the phases of steady and boundary turns,
# the item boundary's cost beyond two turns, the epilogue, the Q staging); then issue 8's table at
# the default plans on this card (Flex, both head dims).
#
#   OUT=$OUT bash bench/turns_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/turns_check}
mkdir -p "$O"
. bench/device_commit.sh
OUT="$O" BENCH_ONLY=1 SMOKE=0 PYTEST_FILES=tests/test_attention_gpu.py \
  PYTEST_K="turn_stamps or item_stamps or wgmma3_matches or wgmma3_persistent" PYTEST_LIMIT=150 \
  ARGS_prefill_turns="--shapes 1" \
  ARGS_prefill_attention="--plans wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps" \
  bash bench/gpu_check.sh prefill_turns prefill_attention
tail -30 "$O/report.md"
grep -A40 "^B=64" "$O/log.txt" | head -45
