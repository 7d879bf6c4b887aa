#!/usr/bin/env bash
# One device call (~5 min on a fresh machine): session 21's two prefill levers against the default
# plans of both head dims (bench/NOTES.md "Session 21: next GPU session, the order"), both bitwise
# the default's output: `_mt` (each row's tile max as four chains and two levels instead of one
# chain of 16 fmaxf) and `_dh` (the wgmma descriptors of a batch built once and stepped by each
# k-step's offset), each and both:
#   the build; the wgmma smoke of the eight plans; the GPU tests of both (bitwise against the
#   default) and of the wgmma3 and default plans; memcheck of `_mt_dh` (D=64 and D=128); issue 8's
#   three shapes with the eight plans beside Flex and SDPA; the D=64 shape again in the reverse
#   order; the item stamps of the four D=64 plans; the SASS opcode counts of the wgmma kernels.
#
#   OUT=$OUT bash bench/ab_mt_dh.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ab_mt_dh}
mkdir -p "$O"
. bench/device_commit.sh   # the carried .commit for the JSONs of the steps run here too
BENCH_ONLY=1 BENCH_LIMIT=240 SMOKE_PLANS=wgmma_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_mt_ps,wgmma_pp_ov_qp_xc_dh_ps,wgmma_pp_ov_qp_xc_mt_dh_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_mt_ps,wgmma3_pp_ov_qp_xc_dh_ps,wgmma3_pp_ov_qp_xc_mt_dh_ps PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=150 \
  PYTEST_K="max_tree or wgmma3 or persistent or prefill_default or auto" \
  ARGS_prefill_attention="--shapes 0,1,2 --plans wgmma_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_mt_ps,wgmma_pp_ov_qp_xc_dh_ps,wgmma_pp_ov_qp_xc_mt_dh_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_mt_ps,wgmma3_pp_ov_qp_xc_dh_ps,wgmma3_pp_ov_qp_xc_mt_dh_ps" \
  OUT="$O" bash bench/gpu_check.sh prefill_attention > /dev/null 2>&1
{
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_mt_dh_ps,wgmma_pp_ov_qp_xc_mt_dh_ps 2>&1 | tail -4
  echo "memcheck (_mt_dh) rc=${PIPESTATUS[0]}"
  timeout 60 python3 bench/prefill_attention.py --shapes 1 --plans wgmma3_pp_ov_qp_xc_mt_dh_ps,wgmma3_pp_ov_qp_xc_dh_ps,wgmma3_pp_ov_qp_xc_mt_ps,wgmma3_pp_ov_qp_xc_ps --no-flex \
    --out "$O/prefill_order.json" 2>&1 | tail -3
  timeout 90 python3 bench/prefill_stamps.py --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_mt_ps,wgmma3_pp_ov_qp_xc_dh_ps,wgmma3_pp_ov_qp_xc_mt_dh_ps --out "$O/prefill_stamps_mt_dh.json" 2>&1 | tail -12
  SO=$(ls oppo_runtime/_C*.so | head -1)
  OBJ=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
  timeout 60 "$OBJ" -sass "$SO" 2>/dev/null | python3 bench/sass_counts.py --match paged_prefill_wgmma \
    --ops FMNMX,MUFU.EX2,HGMMA,ULOP3,USHF,UIADD3,R2UR 2>&1 | tail -12
} > "$O/checks.txt" 2>&1
tail -25 "$O/report.md"; cat "$O/checks.txt"
bash bench/pack_out.sh "$O"
