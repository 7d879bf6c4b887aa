#!/usr/bin/env bash
# The smallest useful device call of session 31 (~4 min on a fresh machine; for when a session has
# little device time left): build; issue 7's table at the default (v7) beside SDPA, whose rows carry
# each kernel's error against the fp32 reference (the first GPU run of the Divisor page math and the
# ignore-src loader); the D=64 prefill plans smoked, then issue 8's D=64 shape with the default and
# _pq (3 rounds, both orders); the decode GPU tests with what is left.
#
#   OUT=$OUT bash bench/s31_min.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s31_min}
mkdir -p "$O"
. bench/device_commit.sh
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.txt" 2>&1 || { tail -30 "$O/build.txt"; exit 1; }
echo "built at ${SECONDS}s"
timeout 80 python3 bench/decode_attention.py --no-flex --out "$O/decode_attention.json" > "$O/decode.txt" 2>&1
echo "decode rc=$? at ${SECONDS}s"; tail -12 "$O/decode.txt"
PLANS=wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_pq_ps
timeout 40 python3 bench/wgmma_smoke.py --plans $PLANS > "$O/smoke.txt" 2>&1
echo "smoke rc=$?"; off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/smoke.txt" | tail -1 | cut -d= -f2)
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
