#!/usr/bin/env bash
# One device call (~5 min on a fresh H100), session 29: each item's Q rows staged by cp.async, all
# of a thread's chunks in flight at once (the default since this change), against the staging one
# chunk after another (plans _q1: what the turn stamps measured at 1.6-1.8 us per item at D=64),
# and item_at's context length loaded beside cu_seqlens_q. Build; the plans once each in their own
# process; the prefill GPU tests of both head dims and the stamps; issue 8's table with both forms
# beside Flex (the default first), then the other order; the turn stamps again.
#
#   OUT=$OUT bash bench/qstage_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/qstage_check}
mkdir -p "$O"
. bench/device_commit.sh
OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps \
  PYTEST_FILES=tests/test_attention_gpu.py PYTEST_LIMIT=150 \
  PYTEST_K="prefill" \
  ARGS_prefill_attention="--plans wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_q1_ps,wgmma3_pp_ov_qp_xc_q1_ps" \
  ARGS_prefill_turns="--shapes 1" \
  bash bench/gpu_check.sh prefill_attention prefill_turns
tail -12 "$O/report.md"
grep -E "^  (CTA 0|    steady|    first)|output unchanged" "$O/log.txt" | head -12
timeout 100 python3 bench/prefill_attention.py --no-flex --plans wgmma_pp_ov_qp_xc_q1_ps,wgmma3_pp_ov_qp_xc_q1_ps,wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps \
  --out "$O/prefill_qstage_reversed.json" 2>&1 | grep -E "done|summary" | cut -c1-400
