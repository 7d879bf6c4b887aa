#!/usr/bin/env bash
# One device call (~8-10 min on a fresh machine), session 31: both kernels now divide by launch-time
# Divisors (prefill: G, kv heads, row tiles, page size, a864413; decode's split kernel: the page
# size, e54368b; one offset read per row for its K and V copies and cp.async ignore-src, f888140 and
# 167735f), and session 30's _pq plans (never run) beside the prefill defaults. In order of what
# matters most if the call is cut short: build; the defaults and the _pq plans once each in their
# own process; issue 8's table (defaults and _pq beside Flex, 3 rounds) and issue 7's table (beside
# SDPA and Flex); the prefill and decode GPU tests of tests/test_attention_gpu.py; the prefill table
# in the reverse plan order; decode with the loads alone (+lo) beside v7; memcheck of the _pq plans
# and of decode v7, racecheck of decode v7; the turn stamps at D=64 with _pq and without.
#
#   OUT=$OUT bash bench/s31_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s31_check}
mkdir -p "$O"
. bench/device_commit.sh
PLANS=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_pq_ps,wgmma3_pp_ov_qp_xc_pq_ps
OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=$PLANS ARGS_prefill_attention="--plans $PLANS" \
  bash bench/gpu_check.sh prefill_attention decode_attention > /dev/null 2>&1
tail -9 "$O/report.md"
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off
timeout 150 bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider -k "prefill or decode" \
  tests/test_attention_gpu.py > "$O/pytest.txt" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|ERROR" "$O/pytest.txt" | tail -8
R=$(echo "$PLANS" | tr , '\n' | tac | paste -sd,)
timeout 90 python3 bench/prefill_attention.py --no-flex --plans "$R" --out "$O/prefill_pq_reversed.json" > "$O/reversed.txt" 2>&1
echo "reversed rc=$?"
timeout 90 python3 bench/decode_attention.py --no-flex --plans v7+lo,v7 --out "$O/decode_lo.json" > "$O/decode_lo.txt" 2>&1
echo "decode +lo rc=$?"; tail -14 "$O/decode_lo.txt"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
  --prefill-plans=wgmma_pp_ov_qp_xc_pq_ps,wgmma3_pp_ov_qp_xc_pq_ps > "$O/memcheck_pq.txt" 2>&1
echo "memcheck _pq rc=$?"; grep -E "ERROR SUMMARY" "$O/memcheck_pq.txt" | tail -2
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --decode-only --decode-plans=v7 > "$O/${tool}_decode.txt" 2>&1
  echo "$tool decode rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$O/${tool}_decode.txt" | tail -2
done
for p in wgmma3_pp_ov_qp_xc_pq_ps wgmma3_pp_ov_qp_xc_ps; do
  timeout 40 python3 bench/prefill_turns.py --shapes 1 --plan $p --out "$O/prefill_turns_$p.json" > "$O/turns_$p.txt" 2>&1
  echo "turns $p rc=$?"; grep -E "^B=|^  CTA 0" "$O/turns_$p.txt" | head -4
done
