#!/usr/bin/env bash
# One device call (~4 min on a fresh H100), session 36: the decode layer's norm fold
# (OPPO_DECODE_NORM_FOLD=1: each RMSNorm's weight in a copy of the qkv / gate_up weights, its row
# scale in the rotary / silu*mul kernels, the residual adds in o_proj / down_proj; 7 launches a
# layer instead of 9). Build; its GPU tests (the kernels against their references over real shapes,
# the folded decode step against the unfolded one, the engine's decode graphs after update_weights
# changes the actor's weights between two replays) and the rotary / silu*mul kernels' own GPU tests
# (their signatures changed); then the engine at B=256 and B=64, the fold beside the default in the
# same process, with the default's kernel profile, and the skip diagnostic (the most that folding
# both elementwise kernels away could win) for scale.
#
#   OUT=$OUT bash bench/s36_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s36_check}
mkdir -p "$O"
. bench/device_commit.sh
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.txt" 2>&1 || { tail -30 "$O/build.txt"; exit 1; }
# the engine first, alone on the machine (the first call's tests ran first and a timed-out shard
# left a check running beside the bench); `again` is the default once more (the run's noise)
timeout 150 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256,64 --hf-min-batch 100000 \
  --decode-env fold:OPPO_DECODE_NORM_FOLD=1 --decode-env again:OPPO_DECODE_NORM_FOLD=0 \
  --decode-env skip:OPPO_DIAG_SKIP_ELEMENTWISE=norm+silu \
  --out "$O/engine_fold.json" 2>&1 | tail -12
OUT="$O" BENCH_ONLY=1 SMOKE=0 PYTEST_FILES="tests/test_decode_norm_fold.py" \
  PYTEST_SHARDS=3 PYTEST_LIMIT=120 bash bench/gpu_check.sh none > /dev/null 2>&1
grep -E "^\| pytest|passed|failed|FAILED|Error|assert" "$O/log.txt" | head -20
