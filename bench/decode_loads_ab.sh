#!/usr/bin/env bash
# One device call (~4 min on a fresh machine), session 23: how fast decode's split kernel moves its
# bytes with its arithmetic switched off (+lo: its loads, waits and barriers only; a diagnostic,
# wrong output), on issue 7's five shapes, then, at the two shapes under 0.9 of copy, the loads alone
# over the kernel's configurations (v7 and v6, with and without the L2 prefetch, the split caps of
# 512 and 256 tokens), each in both plan orders; then the stamps of v7+l2 and v7+l2+lo there, and
# the decode GPU tests and the decode racecheck.
#
#   OUT=$OUT bash bench/decode_loads_ab.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/decode_loads_ab}
mkdir -p "$O"
BENCH_ONLY=1 BENCH_LIMIT=200 SMOKE_PLANS=wgmma3_pp_ov_qp_xc_ps \
  ARGS_decode_attention="--no-flex --plans v7+l2,v7+l2+lo" \
  REPORT_TAIL=12 OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
tail -14 "$O/report.md"
B="timeout 150 python3 bench/decode_attention.py --no-flex"
$B --plans v7+l2+lo,v7+l2 --out "$O/decode_attention_reversed.json" 2>&1 | tail -9
$B --shapes 1,4 --plans v7+l2+lo,v7+lo,v6+l2+lo,v6+lo,v7+l2x2+lo,v7+l2 --caps 512,256 \
  --out "$O/decode_attention_loads_map.json" 2>&1 | tail -5
$B --shapes 1,4 --plans v7+l2,v7+l2x2+lo,v6+lo,v6+l2+lo,v7+lo,v7+l2+lo \
  --out "$O/decode_attention_loads_map_reversed.json" 2>&1 | tail -5
timeout 120 python3 bench/decode_stamps.py --plans v7+l2,v7+l2+lo --shapes 1,4 --out "$O/decode_stamps.json" 2>&1 | tail -8
timeout 150 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_attention_gpu.py \
  -k "decode or loads_only" > "$O/pytest_decode.txt" 2>&1
echo "pytest rc=$?"; tail -3 "$O/pytest_decode.txt"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 "$SAN" --tool racecheck --error-exitcode 9 \
  python3 bench/sanitize_attention.py --decode-only --decode-plans=v7 > "$O/racecheck_decode.txt" 2>&1
echo "racecheck rc=$?"; tail -1 "$O/racecheck_decode.txt"
bash bench/pack_out.sh "$O"
