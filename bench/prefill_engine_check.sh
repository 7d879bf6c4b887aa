#!/usr/bin/env bash
# One device call (~5 min on a fresh machine), the end of an A/B session: issue 8's table with the
# default plans only, at the tree that keeps what the A/B calls kept (bench/results/prefill_attention.json
# is this call's), and issue 7's engine at batch 256 with its decode step kernel by kernel (the
# stamped decode-attention call's context lengths included, bench/NOTES.md "Session 21: next GPU
# session, the order").
#
#   OUT=$OUT bash bench/prefill_engine_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/prefill_engine_check}
mkdir -p "$O"
BENCH_ONLY=1 BENCH_LIMIT=200 SMOKE_PLANS=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps \
  ARGS_prefill_attention="--plans wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps" \
  ARGS_engine="--kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000" \
  REPORT_TAIL=30 OUT="$O" bash bench/gpu_check.sh prefill_attention engine > /dev/null 2>&1
tail -60 "$O/report.md"
grep -a "contexts\|kernel profile" "$O/log.txt" | tail -5
bash bench/pack_out.sh "$O"
