#!/usr/bin/env bash
# One device call (~9 min on a fresh machine): session 22's Q-ahead lever (`_qa`: each warpgroup's Q
# rows of the CTA's next item copied into a second buffer during the current item) against the
# default plans, at the tree where `_dh` (descriptors stepped) is unconditional and `_mt` is gone
# (bench/NOTES.md "Session 22"), then the whole GPU suite:
#   the build; the wgmma smoke of the four plans; issue 8's three shapes with the four plans beside
#   Flex and SDPA (the `_qa` plans at D=64 only); memcheck and racecheck of `_qa`; the D=64 shape
#   again in the reverse order; the item stamps of the two three-warpgroup plans; then every GPU
#   test (bench/pytest_shards.sh -m gpu) in the time left.
#
#   OUT=$OUT bash bench/ab_qa.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ab_qa}
mkdir -p "$O"
. bench/device_commit.sh   # the carried .commit for the JSONs of the steps run here too
BENCH_ONLY=1 BENCH_LIMIT=150 SMOKE_PLANS=wgmma_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_qa_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_qa_ps \
  ARGS_prefill_attention="--shapes 0,1,2 --plans wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_qa_ps,wgmma_pp_ov_qp_xc_qa_ps" \
  OUT="$O" bash bench/gpu_check.sh prefill_attention > /dev/null 2>&1
{
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_qa_ps,wgmma_pp_ov_qp_xc_qa_ps 2>&1 | tail -3
  echo "memcheck (_qa) rc=${PIPESTATUS[0]}"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool racecheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_qa_ps 2>&1 | tail -3
  echo "racecheck (_qa) rc=${PIPESTATUS[0]}"
  timeout 60 python3 bench/prefill_attention.py --shapes 1 --plans wgmma3_pp_ov_qp_xc_qa_ps,wgmma3_pp_ov_qp_xc_ps --no-flex \
    --out "$O/prefill_order.json" 2>&1 | tail -3
  timeout 60 python3 bench/prefill_stamps.py --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_qa_ps --out "$O/prefill_stamps_qa.json" 2>&1 | tail -8
} > "$O/checks.txt" 2>&1
tail -12 "$O/report.md"; cat "$O/checks.txt"
left=$(( 570 - SECONDS ))
echo "whole GPU suite, ${left} s left"
[ "$left" -gt 60 ] && timeout "$left" bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider > "$O/pytest_all.txt" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|ERROR|rc=" "$O/pytest_all.txt" | tail -20
bash bench/pack_out.sh "$O"
