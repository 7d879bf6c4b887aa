#!/usr/bin/env bash
# One device call (~9 min on a fresh machine): decode's early stage refill (OPPO_DECODE_REFILL, session
# 23) against the refill after the next tile lands, issue 7's table (bench/results/decode_attention.json
# is this call's: plan v7+l2+rf, with v7+l2 timed between it and its second timing), the engine at
# batch 256 kernel by kernel with the refill off as a variant, then the decode GPU tests and the decode
# racecheck on whatever is left of the call's 10 minutes.
#
#   OUT=$OUT bash bench/decode_refill_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/decode_refill_check}
mkdir -p "$O"
T0=$(date +%s)
left() { echo $(( ${CALL_S:-570} - ($(date +%s) - T0) )); }
BENCH_ONLY=1 BENCH_LIMIT=200 SMOKE_PLANS=wgmma3_pp_ov_qp_xc_ps \
  ARGS_decode_attention="--plans v7+l2+rf,v7+l2" \
  ARGS_engine="--kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 --decode-env rf0:OPPO_DECODE_REFILL=0" \
  REPORT_TAIL=40 OUT="$O" bash bench/gpu_check.sh decode_attention engine > /dev/null 2>&1
tail -45 "$O/report.md"
grep -a "contexts\|kernel profile" "$O/log.txt" | tail -5
t=$(left); echo "[$(( $(date +%s) - T0 ))s] pytest (limit ${t}s)"
if [ "$t" -gt 30 ]; then
  timeout --kill-after=5 $(( t - 60 > 30 ? t - 60 : t - 5 )) python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
    tests/test_attention_gpu.py -k decode -x > "$O/pytest_decode.txt" 2>&1
  echo "pytest rc=$?"; tail -4 "$O/pytest_decode.txt"
fi
t=$(left); echo "[$(( $(date +%s) - T0 ))s] racecheck (limit ${t}s)"
if [ "$t" -gt 20 ]; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=5 $(( t - 5 )) "$SAN" --tool racecheck --error-exitcode 9 \
    python3 bench/sanitize_attention.py --decode-only --decode-plans=v7 > "$O/racecheck_decode.txt" 2>&1
  echo "racecheck rc=$?"; tail -3 "$O/racecheck_decode.txt"
fi
bash bench/pack_out.sh "$O"
