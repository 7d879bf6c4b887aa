#!/usr/bin/env bash
# Nsight Compute on the decode kernel, one report per shape of bench/decode_attention.py:
#   OUT=/tmp/ncu bash bench/ncu_decode.sh [SHAPE ...]        (default: 1 4 0, the two misses and a wall shape)
# Needs the built extension. ncu's --clock-control none leaves the card's clocks as found
# (METHOD.md). Profiles the last call of each shape's main kernel (and its reduction kernel,
# if split; launches 4-5 of 6 calls) with SpeedOfLight, MemoryWorkloadAnalysis, Occupancy, LaunchStats, WarpStateStats.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/ncu}
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -z "$NCU" ] && { echo "ncu not found"; exit 1; }
SHAPES=("$@")
[ ${#SHAPES[@]} -eq 0 ] && SHAPES=(1 4 0)
for s in "${SHAPES[@]}"; do
  timeout 120 "$NCU" --clock-control none --kernel-name regex:paged_decode --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats \
    ${PYTHON:-python3} bench/ncu_decode.py --shape "$s" --calls 6 > "$OUT/ncu_decode_shape$s.txt" 2>&1
  echo "shape $s: rc=$? -> $OUT/ncu_decode_shape$s.txt"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Stall|shape" \
    "$OUT/ncu_decode_shape$s.txt" | head -20
done
