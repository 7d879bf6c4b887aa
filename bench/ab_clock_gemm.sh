#!/usr/bin/env bash
# One device call (~8 min on a fresh machine) that measures what session 20 built after its calls
# (bench/NOTES.md "Session 20: next GPU session, the order", items 1-3):
#   the build; the GPU tests of the decode stamps (each CTA's SM cycles in the tag, not yet run);
#   decode_stamps of the engine's shape in a loop, L2 warm and cold, with each CTA's SM clock, and
#   the engine's step at B=256 and 64 (cap 512 and 0) with its in-graph stamps: the two clocks side
#   by side (is the engine's decode attention slower because its SMs run slower?);
#   workload G's ragged decode row under the split-major grid, with the engine's cap;
#   compute-sanitizer memcheck of the stamped decode case;
#   the decode projections: cuBLAS against torch.compile's max-autotuned Triton GEMMs.
# Then, as a second call on the warm machine: `bash bench/pytest_shards.sh -m gpu` (the whole suite).
#
#   OUT=$OUT bash bench/ab_clock_gemm.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ab_clock_gemm}
mkdir -p "$O"
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=120 PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=120 PYTEST_K="stamps" \
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
  timeout 240 python3 bench/linear_probe.py --batches 256 --libs cublas,inductor --out "$O/linear_probe.json" 2>&1 | tail -12
} > "$O/checks.txt" 2>&1
tail -30 "$O/report.md"; grep -a -E "SM clock|its last" "$O/log.txt"; cat "$O/checks.txt"
bash bench/pack_out.sh "$O"
