#!/usr/bin/env bash
# One device call (~4 min on a fresh H100), session 33's next-session item 1: where issue 7's fixed
# ~9 us per call go. Build; the GPU test of the per-tile stamps (bit for bit the plain kernel, each
# CTA's events in order) and of the CTA stamps; then bench/decode_tiles.py at issue 7's two small
# shapes and their 4x larger siblings (the fixed part is what does not grow): the ramp, the tile
# interval, the end's parts (loop end, stores, merge), the rate per 2 us bin, the outside gap.
#
#   OUT=$OUT bash bench/tiles_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/tiles_check}
mkdir -p "$O"
. bench/device_commit.sh
OUT="$O" BENCH_ONLY=1 SMOKE=0 PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K="tile_stamps or cta_stamps" \
  PYTEST_LIMIT=120 bash bench/gpu_check.sh none > /dev/null 2>&1
grep -E "^\| (build|pytest)|passed|failed|FAILED|Error" "$O/report.md" | head -20
S=1,4,256x4096x14x2x64,4x32768x32x8x128
timeout 200 python3 bench/decode_tiles.py --plans v7+l2 --shapes "$S" --out "$O/decode_tiles.json" 2>&1 | tail -12
