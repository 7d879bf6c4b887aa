#!/usr/bin/env bash
# Device calls of session 39. a (~6 min on a fresh H100): build; the GPU tests of the decode
# attention's l2_prefetch (the kernel's output bit for bit with and without, eager and from graphs;
# the engine's decode graphs under OPPO_DECODE_WEIGHT_PREFETCH 0/1/2, unfolded and folded); then the
# engine at 0.5B B=256 with the weights read after each attention prefetched into L2 by its CTAs
# (`wpf1`; `wpf2` with L2::evict_last) beside the default twice (`again`: the run's noise), with
# kernel profiles (each GEMM's us per call is the reading). b (~2 min, warm): bench/ingest_probe.py
# (per-SM ingest by TMA bulk copies, alone / all SMs / cluster multicast; a persistent decode
# layer's design numbers) and the norm-folded engine with and without the prefetch.
#
#   OUT=$OUT bash bench/s39_check.sh [a|b]   (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s39_check}
mkdir -p "$O"
. bench/device_commit.sh
T0=$(date +%s)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.txt" 2>&1 || { tail -30 "$O/build.txt"; exit 1; }
echo "[$(( $(date +%s) - T0 ))s] built"
PARTS=" ${*:-a} "
if [[ $PARTS == *" a "* ]]; then
timeout 200 python3 -m pytest -q -m gpu -x tests/test_decode_weight_prefetch.py \
  "tests/test_attention_gpu.py::test_decode_l2_prefetch_changes_nothing" > "$O/pytest.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] pytest rc=$rc"; tail -4 "$O/pytest.log"
timeout 240 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 \
  --decode-env wpf1:OPPO_DECODE_WEIGHT_PREFETCH=1 --decode-env wpf2:OPPO_DECODE_WEIGHT_PREFETCH=2 \
  --decode-env again:OPPO_DECODE_WEIGHT_PREFETCH=0 --out "$O/engine_wpf.json" > "$O/engine.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] engine rc=$rc"; grep -E "Error|error" "$O/engine.log" | head -5; tail -6 "$O/engine.log"
fi
if [[ $PARTS == *" b "* ]]; then
timeout 150 python3 bench/ingest_probe.py --out "$O/ingest_probe.json" > "$O/ingest.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] ingest probe rc=$rc"; tail -32 "$O/ingest.log"
timeout 200 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 \
  --decode-env fold:OPPO_DECODE_NORM_FOLD=1 --decode-env fwpf1:OPPO_DECODE_NORM_FOLD=1,OPPO_DECODE_WEIGHT_PREFETCH=1 \
  --out "$O/engine_fold_wpf.json" > "$O/engine_b.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] engine b rc=$rc"; grep -E "Error|error" "$O/engine_b.log" | head -5; tail -6 "$O/engine_b.log"
fi
