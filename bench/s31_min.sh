#!/usr/bin/env bash
# The smallest useful device call of session 31 (~4 min on a fresh machine; for when a session has
# little device time left): gpu_check.sh's build, the D=64 prefill plans smoked, issue 7's table at
# the default (v7) beside SDPA, whose rows carry each kernel's error against the fp32 reference (the
# first GPU run of the Divisor page math and the ignore-src loader); then issue 8's D=64 shape with
# the default and _pq (3 rounds, both orders); the decode GPU tests with what is left.
#
#   OUT=$OUT bash bench/s31_min.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s31_min}
mkdir -p "$O"
. bench/device_commit.sh
PLANS=wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_pq_ps
OUT="$O" BENCH_ONLY=1 SMOKE_PLANS=$PLANS ARGS_decode_attention="--no-flex" \
  bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
tail -7 "$O/report.md"; sed -n '/=== bench_decode_attention (/,/=== bench_decode_attention rc=/p' "$O/log.txt" | tail -12
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off && echo "switched off: $off"
R=$(echo "$PLANS" | tr , '\n' | tac | paste -sd,)
for plans in "$PLANS" "$R"; do
  timeout 60 python3 bench/prefill_attention.py --no-flex --shapes 1 --plans "$plans" \
    --out "$O/prefill_d64_$([ "$plans" = "$PLANS" ] && echo fwd || echo rev).json" > "$O/prefill_$plans.txt" 2>&1
  echo "prefill $plans rc=$? at ${SECONDS}s"; tail -6 "$O/prefill_$plans.txt"
done
timeout 150 bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider -k "decode" tests/test_attention_gpu.py \
  > "$O/pytest_decode.txt" 2>&1
echo "pytest decode rc=$?"; grep -E "passed|failed|FAILED|ERROR" "$O/pytest_decode.txt" | tail -6
