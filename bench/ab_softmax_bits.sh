#!/usr/bin/env bash
# One device call (~7 min on a fresh machine) that measures session 21's softmax levers on the
# prefill wgmma kernel (bench/NOTES.md "Session 21"): P packed to bf16 by integer ops instead of
# cvt (_ip) and a quarter of P by a cubic on the FMA pipe instead of ex2 (_pe), each and both,
# on the default plans of both head dims:
#   the build; the wgmma smoke; the GPU tests of the two flags and of the default and wgmma3 plans;
#   memcheck of both flags (D=64 and D=128); issue 8's three shapes with the eight plans beside
#   Flex and SDPA (prefill_attention.json); the D=64 shape again in the reverse plan order; the
#   item stamps of the four D=64 variants (tile time against the tensor cores' floor); the SASS
#   opcode counts of the wgmma kernels (MUFU.EX2, F2FP, PRMT) to check what each form compiles to.
#
#   OUT=$OUT bash bench/ab_softmax_bits.sh      (on the device, carrying .commit; results under $OUT)
set -u
cd "$(dirname "$0")/.."
O=${OUT:-bench/results/ab_softmax_bits}
mkdir -p "$O"
BENCH_ONLY=1 BENCH_LIMIT=200 SMOKE_PLANS=wgmma_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_ip_ps,wgmma_pp_ov_qp_xc_pe_ps,wgmma_pp_ov_qp_xc_pe_ip_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ip_ps,wgmma3_pp_ov_qp_xc_pe_ps,wgmma3_pp_ov_qp_xc_pe_ip_ps PYTEST_FILES="tests/test_attention_gpu.py" PYTEST_LIMIT=150 \
  PYTEST_K="int_pack or poly_exp or bit_flags or wgmma3 or prefill_default or auto" \
  ARGS_prefill_attention="--shapes 0,1,2 --plans wgmma_pp_ov_qp_xc_ps,wgmma_pp_ov_qp_xc_ip_ps,wgmma_pp_ov_qp_xc_pe_ps,wgmma_pp_ov_qp_xc_pe_ip_ps,wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ip_ps,wgmma3_pp_ov_qp_xc_pe_ps,wgmma3_pp_ov_qp_xc_pe_ip_ps" \
  OUT="$O" bash bench/gpu_check.sh prefill_attention > /dev/null 2>&1
{
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$SAN" --tool memcheck --error-exitcode 9 python3 bench/sanitize_attention.py \
    --prefill-plans=wgmma3_pp_ov_qp_xc_pe_ip_ps,wgmma_pp_ov_qp_xc_pe_ip_ps 2>&1 | tail -4
  echo "memcheck (_pe_ip) rc=${PIPESTATUS[0]}"
  timeout 60 python3 bench/prefill_attention.py --shapes 1 --plans wgmma3_pp_ov_qp_xc_pe_ip_ps,wgmma3_pp_ov_qp_xc_pe_ps,wgmma3_pp_ov_qp_xc_ip_ps,wgmma3_pp_ov_qp_xc_ps --no-flex \
    --out "$O/prefill_order.json" 2>&1 | tail -3
  timeout 90 python3 bench/prefill_stamps.py --plans wgmma3_pp_ov_qp_xc_ps,wgmma3_pp_ov_qp_xc_ip_ps,wgmma3_pp_ov_qp_xc_pe_ps,wgmma3_pp_ov_qp_xc_pe_ip_ps --out "$O/prefill_stamps_bits.json" 2>&1 | tail -12
  SO=$(ls oppo_runtime/_C*.so | head -1)
  OBJ=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
  timeout 60 "$OBJ" -sass "$SO" 2>/dev/null | python3 bench/sass_counts.py --match paged_prefill_wgmma \
    --ops MUFU.EX2,F2FP,PRMT,HGMMA,FFMA,SHF,IADD3,LOP3 2>&1 | tail -12
} > "$O/checks.txt" 2>&1
tail -25 "$O/report.md"; cat "$O/checks.txt"
bash bench/pack_out.sh "$O"
