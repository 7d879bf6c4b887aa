#!/usr/bin/env bash
# One device call (~8-10 min on a fresh machine; the tool stops it at 600 s, so the least important
# steps are last), session 32: session 31's unrun default changes (launch-time Divisors in both
# kernels, one offset read per K/V row, cp.async ignore-src) and session 30's _pq plans, beside the
# register-direct decode kernel (OPPO_DECODE_REG_DIRECT=1, bench +rd; never run on a GPU). In order:
# build; the D=64 prefill plans smoked in their own processes; issue 8's table (defaults and _pq
# beside Flex, 3 rounds) and issue 7's table (v7+l2, the default, and v7+rd beside SDPA and Flex;
# each row carries its error against the fp32 reference); the prefill and decode GPU tests of
# tests/test_attention_gpu.py (the register-direct ones included); issue 7's shapes again with the
# plans reversed and with the loads alone (+lo) of both loaders; issue 8's D=64 shape reversed;
# memcheck and racecheck of decode v7 and v7:rd, memcheck of _pq; the turn stamps at D=64.
#
#   OUT=$OUT bash bench/s32_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s32_check}
mkdir -p "$O"
. bench/device_commit.sh
PLANS=wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_pq_ps,wgmma_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_pq_ps
OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=$PLANS ARGS_prefill_attention="--plans $PLANS" \
  ARGS_decode_attention="--plans v7+l2,v7+rd" bash bench/gpu_check.sh decode_attention prefill_attention > /dev/null 2>&1
tail -9 "$O/report.md"
sed -n '/=== bench_decode_attention (/,/=== bench_decode_attention rc=/p' "$O/log.txt" | tail -16
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off && echo "switched off: $off"
timeout 150 bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider -k "prefill or decode" \
  tests/test_attention_gpu.py > "$O/pytest.txt" 2>&1
echo "pytest rc=$? at ${SECONDS}s"; grep -E "passed|failed|FAILED|ERROR" "$O/pytest.txt" | tail -8
timeout 90 python3 bench/decode_attention.py --no-flex --plans v7+rd,v7+l2,v7+rd+lo,v7+l2+lo \
  --out "$O/decode_rd_reversed.json" > "$O/decode_rd_reversed.txt" 2>&1
echo "decode reversed rc=$? at ${SECONDS}s"; tail -22 "$O/decode_rd_reversed.txt"
R=$(echo "$PLANS" | tr , '\n' | head -2 | tac | paste -sd,)
timeout 60 python3 bench/prefill_attention.py --no-flex --shapes 1 --plans "$R" --out "$O/prefill_d64_reversed.json" \
  > "$O/prefill_d64_reversed.txt" 2>&1
echo "prefill D=64 reversed rc=$? at ${SECONDS}s"; tail -6 "$O/prefill_d64_reversed.txt"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --decode-only --decode-plans=v7,v7:rd,v3:rd > "$O/${tool}_decode.txt" 2>&1
  echo "$tool decode rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|FAIL" "$O/${tool}_decode.txt" | tail -3
done
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
  --prefill-plans=wgmma_pp_ov_qp_xc_pq_ps,wgmma3_pp_ov_qp_xc_pq_ps > "$O/memcheck_pq.txt" 2>&1
echo "memcheck _pq rc=$?"; grep -E "ERROR SUMMARY" "$O/memcheck_pq.txt" | tail -2
for p in wgmma3_pp_ov_qp_xc_pq_ps wgmma3_pp_ov_qp_xc_ps; do
  timeout 40 python3 bench/prefill_turns.py --shapes 1 --plan $p --out "$O/prefill_turns_$p.json" > "$O/turns_$p.txt" 2>&1
  echo "turns $p rc=$?"; grep -E "^B=|^  CTA 0" "$O/turns_$p.txt" | head -4
done
