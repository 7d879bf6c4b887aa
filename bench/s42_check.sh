#!/usr/bin/env bash
# Session 42's device calls (H100), two parts on one warm machine, each under the 10-minute limit:
#
#   OUT=$OUT bash bench/s42_check.sh a   (carry .commit; ~8 min on a fresh machine)
#     build, the wgmma smoke, every GPU test (the rotary prologue now the default, the fixed fold
#     test, tests/test_gate_up_silu.py, tests/test_linear_ksplit.py), linear_probe at 0.5B and 1.5B,
#     B=64 and 256: the gate_up + silu*mul unit (cuBLAS + silu_mul against gate_up_silu, both lags) and
#     o_proj / down_proj (cuBLAS against linear_ksplit), over the floor; then compute-sanitizer
#     memcheck and racecheck of both kernels on small cases. The attention sanitizers are not in it
#     (their kernels did not change this session; device time).
#   OUT=$OUT bash bench/s42_check.sh b   (~6-7 min on the machine of part a)
#     the engine at 0.5B B=256, kernel profiles: the default (the rotary prologue on), the one-kernel MLP
#     (`gus`), o_proj and down_proj through linear_ksplit (`ks`), both (`gk`)
#   OUT=$OUT bash bench/s42_check.sh c   (~3 min) issue 7's decode table
# Both pack $OUT (at most 8 files come back).
set -u
cd "$(dirname "$0")/.."
part=${1:-a}
OUT=${OUT:-bench/results/s42}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
case $part in
a)
  BENCH_ONLY=1 PYTEST_FILES=tests PYTEST_LIMIT=240 OUT=$OUT \
    ARGS_linear_probe="--shapes qwen2.5-0.5b,qwen2.5-1.5b --batches 64,256 --libs cublas,gus,ksplit" \
    bash bench/gpu_check.sh linear_probe
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  code='
import torch
from oppo_runtime.ops import fused
g = torch.Generator().manual_seed(0)
x = torch.randn(70, 136, generator=g).cuda().bfloat16()
w = (torch.randn(2 * 104, 136, generator=g) * 0.1).cuda().bfloat16()
out = fused.gate_up_silu(x, w, backend="cuda")
err = ((out.float() - fused.gate_up_silu_ref(x, w).float()).norm() / fused.gate_up_silu_ref(x, w).float().norm()).item()
torch.cuda.synchronize()
print("gate_up_silu rel err", err)
assert err < 2e-3
x = torch.randn(70, 136, generator=g).cuda().bfloat16()
w = (torch.randn(88, 136, generator=g) * 0.1).cuda().bfloat16()
out = fused.linear_ksplit(x, w, backend="cuda")
ref = fused.linear_ksplit_ref(x, w).float()
err = ((out.float() - ref).norm() / ref.norm()).item()
torch.cuda.synchronize()
print("linear_ksplit rel err", err)
assert err < 2e-3
'
  for tool in memcheck racecheck; do
    echo "=== gate_up_silu + linear_ksplit $tool" >> "$OUT/log.txt"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 "$SAN" --tool $tool --error-exitcode 9 $PY -c "$code" >> "$OUT/log.txt" 2>&1
    rc=$?
    echo "| gate_up_silu + linear_ksplit $tool | $rc | - |" >> "$OUT/report.md"
    echo "gate_up_silu + linear_ksplit $tool rc=$rc"
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rel err" "$OUT/log.txt" | tail -8
  ;;
b)
  BENCH_ONLY=1 SMOKE=0 BENCH_LIMIT=480 OUT=$OUT \
    ARGS_engine="--kernel-profile --shapes qwen2.5-0.5b --batches 256 --hf-min-batch 100000 --decode-env gus:OPPO_DECODE_GATE_UP_SILU=1 --decode-env ks:OPPO_DECODE_LINEAR_KSPLIT=1 --decode-env gk:OPPO_DECODE_GATE_UP_SILU=1,OPPO_DECODE_LINEAR_KSPLIT=1" \
    bash bench/gpu_check.sh engine
  ;;
c)
  BENCH_ONLY=1 SMOKE=0 OUT=$OUT bash bench/gpu_check.sh decode_attention
  ;;
*) echo "usage: s42_check.sh a|b|c"; exit 2 ;;
esac
bash bench/pack_out.sh "$OUT" >> "$OUT/log.txt" 2>&1
