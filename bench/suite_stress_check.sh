#!/usr/bin/env bash
# One device call (~8 min on a fresh machine), session 27's next-session item 0: the whole GPU suite
# at the tree (its staging ring, the runner's rotary constants and the heads-as-N default have not
# run there), issue 7's table at the default (Flex included: decode_attention.json), then the two
# overlapped-rollout tests that failed once in session 27's suite (4 processes side by side, ROUNDS
# rounds) with the default and with OPPO_DECODE_HEADS_AS_N=0: does the illegal address come back,
# and only with the N form?
#
#   OUT=$OUT bash bench/suite_stress_check.sh      (on the device, carrying .commit; results under $OUT)
# A shorter call (little device time left): ROUNDS=1 TABLE_ARGS="--plans v7+l2 --shapes 1 --no-flex".
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/suite_stress_check}
ROUNDS=${ROUNDS:-3}
mkdir -p "$O"
. bench/device_commit.sh
BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=150 PYTEST_LIMIT=300 PYTEST_FILES=tests \
  ARGS_decode_attention="${TABLE_ARGS:---plans v7+l2}" OUT="$O" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
tail -8 "$O/report.md"
grep -E "passed|failed" "$O/log.txt" | tail -4
grep -E "^FAILED" "$O/log.txt" | head -10
grep -A7 "^ours = plan" "$O/log.txt" | tail -7
for hn in "" 0; do
  for r in $(seq "$ROUNDS"); do
    for i in 0 1 2 3; do
      OPPO_DECODE_HEADS_AS_N=$hn timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_scorer_graphs_gpu.py \
        -k overlapped > "$O/stress_hn${hn:-default}_r${r}_p$i.txt" 2>&1 &
    done
    wait
  done
  echo "OPPO_DECODE_HEADS_AS_N=${hn:-unset}: $(tail -qn1 "$O"/stress_hn${hn:-default}_r*_p*.txt | sed "s/ in .*//" | sort | uniq -c | tr '\n' ';')"
done
grep -lE "failed|Error" "$O"/stress_*.txt | head -4
