# Sourced (`. bench/device_commit.sh`) from the repository root by bench/gpu_check.sh and the
# device-call scripts: the commit each JSON records. A device call's copy of the tree keeps a stale
# .git, so a call carries .commit (`git rev-parse --short HEAD > .commit`); OPPO_COMMIT wins if set.
if [ -z "${OPPO_COMMIT:-}" ] && [ -s .commit ]; then export OPPO_COMMIT=$(head -c 40 .commit | tr -d '[:space:]'); fi
