#!/usr/bin/env bash
# Nsight Compute on an attention kernel, one report per shape of bench/{decode,prefill}_attention.py:
#   OUT=/tmp/ncu bash bench/ncu_attention.sh decode [SHAPE ...]    (default: 1 4 0, the two misses and a wall shape)
#   OUT=/tmp/ncu OPPO_PREFILL_PLAN=wgmma_pp_ov bash bench/ncu_attention.sh prefill [SHAPE ...]   (default: 0 1 2)
# Needs the built extension. ncu's --clock-control none leaves the card's clocks as found
# (METHOD.md). Profiles the last calls of each shape's kernels (decode: the main kernel and its
# reduction, if split; prefill: the CUDA kernel of OPPO_PREFILL_PLAN) with SpeedOfLight,
# MemoryWorkloadAnalysis, Occupancy, LaunchStats, WarpStateStats, SchedulerStats. NCU_SOURCE=1 adds
# SourceCounters (the build has -lineinfo: where the warps stall, by source line) and every detail;
# NCU_PIPES=1 the pipes' utilization, NCU_METRICS raw metrics (below).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/ncu}
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -z "$NCU" ] && { echo "ncu not found"; exit 1; }
OP=${1:-decode}
shift || true
SHAPES=("$@")
if [ ${#SHAPES[@]} -eq 0 ]; then
  if [ "$OP" = decode ]; then SHAPES=(1 4 0); else SHAPES=(0 1 2); fi
fi
TAG=$OP
# NCU_PIPES=1: also the compute pipes' utilization and the instruction mix (which pipe binds a
# tensor-core kernel: the tensor pipe, MUFU (xu), the FMA or the integer ALU; session 21);
# NCU_METRICS=a,b: raw metrics beside (a name this ncu does not know fails the whole profile).
[ "$OP" = prefill ] && TAG=prefill_${OPPO_PREFILL_PLAN:-mma}
for s in "${SHAPES[@]}"; do
  timeout 120 "$NCU" --clock-control none --kernel-name regex:paged_${OP} --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats ${NCU_SOURCE:+--section SourceCounters --print-details all} \
    ${NCU_PIPES:+--section ComputeWorkloadAnalysis --section InstructionStats} ${NCU_METRICS:+--metrics $NCU_METRICS} \
    ${PYTHON:-python3} bench/ncu_attention.py --op "$OP" --shape "$s" --calls 6 > "$OUT/ncu_${TAG}_shape$s.txt" 2>&1
  echo "$OP shape $s: rc=$? -> $OUT/ncu_${TAG}_shape$s.txt"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Waves Per SM|Stall|shape|pipe_|Issue Slots|Executed Ipc" \
    "$OUT/ncu_${TAG}_shape$s.txt" | head -20
done
