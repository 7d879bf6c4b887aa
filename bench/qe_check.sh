#!/usr/bin/env bash
# Session 30's device calls on one warm machine (the first ~6 min cold, the second ~5 min warm):
# session 29's _sr (each item's rows stored through the warpgroup's Q rows as whole-row 16-byte
# stores; built, never run) and session 30's _qe (the next item's Q rows staged at the end of an
# item's last tile, its lookup after the first Q K^T from L1) against the defaults, at both head dims.
#
#   OUT=$OUT bash bench/qe_check.sh bench   build; the six plans once each in their own process
#                                           (a failing or hanging plan is switched off); issue 8's
#                                           table with all six beside Flex, then in the reverse
#                                           order; the turn stamps at D=64 with _sr and with _qe
#   OUT=$OUT bash bench/qe_check.sh tests   build (quick when warm); the six plans' smoke; the prefill GPU tests of
#                                           tests/test_attention_gpu.py; memcheck and racecheck of
#                                           the _sr and _qe plans
# (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/qe_check}
mkdir -p "$O"
. bench/device_commit.sh
PLANS=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_sr_ps,wgmma3_pp_ov_qp_xc_sr_ps,wgmma_pp_ov_qp_xc_qe_ps,wgmma3_pp_ov_qp_xc_qe_ps
case "${1:-}" in
bench)
  OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=$PLANS ARGS_prefill_attention="--plans $PLANS" \
    ARGS_prefill_turns="--shapes 1 --plan wgmma3_pp_ov_qp_xc_qe_ps" \
    bash bench/gpu_check.sh prefill_attention prefill_turns
  tail -14 "$O/report.md"
  off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
  [ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off
  R=$(echo "$PLANS" | tr , '\n' | tac | paste -sd,)
  timeout 120 python3 bench/prefill_attention.py --no-flex --plans "$R" --out "$O/prefill_qe_reversed.json" 2>&1 \
    | grep -E "done" | cut -c1-600
  timeout 60 python3 bench/prefill_turns.py --shapes 1 --plan wgmma3_pp_ov_qp_xc_sr_ps --out "$O/prefill_turns_sr.json" \
    > "$O/turns_sr.txt" 2>&1
  echo "turns _sr rc=$?"
  for f in "$O/log.txt" "$O/turns_sr.txt"; do grep -E "^  CTA 0|boundary|epilogue|q_stage|output unchanged" "$f" | head -8; done
  ;;
tests)
  OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=$PLANS PYTEST_FILES=tests/test_attention_gpu.py PYTEST_LIMIT=200 PYTEST_K="prefill" \
    bash bench/gpu_check.sh none
  tail -14 "$O/report.md"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 110 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
      --prefill-plans=wgmma3_pp_ov_qp_xc_sr_ps,wgmma_pp_ov_qp_xc_qe_ps,wgmma3_pp_ov_qp_xc_qe_ps > "$O/$tool.txt" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|_sr|_qe" "$O/$tool.txt" | tail -5
  done
  ;;
*) echo "usage: bash bench/qe_check.sh bench|tests" >&2; exit 2 ;;
esac
