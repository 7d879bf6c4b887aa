#!/usr/bin/env bash
# Two device calls, back to back on one warm machine, that measure session 15's two unrun levers and
# session 16's additions (bench/NOTES.md "Session 16: next GPU session, the order"):
#   part 1 (~7 min): the build and the smoke, then
#     decode v6 (v3's kernel with 3 CTAs per SM at D=128) against v3, each also with programmatic
#     dependent launch (+pdl: OPPO_DECODE_PDL=1) and with the L2 prefetch of one or two more tiles
#     (+l2, +l2x2: OPPO_DECODE_PREFETCH=1, 2), issue 7's shapes and the ragged row;
#     prefill wgmma3 (three consumer warpgroups at D=64) against wgmma_pp_ov_ps, each also with its
#     items' Q prefetched into L2 by the producer (_qp), issue 8's D=64 shape;
#     per-CTA stamps of v3, v6, v3+l2 and v3+l2x2 on issue 7's shapes and the engine's batch
#     (bench/decode_stamps.py: where the idle SM time sits) and per-item stamps of the wgmma
#     prefill at D=64 (bench/prefill_stamps.py: overhead per item against time per key tile);
#   part 2 (~6 min, the build of part 1 reused): the GPU tests of tests/test_attention_gpu.py
#     (stamps, the PDL/prefetch chains, wgmma3 and _qp), the sampler bench (not run since session
#     8's sampler v2), the read probe at D=64, and compute-sanitizer memcheck of the new decode
#     cases (v6, stamps, pdl, l2, l2x2) and of every case (prefill item stamps and _qp included).
#
#   OUT=$OUT OPPO_COMMIT=<sha> bash bench/ab_v6_wgmma3.sh 1|2      (on the device; results under $OUT)
set -u
cd "$(dirname "$0")/.."
. bench/device_commit.sh   # the carried .commit for the JSONs of the steps run here too
O=${OUT:-bench/results/ab_v6_wgmma3}
mkdir -p "$O"
part=${1:?usage: ab_v6_wgmma3.sh 1|2}
if [ "$part" = 1 ]; then
BENCH_ONLY=1 BENCH_LIMIT=110 \
  ARGS_decode_attention="--plans v3,v6,v3+pdl,v6+pdl,v3+l2,v6+l2,v3+l2x2,v6+l2x2,v6+pdl+l2x2 --ragged --no-flex" \
  ARGS_prefill_attention="--shapes 1 --plans wgmma_pp_ov_ps,wgmma_pp_ov_qp_ps,wgmma3_pp_ov,wgmma3_pp_ov_ps,wgmma3_ov_ps,wgmma3_pp_ov_qp_ps" \
  OUT="$O" bash bench/gpu_check.sh decode_attention prefill_attention > /dev/null 2>&1
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off     # what the smoke found hanging or failing
{
  timeout 90 python3 bench/decode_stamps.py --plans v3,v6,v3+l2,v3+l2x2 --engine --out "$O/decode_stamps.json" 2>&1 | tail -16
  timeout 90 python3 bench/prefill_stamps.py --plans wgmma_pp_ov_ps,wgmma_pp_ov_qp_ps,wgmma3_pp_ov_ps,wgmma3_pp_ov_qp_ps \
    --out "$O/prefill_stamps.json" 2>&1 | tail -12
} > "$O/stamps.txt" 2>&1
tail -30 "$O/report.md"; cat "$O/stamps.txt"
else
BENCH_ONLY=1 PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=200 BENCH_LIMIT=60 \
  OUT="$O" bash bench/gpu_check.sh sampler > /dev/null 2>&1
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off
{
  timeout 30 python3 bench/sm_balance_probe.py --waves 1 --paged 256,512 --paged-shape 262144,2,64 \
    --paged-configs 4:64:1,8:128:0 --out "$O/sm_balance_probe_d64.json" 2>&1 | grep -v "by smid"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  timeout 60 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py --decode-only \
    --decode-plans=v6,v3:stamps,v3:pdl,v3:l2,v3:l2x2 2>&1 | tail -4
  echo "memcheck (decode: v6, stamps, pdl, l2, l2x2) rc=${PIPESTATUS[0]}"
  timeout 100 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py 2>&1 | tail -4
  echo "memcheck (every case: prefill item stamps and _qp included) rc=${PIPESTATUS[0]}"
} > "$O/checks.txt" 2>&1
tail -30 "$O/report.md"; cat "$O/checks.txt"
fi
bash bench/pack_out.sh "$O"
