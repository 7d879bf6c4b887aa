#!/usr/bin/env bash
# Two device calls, session 29, for an H100: the four-consumer-warpgroup prefill (plans wgmma4...:
# 256-row items, 96-key tiles, P through shared memory; bench/NOTES.md "Session 29") against the
# D=64 default (wgmma3_pp_ov_qp_xc_ps).
#   OUT=$OUT bash bench/wgmma4_check.sh 1   (~7 min cold) build; each plan once in its own process
#       (a hang switches the plan off); the GPU tests of the wgmma3/wgmma4 plans, the item stamps and
#       the heads-as-N decode (session 28's G = 1 default, a73b465, not yet run on a GPU); issue 8's
#       table with both plans beside Flex (default order: wgmma3 first)
#   OUT=$OUT bash bench/wgmma4_check.sh 2   (~3 min, the same warm machine) memcheck and racecheck of
#       the wgmma4 plans; the D=64 A/B in the other order; the per-item fit (1x, 2x, 4x the keys per
#       item at the same rows) for both plans
# (carry .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/wgmma4_check}
mkdir -p "$O"
. bench/device_commit.sh
if [ "${1:-1}" = 1 ]; then
  OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=wgmma4_pp_ov,wgmma4_pp_ov_qp_ps,wgmma4_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps PYTEST_FILES=tests/test_attention_gpu.py \
    PYTEST_K="wgmma3 or wgmma4 or heads_as_n or item_stamps" PYTEST_LIMIT=200 \
    ARGS_prefill_attention="--plans wgmma3_pp_ov_qp_xc_ps,wgmma4_pp_ov_qp_xc_ps,wgmma4_pp_ov_qp_ps" bash bench/gpu_check.sh prefill_attention
  cat "$O/report.md" | tail -40
else
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
      --prefill-plans=wgmma4_pp_ov,wgmma4_pp_ov_qp_xc_ps > "$O/$tool.txt" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|prefill" "$O/$tool.txt" | tail -8
  done
  timeout 120 python3 bench/prefill_attention.py --no-flex --shapes 1 --plans wgmma4_pp_ov_qp_ps,wgmma4_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps \
    --out "$O/prefill_wgmma4_reversed.json" 2>&1 | tail -8
  timeout 150 python3 bench/prefill_attention.py --no-flex --shapes 1,32x2304x256x14x2x64,16x4864x256x14x2x64 \
    --plans wgmma3_pp_ov_qp_xc_ps,wgmma4_pp_ov_qp_xc_ps --out "$O/prefill_wgmma4_item_keys.json" 2>&1 | tail -8
fi
