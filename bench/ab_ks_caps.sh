#!/usr/bin/env bash
# One device call (~8 min, a fresh machine) that measures what session 19 built after its calls
# (bench/NOTES.md "Session 19: next GPU session, the order"):
#   the build and the smoke of every wgmma plan (a plan that hangs or fails is switched off for the
#   rest), the GPU tests of the key split (_ks), the workspace check and the three-warpgroup plans;
#   compute-sanitizer memcheck of the _ks cases; the prefill bench at D=64 with _ks beside the
#   default, in both timing orders, and the item stamps of both; the engine's decode step with the
#   split cap at 0 and 256 beside EngineConfig's 512, under the v7 default, with its kernel profile.
#
#   OUT=$OUT OPPO_COMMIT=<sha> bash bench/ab_ks_caps.sh      (on the device; results under $OUT)
set -u
cd "$(dirname "$0")/.."
. bench/device_commit.sh   # the carried .commit for the JSONs of the steps run here too
O=${OUT:-bench/results/ab_ks_caps}
mkdir -p "$O"
BENCH_ONLY=1 BENCH_LIMIT=90 PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=150 \
  PYTEST_K="workspace or key_split or ks_ or wgmma3" \
  ARGS_prefill_attention="--shapes 1 --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ks_ps --no-flex" \
  OUT="$O" bash bench/gpu_check.sh prefill_attention > /dev/null 2>&1
off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$O/log.txt" | tail -1 | cut -d= -f2)
[ -n "$off" ] && export OPPO_PREFILL_WGMMA_OFF=$off     # what the smoke found hanging or failing
{
  timeout 60 python3 bench/prefill_attention.py --shapes 1 --plans wgmma3_pp_ov_qp_xc_ks_ps,wgmma3_pp_ov_qp_xc_ps \
    --no-flex --out "$O/prefill_ks_order.json" 2>&1 | tail -4
  timeout 60 python3 bench/prefill_stamps.py --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ks_ps \
    --out "$O/prefill_stamps.json" 2>&1 | tail -8
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_ks_ps 2>&1 | tail -4
  echo "memcheck (prefill _ks) rc=${PIPESTATUS[0]}"
  timeout 200 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256,64 --hf-min-batch 100000 \
    --caps 0,256 --out "$O/engine_caps.json" 2>&1 | tail -6
} > "$O/checks.txt" 2>&1
tail -30 "$O/report.md"; cat "$O/checks.txt"
bash bench/pack_out.sh "$O"
