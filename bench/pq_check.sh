#!/usr/bin/env bash
# One device call (~5 min on a fresh machine), session 30: each item's Q rows staged by the producer
# warpgroup into one of two Q buffers while the consumers run the item before (plans _pq,
# kFlagProducerQ, head dim 64), against the defaults. In order of what matters most if the call is
# cut short: build; the defaults and the two _pq plans once each in their own process (a failing or hanging one is
# switched off); issue 8's table with the defaults and _pq beside Flex (3 rounds), then the reverse
# order; the prefill GPU tests of tests/test_attention_gpu.py; memcheck and racecheck of the _pq
# plans; the turn stamps at D=64 with _pq and without. Session 31: the kernels divide by a launch-time
# Divisor (a864413), so the defaults are smoked too and the stamps show its boundary.
#
#   OUT=$OUT bash bench/pq_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/pq_check}
mkdir -p "$O"
. bench/device_commit.sh
PLANS=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_pq_ps,wgmma3_pp_ov_qp_xc_pq_ps
OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=$PLANS ARGS_prefill_attention="--plans $PLANS" \
  bash bench/gpu_check.sh prefill_attention > /dev/null 2>&1
tail -8 "$O/report.md"
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off
R=$(echo "$PLANS" | tr , '\n' | tac | paste -sd,)
timeout 90 python3 bench/prefill_attention.py --no-flex --plans "$R" --out "$O/prefill_pq_reversed.json" > "$O/reversed.txt" 2>&1
echo "reversed rc=$?"
timeout 120 bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider -k prefill tests/test_attention_gpu.py > "$O/pytest.txt" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|ERROR" "$O/pytest.txt" | tail -6
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma_pp_ov_qp_xc_pq_ps,wgmma3_pp_ov_qp_xc_pq_ps > "$O/$tool.txt" 2>&1
  echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|_pq" "$O/$tool.txt" | tail -3
done
for p in wgmma3_pp_ov_qp_xc_pq_ps wgmma3_pp_ov_qp_xc_ps; do
  timeout 40 python3 bench/prefill_turns.py --shapes 1 --plan $p --out "$O/prefill_turns_$p.json" > "$O/turns_$p.txt" 2>&1
  echo "turns $p rc=$?"; grep -E "^B=|^  CTA 0" "$O/turns_$p.txt" | head -4
done
