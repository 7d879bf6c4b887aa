#!/usr/bin/env bash
# One device call (~6 min on a fresh H100), session 35: (1) the DRAM latency probe beside the
# stamped decode call (session 34's unrun item 0: is the small shapes' tail DRAM-bound?); (2) the
# Triton kernels launched with PDL (OPPO_TRITON_PDL=1), alone and with the decode kernel's PDL
# (OPPO_DECODE_PDL=1), in the engine's decode graph at B=256, beside the default in the
# same process, with the default's kernel profile; and the diagnostic that launches no add+RMSNorm
# and no silu*mul (OPPO_DIAG_SKIP_ELEMENTWISE: wrong outputs), the most folding them away could win. Build; the PDL GPU test
# tests first (the stamps mend is exercised by decode_tiles.py; a wrong PDL wait shows there as a mismatch, not as a timing). (3) cuBLASLt's other
# algorithms (the heuristic's 16 first answers and their split-K versions, bench/lt_probe.py) for the
# four projections at B=256, cold, beside F.linear: is a better GEMM one algorithm choice away?
#
#   OUT=$OUT bash bench/s35_check.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/s35_check}
mkdir -p "$O"
. bench/device_commit.sh
OUT="$O" BENCH_ONLY=1 SMOKE=0 PYTEST_FILES="tests/test_triton_pdl.py" PYTEST_SHARDS=1 \
  PYTEST_LIMIT=90 bash bench/gpu_check.sh none > /dev/null 2>&1
grep -E "^\| (build|pytest)|passed|failed|FAILED|Error" "$O/report.md" | head -20
timeout 110 python3 bench/decode_tiles.py --plans v7+l2 --shapes 1,4 --probe 2000 --out "$O/decode_tiles_probe.json" 2>&1 | tail -30
timeout 200 python3 bench/engine.py --kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 \
  --decode-env tpdl:OPPO_TRITON_PDL=1 --decode-env pdl:OPPO_TRITON_PDL=1,OPPO_DECODE_PDL=1 \
  --decode-env skip:OPPO_DIAG_SKIP_ELEMENTWISE=norm+silu \
  --out "$O/engine_pdl.json" 2>&1 | tail -14
timeout 100 python3 bench/linear_probe.py --batches 256 --libs cublaslt,lt_all --out "$O/linear_probe_lt.json" 2>&1 | tail -24
