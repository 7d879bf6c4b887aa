#!/usr/bin/env bash
# Device calls of session 38: the split-K Triton GEMM of the decode projections
# (oppo_runtime.ops.gemm; OPPO_DECODE_GEMM=splitk). a (~7 min on a fresh H100): build; the
# projections of Qwen2.5-0.5B at B=256 (cuBLAS and the plan's config, cold); the engine at 0.5B
# B=256 with the split-K GEMM (gate_up and silu*mul in one kernel) beside the default twice (the
# run's noise), with kernel profiles; then a config sweep around the plan. b (~6 min): the engine
# with gate_up and silu*mul apart (`sapart`), norm-folded with and without the split-K GEMM; 1.5B's
# projections; the GPU tests of the kernel (the float32 product over real shapes, graphs, the engine
# against cuBLAS) and session 37's late-writer test of the decode kernel's PDL 1 form.
#
#   OUT=$OUT bash bench/s38_check.sh [a|b]   (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s38_check}
mkdir -p "$O"
. bench/device_commit.sh
T0=$(date +%s)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.txt" 2>&1 || { tail -30 "$O/build.txt"; exit 1; }
echo "[$(( $(date +%s) - T0 ))s] built"
PARTS=" ${*:-a} "
if [[ $PARTS == *" a "* ]]; then
timeout 60 python3 bench/linear_probe.py --shapes qwen2.5-0.5b --batches 256 --libs cublas,splitk \
  --out "$O/linear_probe_splitk_05b.json" > "$O/probe_05b.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] probe 0.5B rc=$rc"; grep -E "split-K plan|Error|error" "$O/probe_05b.log" | head -8
timeout 200 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 \
  --decode-env splitk:OPPO_DECODE_GEMM=splitk --decode-env again:OPPO_DECODE_GEMM=cublas \
  --out "$O/engine_splitk.json" > "$O/engine.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] engine rc=$rc"; grep -E "Error|error" "$O/engine.log" | head -5; tail -6 "$O/engine.log"
timeout 150 python3 bench/linear_probe.py --shapes qwen2.5-0.5b --batches 256 --libs cublas,splitk,splitk_sweep \
  --out "$O/linear_probe_sweep_05b.json" > "$O/sweep_05b.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] sweep 0.5B rc=$rc"; grep -E "split-K plan|Error|error" "$O/sweep_05b.log" | head -8
fi
if [[ $PARTS == *" b "* ]]; then
timeout 200 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 \
  --decode-env sapart:OPPO_DECODE_GEMM=splitk-silu-apart --decode-env fsplitk:OPPO_DECODE_NORM_FOLD=1,OPPO_DECODE_GEMM=splitk \
  --decode-env fold:OPPO_DECODE_NORM_FOLD=1 --out "$O/engine_splitk_b.json" > "$O/engine_b.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] engine b rc=$rc"; grep -E "Error|error" "$O/engine_b.log" | head -5; tail -6 "$O/engine_b.log"
timeout 60 python3 bench/linear_probe.py --shapes qwen2.5-1.5b --batches 256 --libs cublas,splitk \
  --out "$O/linear_probe_splitk_15b.json" > "$O/probe_15b.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] probe 1.5B rc=$rc"; grep -E "split-K plan|Error|error" "$O/probe_15b.log" | head -6
timeout 150 python3 -m pytest -q -m gpu -x tests/test_gemm.py "tests/test_attention_gpu.py::test_decode_pdl_reads_nothing_before_a_late_writer_ends" \
  > "$O/pytest.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] pytest rc=$rc"; tail -5 "$O/pytest.log"
fi
