#!/usr/bin/env bash
# One device call (~5 min on a fresh machine), session 23: where decode's split kernel loses at the
# two shapes of issue 7 under 0.9 of copy, by switching parts of it off or on in one run, both plan
# orders: +lo (its loads, waits and barriers without the arithmetic: a diagnostic, wrong output)
# and +h256 (its cp.async with the .L2::256B prefetch size), all five shapes; then the stamps of
# v7+l2 and v7+l2+lo at (256, 1024) and (1, 32768); then the GPU tests of the switches.
#
#   OUT=$OUT bash bench/decode_loads_ab.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/decode_loads_ab}
mkdir -p "$O"
BENCH_ONLY=1 BENCH_LIMIT=200 SMOKE_PLANS=wgmma3_pp_ov_qp_xc_ps \
  ARGS_decode_attention="--no-flex --plans v7+l2,v7+l2+lo,v7+l2+h256" \
  REPORT_TAIL=12 OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
tail -14 "$O/report.md"
timeout 150 python3 bench/decode_attention.py --no-flex --plans v7+l2+h256,v7+l2+lo,v7+l2 \
  --out "$O/decode_attention_reversed.json" 2>&1 | tail -9
timeout 120 python3 bench/decode_stamps.py --plans v7+l2,v7+l2+lo --shapes 1,4 --out "$O/decode_stamps.json" 2>&1 | tail -8
timeout 120 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_attention_gpu.py \
  -k "loads_only or decode_pdl_waits" > "$O/pytest_switches.txt" 2>&1
echo "pytest rc=$?"; tail -3 "$O/pytest_switches.txt"
bash bench/pack_out.sh "$O"
