#!/usr/bin/env bash
# One device call (~7 min on a fresh H100), session 30: each item's Q rows staged by the producer
# warpgroup into one of two Q buffers while the consumers run the item before (plans _pq,
# kFlagProducerQ, head dim 64), against the defaults. Build; the four plans once each in their own
# process (a failing or hanging one is switched off); the prefill GPU tests of
# tests/test_attention_gpu.py; issue 8's table with the defaults and _pq beside Flex (3 rounds),
# then the reverse order; the turn stamps at D=64 with _pq and without; memcheck and racecheck of
# the _pq plans.
#
#   OUT=$OUT bash bench/pq_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/pq_check}
mkdir -p "$O"
. bench/device_commit.sh
PLANS=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_pq_ps,wgmma3_pp_ov_qp_xc_pq_ps
OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=$PLANS PYTEST_FILES=tests/test_attention_gpu.py PYTEST_LIMIT=200 PYTEST_K="prefill" \
  ARGS_prefill_attention="--plans $PLANS" ARGS_prefill_turns="--shapes 1 --plan wgmma3_pp_ov_qp_xc_pq_ps" \
  bash bench/gpu_check.sh prefill_attention prefill_turns
tail -14 "$O/report.md"
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off
R=$(echo "$PLANS" | tr , '\n' | tac | paste -sd,)
timeout 120 python3 bench/prefill_attention.py --no-flex --plans "$R" --out "$O/prefill_pq_reversed.json" 2>&1 \
  | grep -E "done" | cut -c1-500
timeout 60 python3 bench/prefill_turns.py --shapes 1 --plan wgmma3_pp_ov_qp_xc_ps --out "$O/prefill_turns_default.json" \
  > "$O/turns_default.txt" 2>&1
echo "turns default rc=$?"
for f in "$O/log.txt" "$O/turns_default.txt"; do grep -E "^B=|^  CTA 0" "$f" | head -4; done
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma_pp_ov_qp_xc_pq_ps,wgmma3_pp_ov_qp_xc_pq_ps > "$O/$tool.txt" 2>&1
  echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|_pq" "$O/$tool.txt" | tail -4
done
