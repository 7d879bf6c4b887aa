#!/usr/bin/env bash
# One device call (~3 min warm after bench/suite_stress_check.sh, ~5 cold), session 27's next-session
# item 2, for an H200 (copy ~4.3 TB/s), where the decode kernel's loads alone read 0.84-0.87 of copy
# at the large shapes: does refilling each stage as soon as its tile is done (+rf: kStages tiles in
# flight instead of kStages - 1, ~1.5x the bytes requested per SM) or a third CTA per SM (v6) move the
# loader there? Issue 7's three large shapes, both plan orders, no Flex.
#
#   OUT=$OUT bash bench/h200_loader_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/h200_loader_check}
mkdir -p "$O"
. bench/device_commit.sh
T0=$(date +%s)
. bench/device_build.sh
P=v7+l2,v7+l2+lo,v7+rf+lo,v7+rf,v6+l2+lo
R=$(echo "$P" | tr , '\n' | tac | paste -sd,)
for plans in "$P" "$R"; do
  timeout 200 python3 bench/decode_attention.py --no-flex --shapes 0,2,3 --plans "$plans" \
    --out "$O/decode_loader_$([ "$plans" = "$P" ] && echo fwd || echo rev).json" 2>&1 | tail -22
done
