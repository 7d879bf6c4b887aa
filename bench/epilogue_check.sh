#!/usr/bin/env bash
# One device call (~6-8 min on a fresh machine), session 25: where decode v7's split epilogue spends
# its 4.8 us at (1, 32768) and whether the fast merge (OPPO_DECODE_FAST_MERGE, now the default) recovers it.
#  1. the loads probe's epilogue bisection (bench/decode_loads_probe.py, no extension build), in both
#     mode orders, with the register-staged loader (ldgst) beside cta and ldg, at D=64 too;
#  2. the extension's build, the fast merge's GPU tests, decode_attention at (1, 32768) and the D=64
#     shape with the four plans v7+l2[+sm][+lo], then the same plans in reverse order;
#  3. compute-sanitizer memcheck and racecheck of v7:sm on a small case.
# Session 25's call 1 ran it at 68dead9, where the fast merge was off by default and +fm / v7:fm
# switched it on; since then it is the default and +sm / v7:sm switch it off.
#
#   OUT=$OUT bash bench/epilogue_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/epilogue_check}
mkdir -p "$O"
. bench/device_commit.sh
M=cta,cta_epi,cta_epi+nofence,cta_epi+nomerge,cta_epi+acqrel,cta_epi+mb32,cta_epi+acqrel_mb32,cta_epi+writeonly,ldg,ldg_epi,ldg_epi+acqrel_mb32,ldgst,ldgst_epi,ldgst_epi+acqrel_mb32
R=$(echo "$M" | tr , '\n' | tac | paste -sd,)
P="timeout 200 python3 bench/decode_loads_probe.py --shapes 32768:8:128:32:32:4"
$P --modes "$M" --out "$O/epi_bisect.json" > "$O/probe.txt" 2>&1; echo "probe rc=$?"
$P --modes "$R" --out "$O/epi_bisect_reversed.json" >> "$O/probe.txt" 2>&1; echo "probe reversed rc=$?"
timeout 100 python3 bench/decode_loads_probe.py --shapes 262144:2:64:256:1:7 --modes cta,ldg,ldgst,cta_epi,ldgst_epi,ldgst,cta \
  --out "$O/ldgst_d64.json" >> "$O/probe.txt" 2>&1; echo "probe d64 rc=$?"
grep -E "^\| |us" "$O/probe.txt" | tail -30
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=150 PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K="fast_merge or pdl_waits" \
  ARGS_decode_attention="--shapes 1,4 --no-flex --plans v7+l2+sm+lo,v7+l2+lo,v7+l2+sm,v7+l2" \
  OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
tail -12 "$O/report.md"
timeout 120 python3 bench/decode_attention.py --shapes 1,4 --no-flex --plans v7+l2,v7+l2+sm,v7+l2+lo,v7+l2+sm+lo \
  --out "$O/decode_attention_reversed.json" 2>&1 | tail -8
bash bench/sanitize_decode.sh "$O" sm --decode-plans=v7:sm 100
