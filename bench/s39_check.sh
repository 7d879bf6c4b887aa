#!/usr/bin/env bash
# Device calls prepared in session 39 (not yet run). a (~6 min on a fresh H100): build; the GPU tests
# of OPPO_DECODE_ROPE_IN (paged_decode_attention_rope: the decode layer's rotary and K/V append as the
# attention kernel's prologue; the kernel against the rotary kernel + attention, pages bit for bit,
# eager and graphs; the engine's decode graphs' hidden states bit for bit) and the other decode GPU
# tests of the heads-as-N kernel; compute-sanitizer racecheck and memcheck of the v7:rope / v3:rope
# cases; then the engine at 0.5B B=256 with the rotary in the attention (`rope`) beside the default
# twice (`again`: the run's noise), with kernel profiles. b (~2 min, warm): bench/ingest_probe.py
# (per-SM ingest by TMA bulk copies, alone / all SMs / cluster multicast; NOTES "A probe of what
# streams into an SM" has its prediction), then, where part a built the extension, (1, 32768) with
# 16 splits against 32 on this card, both orders.
#
#   OUT=$OUT bash bench/s39_check.sh [a|b]   (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s39_check}
mkdir -p "$O"
. bench/device_commit.sh
T0=$(date +%s)
PARTS=" ${*:-a} "
if [[ $PARTS == *" a "* ]]; then
. bench/device_build.sh
timeout 240 python3 -m pytest -q -m gpu -x tests/test_decode_rope_in.py \
  "tests/test_attention_gpu.py::test_decode_rope_prologue_is_the_rotary_kernel_then_the_attention" \
  "tests/test_attention_gpu.py::test_decode_heads_as_n_keeps_the_error" > "$O/pytest.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] pytest rc=$rc"; tail -4 "$O/pytest.log"
bash bench/sanitize_decode.sh "$O" rope --decode-plans=v7:rope,v3:rope 120
echo "[$(( $(date +%s) - T0 ))s] sanitizer"
timeout 200 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 \
  --decode-env rope:OPPO_DECODE_ROPE_IN=1 --decode-env again:OPPO_DECODE_ROPE_IN=0 \
  --out "$O/engine_rope.json" > "$O/engine.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] engine rc=$rc"; grep -E "Error|error" "$O/engine.log" | head -5; tail -6 "$O/engine.log"
fi
if [[ $PARTS == *" b "* ]]; then
timeout 150 python3 bench/ingest_probe.py --out "$O/ingest_probe.json" > "$O/ingest.log" 2>&1
rc=$?; echo "[$(( $(date +%s) - T0 ))s] ingest probe rc=$rc"; tail -32 "$O/ingest.log"
# (1, 32768) with 16 splits instead of 32 (OPPO_DECODE_SPLIT_SLOTS=1), both orders: measured on H200s
# only (session 27); needs the extension part a built on this machine
if python3 -c "import oppo_runtime._C" 2>/dev/null; then
  timeout 120 python3 bench/decode_attention.py --no-flex --shapes 4,1 --plans v7+l2,v7+l2+s1 \
    --out "$O/decode_s1.json" > "$O/decode_s1.log" 2>&1
  timeout 120 python3 bench/decode_attention.py --no-flex --shapes 4,1 --plans v7+l2+s1,v7+l2 \
    --out "$O/decode_s1_reversed.json" > "$O/decode_s1_reversed.log" 2>&1
  echo "[$(( $(date +%s) - T0 ))s] split slots"; tail -4 "$O/decode_s1.log" "$O/decode_s1_reversed.log"
fi
fi
