#!/usr/bin/env bash
# One device call (~5 min on a fresh machine), session 23: decode's rows by bulk copies
# (OPPO_DECODE_BULK, +bk) against the 16-byte cp.async loader, with and without the arithmetic
# (+lo: the loads alone, the loader's ceiling), issue 7's five shapes, both plan orders. First the
# bulk path's GPU tests (a wrong transaction count would hang: short limit), last the decode tests,
# memcheck and racecheck of the bulk cases.
#
#   OUT=$OUT bash bench/decode_bulk_ab.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/decode_bulk_ab}
mkdir -p "$O"
PT="python3 -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_attention_gpu.py"
BENCH_ONLY=1 PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K=OPPO_DECODE_BULK PYTEST_LIMIT=90 PYTEST_SHARDS=1 \
  BENCH_LIMIT=200 SMOKE_PLANS=wgmma3_pp_ov_qp_xc_ps \
  ARGS_decode_attention="--no-flex --plans v7+l2,v7+l2+bk,v7+l2+lo,v7+l2+bk+lo" \
  REPORT_TAIL=12 OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
tail -16 "$O/report.md"
timeout 150 python3 bench/decode_attention.py --no-flex --plans v7+l2+bk+lo,v7+l2+lo,v7+l2+bk,v7+l2 \
  --out "$O/decode_attention_reversed.json" 2>&1 | tail -9
timeout 120 $PT -k "decode or loads_only" > "$O/pytest_decode.txt" 2>&1
echo "pytest rc=$?"; tail -3 "$O/pytest_decode.txt"
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$SAN" --tool $tool --error-exitcode 9 \
    python3 bench/sanitize_attention.py --decode-only --decode-plans=v7:bulk,v3:bulk > "$O/${tool}_bulk.txt" 2>&1
  echo "$tool rc=$?"; tail -1 "$O/${tool}_bulk.txt"
done
bash bench/pack_out.sh "$O"
