#!/usr/bin/env bash
# The one-command GPU check: build the extension, run the GPU tests, compute-sanitizer memcheck
# on tiny calls of each attention kernel and plan and racecheck on the default plans', then the named
# benchmarks.
#
#   bash bench/gpu_check.sh [BENCH ... | none]      (default: decode_attention prefill_attention sampler)
#
# BENCH names a script bench/BENCH.py that takes --out PATH (it writes its JSON there).
# Everything lands in $OUT (default bench/results/gpu_check): report.md (one line per step),
# log.txt (all output), and BENCH.json per benchmark. Each step has a time limit so that the
# whole check stays well under 10 minutes; a failing step is reported and the next one runs.
#
# On the device: OUT=$OUT PACK=1 (bench/pack_out.sh: traces summed on the spot, the rest tarred).
# BENCH_ONLY=1 skips doctor, pytest and the sanitizers (PYTEST_FILES="tests/a.py ..." still runs those) (build, then the benchmarks), for a
# benchmark that needs most of the 10 minutes: the end-to-end PPO step, one workload per call,
#   BENCH_ONLY=1 BENCH_ARGS="--workload G" bash bench/gpu_check.sh ppo_step
#   BENCH_ONLY=1 BENCH_ARGS="--workload T --trl" bash bench/gpu_check.sh ppo_step   (carry .whl)
# (build ~90 s + ppo_step <= ~8 min: its --budget-s 420 stops modes early / skips the rest).
# BENCH_LIMIT (seconds per benchmark) defaults to 240, and to 500 for ppo_step. PYTEST_LIMIT
# (default 240; 180 with PYTEST_FILES; PYTEST_K="expr" selects among them as pytest -k does) bounds the GPU tests, which run as PYTEST_SHARDS (default 4)
# processes side by side (bench/pytest_shards.sh; 1 = one process); SANITIZE=1 runs the sanitizers
# under BENCH_ONLY too (e.g. PYTEST_FILES=tests/test_attention_gpu.py SANITIZE=1 for a kernel change).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
REPORT="$OUT/report.md"
BENCHES=("$@")
[ ${#BENCHES[@]} -eq 0 ] && BENCHES=(decode_attention prefill_attention sampler)
[ "${BENCHES[*]}" = none ] && BENCHES=()      # `none`: no benchmark (a call of tests or sanitizers only)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
. bench/device_commit.sh   # the commit each JSON records (common.tree_commit): the carried .commit
T0=$(date +%s)
: > "$LOG"
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "command: bash bench/gpu_check.sh ${BENCHES[*]}"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  echo "tree: ${OPPO_COMMIT:-$(git log --oneline -1 2>/dev/null)}"
  echo '```'
  echo
  echo "| step | rc | seconds |"
  echo "| --- | --- | --- |"
} > "$REPORT"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc" >> "$LOG"
  echo "| $name | $rc | $(( $(date +%s) - t )) |" >> "$REPORT"
  echo "[$(( $(date +%s) - T0 ))s] $name rc=$rc"
  return $rc
}

step build 300 env CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 OPPO_PTXAS_VERBOSE=1 \
  $PY -m pip install -v --no-build-isolation --no-deps -e . || { echo "build failed"; tail -50 "$LOG"; exit 1; }
grep -E "registers|spill|stack frame" "$LOG" | sort | uniq -c | head -40 >> "$LOG"
# ptxas serializing wgmma (C7519 / "Performance Loss"): a kernel change broke the prefill v4 batches
grep -E "C75[0-9][0-9]|Performance Loss" "$LOG" | sort -u | head -5 | sed 's/^/| ptxas warning: /; s/$/ | - | - |/' >> "$REPORT"
# each wgmma prefill plan once in its own process under a time limit: a plan that hangs or fails is
# switched off (OPPO_PREFILL_WGMMA_OFF) for the tests, sanitizers and benchmarks below, and named
# here. ~30 s, so only in calls that run the prefill kernels' tests, sanitizers or benchmark.
smoke=
if [ -z "${BENCH_ONLY:-}" ] || [ -n "${SANITIZE:-}" ]; then smoke=1; fi      # all GPU tests, or sanitizers
case " ${PYTEST_FILES:-} ${BENCHES[*]} " in *attention*|*" tests "*|*" tests/ "*) smoke=1 ;; esac
[ "${SMOKE:-}" = 0 ] && smoke=      # SMOKE=0: skip it (a call that runs no prefill wgmma plan)
if [ -n "$smoke" ]; then
  step wgmma_smoke 200 $PY bench/wgmma_smoke.py ${SMOKE_PLANS:+--plans $SMOKE_PLANS}   # SMOKE_PLANS=a,b: only those
  off=$(grep -a "^OPPO_PREFILL_WGMMA_OFF=" "$LOG" | tail -1 | cut -d= -f2)
  if [ -n "$off" ]; then
    export OPPO_PREFILL_WGMMA_OFF=$off
    echo "| wgmma plans switched off: $off | - | - |" >> "$REPORT"
  fi
fi
if [ -z "${BENCH_ONLY:-}" ]; then
step doctor 60 $PY -m oppo_runtime.cli doctor
step pytest ${PYTEST_LIMIT:-240} env PYTHON=$PY bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider --durations=15
elif [ -n "${PYTEST_FILES:-}" ]; then        # BENCH_ONLY with a few GPU test files first (PYTEST_K: pytest's -k)
kargs=()
[ -n "${PYTEST_K:-}" ] && kargs=(-k "$PYTEST_K")
step pytest ${PYTEST_LIMIT:-180} env PYTHON=$PY bash bench/pytest_shards.sh -m gpu -q -rfE -p no:cacheprovider --durations=15 \
  ${kargs[@]+"${kargs[@]}"} $PYTEST_FILES
fi
if [ -n "${OPPO_TRAIN_STEPS:-}" ]; then   # the main job on the GPU: a short default run
  step train 240 $PY -m oppo_runtime.cli train --steps "$OPPO_TRAIN_STEPS" --out /tmp/oppo_train \
    run.timeline_every=5 run.progress=false run.cache_dir=/tmp/oppo_cache
  cp /tmp/oppo_train/timelines/step-000005.png "$OUT/train_timeline.png" 2>/dev/null
  tail -3 /tmp/oppo_train/metrics.jsonl > "$OUT/train_metrics_tail.jsonl" 2>/dev/null
fi
if [ -z "${BENCH_ONLY:-}" ] || [ -n "${SANITIZE:-}" ]; then   # SANITIZE=1: also with BENCH_ONLY
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
step memcheck 120 "$SAN" --tool memcheck --error-exitcode 9 $PY bench/sanitize_attention.py
# racecheck: the default plans only (every case under racecheck ran past 120 s in session 20; the
# A/B plans get memcheck above), decode and prefill as two steps (--prefill-plans skips decode)
step racecheck_decode 120 "$SAN" --tool racecheck --error-exitcode 9 $PY bench/sanitize_attention.py \
  --decode-only --decode-plans=v7
step racecheck_prefill 120 "$SAN" --tool racecheck --error-exitcode 9 $PY bench/sanitize_attention.py \
  --prefill-plans=wgmma_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ps
unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi
for b in "${BENCHES[@]}"; do
  limit=${BENCH_LIMIT:-240}
  [ "$b" = ppo_step ] && limit=${BENCH_LIMIT:-500}
  extra=$(eval echo "\${ARGS_$b:-}")          # per-benchmark arguments: ARGS_decode_attention="--plans v3,v2"
  step "bench_$b" "$limit" $PY "bench/$b.py" --out "$OUT/$b.json" ${BENCH_ARGS:-} $extra
done
{
  echo
  echo "total $(( $(date +%s) - T0 )) s"
  echo
  echo "## pytest summary"
  echo '```'
  grep -E "passed|failed|FAILED|ERROR" "$LOG" | tail -40
  echo '```'
  echo "## sanitizer summary"
  echo '```'
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rel err" "$LOG"
  echo '```'
  for b in "${BENCHES[@]}"; do
    echo "## $b"
    echo '```'
    awk "/=== bench_$b \\(/{f=1} f" "$LOG" | grep -v "^===" | tail -${REPORT_TAIL:-15}
    echo '```'
  done
} >> "$REPORT"
cat "$REPORT"
# PACK=1 (a device call, OUT=$OUT): traces summed and deleted, the rest in results.tgz beside
# report.md and log.txt (at most 8 files come back, 16 MiB each)
if [ -n "${PACK:-}" ]; then bash bench/pack_out.sh "$OUT" >> "$LOG" 2>&1; fi
