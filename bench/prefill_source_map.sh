#!/usr/bin/env bash
# One device call (~4-5 min on a fresh machine): issue 8's prefill benchmark on the default plans
# (prefill_attention.json at this tree), then a per-instruction stall map of the D=64 default kernel
# (wgmma3_pp_ov_qp_xc_ps at issue 8's D=64 shape): ncu's SourceCounters into a report, exported as
# the SASS page (each instruction with its stall samples by reason) in CSV, for the next lever on
# the kernel's latency chain (bench/NOTES.md "Session 21": no pipe saturated, tensor 40%, issue 50%).
#
#   OUT=$OUT bash bench/prefill_source_map.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/prefill_source_map}
mkdir -p "$O"
. bench/device_commit.sh   # the carried .commit for the JSONs of the steps run here too
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout 300 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.txt" 2>&1 || { tail -30 "$O/build.txt"; exit 1; }
timeout 150 python3 bench/prefill_attention.py --plans wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps \
  --out "$O/prefill_attention.json" > "$O/prefill_attention.txt" 2>&1
echo "prefill_attention rc=$?"; tail -6 "$O/prefill_attention.txt" | cut -c1-400
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
OPPO_PREFILL_PLAN=wgmma3_pp_ov_qp_xc_ps timeout 150 "$NCU" --clock-control none --kernel-name regex:paged_prefill \
  --launch-skip 4 --launch-count 1 --section SourceCounters --section WarpStateStats -o "$O/src" -f \
  python3 bench/ncu_attention.py --op prefill --shape 1 --calls 6 > "$O/ncu_run.txt" 2>&1
echo "ncu rc=$?"; tail -3 "$O/ncu_run.txt"
timeout 90 "$NCU" --import "$O/src.ncu-rep" --page source --csv --print-source sass > "$O/src_sass.csv" 2> "$O/src_err.txt" \
  || timeout 90 "$NCU" --import "$O/src.ncu-rep" --page source --csv > "$O/src_sass.csv" 2>> "$O/src_err.txt"
echo "export rc=$? lines=$(wc -l < "$O/src_sass.csv")"; head -c 600 "$O/src_sass.csv"; echo; tail -3 "$O/src_err.txt"
timeout 60 python3 bench/source_map.py "$O/src_sass.csv" --top 12 > "$O/src_summary.txt" 2>&1; head -40 "$O/src_summary.txt"
gzip -9 "$O/src_sass.csv"
rm -f "$O/src.ncu-rep"
