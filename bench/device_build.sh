# Sourced (`. bench/device_build.sh`) from the repository root by the device-call scripts, after
# `. bench/device_commit.sh` and with O (the results folder) and T0 (the call's start, seconds) set:
# builds the extension as a user does (sm_90a, 16 jobs) into "$O/build.txt" and imports it, or
# exits. Always built: a machine kept warm holds the last call's extension, which may predate the
# sources.
# On the device (OUT set) it also packs "$O" when the script exits (bench/pack_out.sh): a call returns
# at most 8 files, and session 41's script wrote 13 and lost its pytest log and the probes' JSONs.
[ -n "${OUT:-}" ] && trap 'bash bench/pack_out.sh "$O" > /dev/null 2>&1' EXIT
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.txt" 2>&1 || { tail -30 "$O/build.txt"; exit 1; }
python3 -c "import oppo_runtime._C" || exit 1
echo "[$(( $(date +%s) - T0 ))s] built"
