#!/usr/bin/env bash
# One device call (~6 min on a fresh H100), session 34: the ticket-first split merge
# (OPPO_DECODE_TICKET_FIRST=1, bench +tf) against the default, after the per-tile stamps put ~3.4 us
# of (1, 32768)'s fixed ~9 us after its loop (partial stored 0.9 us, then ticket + merge 2.5 us).
#  1. build; the GPU tests of the switch (bit-level equality with the default merge, eager and
#     graph), the stamps, the fast merge and the caller's workspace (the counter pairs' size);
#  2. issue 7's five shapes with v7+l2 and v7+l2+tf, then the same two in reverse order;
#  3. the stamps of both at the two small shapes (raw stamps kept under $OUT/raw);
#  4. compute-sanitizer memcheck and racecheck of the v7:tf cases;
#  5. ncu's DRAM bytes of the default at the two small shapes (against the 134 MB they need).
#
#   OUT=$OUT bash bench/ticket_first_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ticket_first_check}
mkdir -p "$O"
. bench/device_commit.sh
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=150 PYTEST_FILES=tests/test_attention_gpu.py \
  PYTEST_K="ticket_first or tile_stamps or fast_merge or caller_workspace or switch" \
  ARGS_decode_attention="--no-flex --plans v7+l2,v7+l2+tf" \
  OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
grep -E "^\| (build|pytest|bench)" "$O/report.md" | head -4
tail -24 "$O/report.md"
timeout 150 python3 bench/decode_attention.py --no-flex --plans v7+l2+tf,v7+l2 \
  --out "$O/decode_attention_tf_reversed.json" 2>&1 | tail -14
timeout 150 python3 bench/decode_tiles.py --plans v7+l2,v7+l2+tf --shapes 1,4 --raw "$O/raw" \
  --out "$O/decode_tiles_tf.json" 2>&1 | tail -8
bash bench/sanitize_decode.sh "$O" tf --decode-plans=v7:tf 120
OUT=$O/ncu NCU_METRICS=dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum timeout 200 \
  bash bench/ncu_attention.sh decode 1 4 > /dev/null 2>&1
grep -hE "dram__bytes_read|lts__t_sectors|Duration|DRAM Throughput" "$O"/ncu/*.txt | head -12
