#!/usr/bin/env bash
# The actor's rollout alone (bench/rollout_probe.py) at an older revision and at this tree, in one
# call on one card, interleaved: decides whether a rollout slowdown between two sessions is code
# (and in which batch sizes of the shrinking tail it sits) or the machine.
#
#   bash bench/ab_rollout.sh [REV]            (default a1fb193: session 4's intra_overlap run)
#   AB_TAR=old.tar bash bench/ab_rollout.sh   (the old tree from `git archive REV -o old.tar`,
#                                              carried, where the device's .git lacks REV)
#
# Builds this tree as gpu_check does and REV in place under /tmp/ab_old (TORCH_CUDA_ARCH_LIST=9.0a),
# the two builds side by side, then runs the probe twice per tree, alternating. Writes
# $OUT/ab_rollout_{new,old}_{1,2}.json and a summary in $OUT/ab_rollout.txt (median seconds and
# per-bucket step ms of each run).
# PROBE_ARGS: extra arguments of the probe (e.g. "--device cpu --tiny --quick" for a CPU check).
# AB_NEW_ENV: "VAR=value ...": a third arm, this tree under that environment
# (e.g. OPPO_GRAPH_SAMPLING=0).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/ab_rollout}
REV=${1:-a1fb193}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/ab_rollout.txt"
: > "$LOG"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
echo "# ab_rollout $(date -u +%Y-%m-%dT%H:%M:%SZ): old=${AB_TAR:-$REV} new=$(git log --oneline -1 2>/dev/null | cut -c1-60)" | tee -a "$LOG"
rm -rf /tmp/ab_old
if [ -n "${AB_TAR:-}" ]; then
  mkdir -p /tmp/ab_old && tar -xf "$AB_TAR" -C /tmp/ab_old
else
  git worktree prune 2>/dev/null
  git worktree add -f /tmp/ab_old "$REV" > /dev/null 2>&1 \
    || { echo "no revision $REV here: pass AB_TAR (git archive $REV -o old.tar, carried)" | tee -a "$LOG"; exit 1; }
fi
# both trees build side by side (each has fewer translation units than the machine has cores)
$PY -m pip install -q --no-build-isolation --no-deps -e . >> "$OUT/build_new.log" 2>&1 &
new_pid=$!
(cd /tmp/ab_old && $PY setup.py -q build_ext --inplace) >> "$OUT/build_old.log" 2>&1
old_rc=$?
wait $new_pid || { echo "build of this tree failed" | tee -a "$LOG"; exit 1; }
[ $old_rc = 0 ] || { echo "build of $REV failed (see build_old.log)" | tee -a "$LOG"; exit 1; }
echo "built both trees in $SECONDS s" | tee -a "$LOG"
for round in 1 2; do
  $PY bench/rollout_probe.py --reps 2 ${PROBE_ARGS:-} --out "$OUT/ab_rollout_new_$round.json" 2>&1 | tail -9 | sed "s/^/new $round: /" | tee -a "$LOG"
  PYTHONPATH=/tmp/ab_old $PY bench/rollout_probe.py --reps 2 ${PROBE_ARGS:-} --out "$OUT/ab_rollout_old_$round.json" 2>&1 \
    | tail -9 | sed "s/^/old $round: /" | tee -a "$LOG"
  # AB_NEW_ENV="OPPO_GRAPH_SAMPLING=0": this tree once more per round under that environment
  if [ -n "${AB_NEW_ENV:-}" ]; then
    env $AB_NEW_ENV $PY bench/rollout_probe.py --reps 2 ${PROBE_ARGS:-} --out "$OUT/ab_rollout_newenv_$round.json" 2>&1 \
      | tail -9 | sed "s/^/new[$AB_NEW_ENV] $round: /" | tee -a "$LOG"
  fi
done
