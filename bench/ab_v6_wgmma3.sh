#!/usr/bin/env bash
# One device call that measures session 15's two unrun levers (bench/NOTES.md "Session 15: next GPU
# session, the order"), ~7 minutes of wall time:
#   decode v6 (v3's kernel with 3 CTAs per SM at D=128) against v3, each also with programmatic
#   dependent launch (+pdl: OPPO_DECODE_PDL=1), issue 7's shapes and the ragged row;
#   prefill wgmma3 (three consumer warpgroups at D=64) against wgmma_pp_ov_ps, issue 8's D=64 shape;
#   their GPU tests (tests/test_attention_gpu.py; gpu_check's smoke first switches off a wgmma plan
#   that hangs), the read probe in decode's CTA shape and at D=64, per-CTA stamps of v3 and v6 on
#   issue 7's shapes and the engine's batch (bench/decode_stamps.py: where the idle SM time sits),
#   and compute-sanitizer on v6's decode cases and the stamps' (v3:stamps, v6:stamps).
#
#   OUT=$OUT OPPO_COMMIT=<sha> bash bench/ab_v6_wgmma3.sh      (on the device; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ab_v6_wgmma3}
mkdir -p "$O"
BENCH_ONLY=1 PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=200 BENCH_LIMIT=120 \
  ARGS_decode_attention="--plans v3,v6,v3+pdl,v6+pdl --ragged --no-flex" \
  ARGS_prefill_attention="--shapes 1 --plans wgmma_pp_ov_ps,wgmma3_pp_ov,wgmma3_pp_ov_ps,wgmma3_ov_ps" \
  OUT="$O" bash bench/gpu_check.sh decode_attention prefill_attention > /dev/null 2>&1
{
  timeout 40 python3 bench/sm_balance_probe.py --waves 1 --paged 32,64,128 --paged-configs 4:64:1,4:64:0,8:128:0 \
    --out "$O/sm_balance_probe_d128.json" 2>&1 | grep -v "by smid"
  timeout 30 python3 bench/sm_balance_probe.py --waves 1 --paged 256,512 --paged-shape 262144,2,64 \
    --paged-configs 4:64:1,8:128:0 --out "$O/sm_balance_probe_d64.json" 2>&1 | grep -v "by smid"
  timeout 90 python3 bench/decode_stamps.py --plans v3,v6,v3+pdl --engine --out "$O/decode_stamps.json" 2>&1 | tail -16
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in memcheck racecheck; do
    timeout 60 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py --decode-only \
      --decode-plans=v6,v3:stamps,v3:pdl 2>&1 | tail -4
    echo "$tool (v6, v3:stamps, v3:pdl) rc=${PIPESTATUS[0]}"
  done
} > "$O/checks.txt" 2>&1
tail -25 "$O/report.md"; cat "$O/checks.txt"
bash bench/pack_out.sh "$O"
