#!/usr/bin/env bash
# One device call (~4 min on a fresh machine; 143 s of wall time in session 21): where the prefill wgmma kernel's tile time goes.
# Session 21 falsified the softmax's MUFU/cvt pipe as the bound at head dim 64 (P packed by
# integer ops, _ip, and a quarter of P by a cubic, _pe, were 5-13% slower); this asks ncu which
# pipe or stall does bind: the build, then ncu (bench/ncu_attention.sh with the pipes' sections and
# source-level stalls) of the default plans at issue 8's D=64 shape (wgmma3) and its first D=128
# shape, then the raw pipe metrics of the D=64 one (in m/; a name this ncu lacks fails only that).
#
#   OUT=$OUT bash bench/ncu_prefill_pipes.sh      (on the device; reports under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ncu_prefill_pipes}
mkdir -p "$O/m"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout 300 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.txt" 2>&1 || { tail -30 "$O/build.txt"; exit 1; }
OPPO_PREFILL_PLAN=wgmma3_pp_ov_qp_xc_ps NCU_PIPES=1 NCU_SOURCE=1 OUT="$O" bash bench/ncu_attention.sh prefill 1
OPPO_PREFILL_PLAN=wgmma_pp_ov_qp_xc_ps NCU_PIPES=1 NCU_SOURCE=1 OUT="$O" bash bench/ncu_attention.sh prefill 0
OPPO_PREFILL_PLAN=wgmma3_pp_ov_qp_xc_ps OUT="$O/m" \
  NCU_METRICS=sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_issued.avg.pct_of_peak_sustained_active \
  bash bench/ncu_attention.sh prefill 1
for f in "$O"/ncu_*.txt "$O"/m/ncu_*.txt; do
  echo "== $f"
  grep -a -E "pipe_|Pipe|Issue Slots|Issued Ipc|Executed Ipc|SM Busy|Stall|Warp Cycles|Duration|Compute \(SM\)|Registers|Achieved Occ|Error|ERR" "$f" | head -40
done
gzip -9 "$O"/ncu_*.txt 2>/dev/null
