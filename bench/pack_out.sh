#!/usr/bin/env bash
# Shrink a device call's output folder to what comes back (at most 8 files, 16 MiB each):
#   1. every chrome trace (*_trace.json.gz) is summed by bench/trace_phases.py on the spot, by the
#      update's phases and by the rollout's ranges (engine/, scorer/), into <trace>.phases.txt,
#      and deleted (a G step's trace passes 16 MiB and would be left out, with all beside it);
#   2. if more than KEEP files (default 6) remain, everything but report.md and log.txt goes into
#      results.tgz (subfolders included).
#
#   bash bench/pack_out.sh DIR            (bench/gpu_check.sh runs it on $OUT at its end)
set -u
dir=${1:?usage: pack_out.sh DIR}
PY=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
keep=${KEEP:-6}
while IFS= read -r -d '' t; do
  {
    echo "# $(basename "$t"): the update's phases"
    timeout 120 "$PY" "$here/trace_phases.py" "$t" 2>&1
    echo
    echo "# $(basename "$t"): the rollout (engine/ on the actor thread, scorer/ on the scorer thread)"
    timeout 120 "$PY" "$here/trace_phases.py" "$t" --prefix engine/,scorer/ 2>&1
  } > "${t%.json.gz}.phases.txt"
  rm -f "$t"
done < <(find "$dir" -name '*_trace.json.gz' -print0)
n=$(find "$dir" -type f | wc -l)
if [ "$n" -gt "$keep" ]; then
  tmp=$(mktemp -d)
  (cd "$dir" && find . -mindepth 1 -maxdepth 1 ! -name report.md ! -name log.txt -print0 \
     | xargs -0 -r tar czf "$tmp/results.tgz" && find . -mindepth 1 -maxdepth 1 ! -name report.md ! -name log.txt \
     -exec rm -rf {} +)
  mv "$tmp/results.tgz" "$dir/results.tgz"
  rmdir "$tmp"
fi
ls -la "$dir"
