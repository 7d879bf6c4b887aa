#!/usr/bin/env bash
# Run pytest as PYTEST_SHARDS processes side by side (default 4), each on every n-th test
# (OPPO_TEST_SHARD=i/n, tests/conftest.py), and print their outputs one after the other.
# The GPU tests are mostly host-bound (references, launches, JIT): on a 16-core GPU machine
# four processes cover about four times the cases in the same limit.
#
#   bash bench/pytest_shards.sh -m gpu -q tests/test_attention_gpu.py
#
# Exit status: the first failing shard's (0 if all pass). Killed (timeout), it kills its shards.
set -u
n=${PYTEST_SHARDS:-4}
PY=${PYTHON:-python3}
dir=$(mktemp -d)
pids=()
# Each shard in its own process group (setsid), killed as a group: the checks that tests run as
# `python -c` subprocesses (tests/_scripts.py run_check) would otherwise outlive a timed-out shard and
# hold the GPU and the CPU under the benchmarks that follow (session 36: a check left running beside
# the engine bench is the likely cause of that run's step times reading 5-25% high).
trap 'for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null; done; wait 2>/dev/null' TERM INT
for ((i = 0; i < n; i++)); do
  OPPO_TEST_SHARD=$i/$n setsid $PY -m pytest "$@" > "$dir/shard$i.txt" 2>&1 &
  pids+=($!)
done
rc=0
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}" 2>/dev/null
  r=$?
  [ $rc -eq 0 ] && [ $r -ne 0 ] && [ $r -ne 5 ] && rc=$r      # 5: this shard collected nothing
  echo "----- shard $i/$n (rc=$r)"
  cat "$dir/shard$i.txt"
done
rm -rf "$dir"
exit $rc
