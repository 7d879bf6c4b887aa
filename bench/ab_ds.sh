#!/usr/bin/env bash
# One device call (~9 min on a fresh machine): session 22's deferred store (`_ds`: an item's O
# normalized at its end and stored under the next item's first Q K^T, so the first warpgroup's turn
# after an item's final P V no longer waits for the epilogue's stores) against the default plans,
# then the whole GPU suite (bench/NOTES.md "Session 22"):
#   the build; the wgmma smoke of the four plans; issue 8's three shapes with the four plans beside
#   Flex and SDPA; memcheck and racecheck of `_ds`; the D=64 and the (16, 2048) D=128 shapes again
#   in the reverse order; the item stamps of the two three-warpgroup plans; the GPU tests of `_ds`
#   and the default plans; then every GPU test (bench/pytest_shards.sh -m gpu) in the time left.
#   (Session 22's call 2 ran the same steps for `_qa`, since removed: ab_qa.sh as of e34a5be.)
#
#   OUT=$OUT bash bench/ab_ds.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ab_ds}
mkdir -p "$O"
. bench/device_commit.sh   # the carried .commit for the JSONs of the steps run here too
BENCH_ONLY=1 BENCH_LIMIT=150 SMOKE_PLANS=wgmma_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_ds_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ds_ps \
  PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=120 PYTEST_K="deferred or wgmma3 or persistent or prefill_default or auto" \
  ARGS_prefill_attention="--shapes 0,1,2 --plans wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ds_ps,wgmma_pp_ov_qp_xc_ds_ps" \
  OUT="$O" bash bench/gpu_check.sh prefill_attention > /dev/null 2>&1
{
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_ds_ps,wgmma_pp_ov_qp_xc_ds_ps 2>&1 | tail -4
  echo "memcheck (_ds) rc=${PIPESTATUS[0]}"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool racecheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_ds_ps 2>&1 | tail -3
  echo "racecheck (_ds) rc=${PIPESTATUS[0]}"
  timeout 60 python3 bench/prefill_attention.py --shapes 1 --plans wgmma3_pp_ov_qp_xc_ds_ps,wgmma3_pp_ov_qp_xc_ps --no-flex \
    --out "$O/prefill_order.json" 2>&1 | tail -3
  timeout 60 python3 bench/prefill_attention.py --shapes 0 --plans wgmma_pp_ov_qp_xc_ds_ps,wgmma_pp_ov_qp_xc_ps --no-flex \
    --out "$O/prefill_order_d128.json" 2>&1 | tail -3
  timeout 60 python3 bench/prefill_stamps.py --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ds_ps --out "$O/prefill_stamps_ds.json" 2>&1 | tail -8
} > "$O/checks.txt" 2>&1
tail -14 "$O/report.md"; cat "$O/checks.txt"
left=$(( 575 - SECONDS ))
echo "whole GPU suite, ${left} s left"
[ "$left" -gt 60 ] && timeout "$left" bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider > "$O/pytest_all.txt" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|ERROR|rc=" "$O/pytest_all.txt" | tail -20
bash bench/pack_out.sh "$O"
