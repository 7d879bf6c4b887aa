#!/usr/bin/env bash
# Session 24's one call for the warp-private refills (OPPO_DECODE_WARP_PIPE, bench +wp): build, the
# decode GPU tests that exercise the switch, issue 7's two small shapes with and without it (both plan
# orders), then its three large ones,
# the loads probe, and memcheck + racecheck of the v7:wp sanitizer cases. OUT=$OUT bash bench/decode_wp_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
PLANS=${PLANS:-v7+l2+lo,v7+l2+wp+lo,v7+l2,v7+l2+wp,v7+wp}
REV=$(echo "$PLANS" | tr ',' '\n' | tac | paste -sd, -)
BENCH_ONLY=1 SMOKE=0 OUT=$OUT PYTEST_FILES=tests/test_attention_gpu.py PYTEST_K="WARP_PIPE or loads_only" \
  ARGS_decode_attention="--shapes 1,4 --no-flex --plans $PLANS" bash bench/gpu_check.sh decode_attention > /dev/null 2>&1
python3 bench/decode_attention.py --shapes 1,4 --no-flex --plans "$REV" --out "$OUT/rev.json" > "$OUT/rev.txt" 2>&1
python3 bench/decode_loads_probe.py --out "$OUT/loads_probe.json" > "$OUT/probe.txt" 2>&1
grep -v Warning "$OUT/probe.txt" | tail -12
# the PTX loads Triton makes of the read probe's paged loop (4 warps, 64-token tiles, prefetch)
python3 - > "$OUT/triton_ptx.txt" 2>&1 <<'PY'
import collections, re, sys
sys.path.insert(0, "bench")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sm_balance_probe as P
_, paged = P._kernel()
sig = {"cache_ptr": "*bf16", "bt_ptr": "*i32", "out_ptr": "*fp32", "stamps_ptr": "*i64", "tokens": "i32",
       "n_heads": "i32", "page_stride": "i32", "row_stride": "i32", "v_off": "i32", "BS": "constexpr",
       "D": "constexpr", "TILE": "constexpr", "PREFETCH": "constexpr"}
for d in (128, 64):
    k = triton.compile(ASTSource(paged, sig, constexprs={"BS": 16, "D": d, "TILE": 64, "PREFETCH": True}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ops = collections.Counter(re.findall(r"\b(ld\.global[.\w]*|cp\.async[.\w]*|bar\.sync)", k.asm["ptx"]))
    try:
        k._init_handles()   # registers and spills, on a GPU
    except Exception:
        pass
    print("triton", triton.__version__, "D", d, "regs", getattr(k, "n_regs", None), "spills",
          getattr(k, "n_spills", None), dict(ops))
PY
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SAN" --tool $tool --error-exitcode 9 python3 bench/sanitize_attention.py \
    --decode-only --decode-plans=v7:wp >> "$OUT/san.txt" 2>&1
  echo "$tool rc=$?" >> "$OUT/san.txt"
done
# issue 7's three large shapes, with and without the switch (last: the first steps answer the question)
python3 bench/decode_attention.py --shapes 0,2,3 --no-flex --plans v7+l2,v7+l2+wp --out "$OUT/large.json" > "$OUT/large.txt" 2>&1
tail -30 "$OUT/report.md"; tail -6 "$OUT/rev.txt"; tail -7 "$OUT/large.txt"
grep -E "rc=|SUMMARY|FAIL|rel err" "$OUT/san.txt" | tail -20; tail -3 "$OUT/triton_ptx.txt"
