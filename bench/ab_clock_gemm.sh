#!/usr/bin/env bash
# Two device calls, back to back on one warm machine, that measure what session 20 built after its
# calls (bench/NOTES.md "Session 20: next GPU session, the order"):
#   part 1 (~7 min on a fresh machine): the build; the GPU tests of the stamps (each decode CTA's
#     SM cycles in the tag; the key split's new item order in the prefill item stamps);
#     decode_stamps of the engine's shape in a loop, L2 warm and cold, with each CTA's SM clock,
#     and the engine's step at B=256 and 64 (cap 512 and 0) with its in-graph stamps: the two
#     clocks side by side (is the engine's decode attention slower because its SMs run slower?);
#     workload G's ragged decode row under the split-major grid, with the engine's cap;
#     memcheck of the stamped decode case and of the key split; the key split (`_ks`, its items
#     now short-first) against the default at issue 8's D=64 shape, in both orders, beside Flex,
#     and the item stamps of both;
#   part 2 (~6 min, part 1's build reused): the decode projections, cuBLAS against torch.compile's
#     max-autotuned Triton GEMMs; then the whole GPU suite.
#
#   OUT=$OUT bash bench/ab_clock_gemm.sh 1|2      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
. bench/device_commit.sh   # the carried .commit for the JSONs of the steps run here too
O=${OUT:-bench/results/ab_clock_gemm}
mkdir -p "$O"
part=${1:?usage: ab_clock_gemm.sh 1|2}
if [ "$part" = 1 ]; then
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=120 PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=120 PYTEST_K="stamps or key_split" \
  ARGS_decode_stamps="--plans v7 --shapes 1 --engine --l2 warm,cold" \
  ARGS_engine="--kernel-profile --shapes qwen2.5-0.5b --batches 256,64 --hf-min-batch 100000 --caps 0" \
  OUT="$O" bash bench/gpu_check.sh decode_stamps engine > /dev/null 2>&1
{
  timeout 90 python3 bench/decode_attention.py --plans v7 --ragged --caps 512 --shapes 1 --no-flex \
    --out "$O/decode_ragged.json" 2>&1 | tail -6
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --decode-only --decode-plans=v3:stamps,v7 2>&1 | tail -3
  echo "memcheck (decode stamps) rc=${PIPESTATUS[0]}"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_ks_ps 2>&1 | tail -3
  echo "memcheck (prefill _ks) rc=${PIPESTATUS[0]}"
  timeout 90 python3 bench/prefill_attention.py --shapes 1 --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ks_ps \
    --out "$O/prefill_ks.json" 2>&1 | tail -4
  timeout 60 python3 bench/prefill_attention.py --shapes 1 --plans wgmma3_pp_ov_qp_xc_ks_ps,wgmma3_pp_ov_qp_xc_ps --no-flex \
    --out "$O/prefill_ks_order.json" 2>&1 | tail -4
  timeout 60 python3 bench/prefill_stamps.py --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ks_ps \
    --out "$O/prefill_stamps_ks.json" 2>&1 | tail -8
} > "$O/checks.txt" 2>&1
tail -30 "$O/report.md"; grep -a -E "SM clock|its last" "$O/log.txt"; cat "$O/checks.txt"
else
{
  # (the whole log kept: inductor prints its autotuning table of Triton configs against cuBLAS there)
  timeout 300 python3 bench/linear_probe.py --batches 256 --libs cublas,inductor --out "$O/linear_probe.json" \
    > "$O/linear_probe.log" 2>&1
  echo "linear_probe rc=$?"; tail -12 "$O/linear_probe.log"
  timeout 250 bash bench/pytest_shards.sh -m gpu > "$O/pytest_all.txt" 2>&1
  echo "whole GPU suite rc=$?"; grep -E "passed|failed|FAILED" "$O/pytest_all.txt"
} > "$O/checks2.txt" 2>&1
cat "$O/checks2.txt"
fi
bash bench/pack_out.sh "$O"
