"""Each wgmma prefill plan once, on a small ragged case, each in its own process under a time limit,
so that a plan that hangs (an mbarrier phase or a setmaxnreg split gone wrong) or fails costs
seconds, not the GPU check's whole test and benchmark time:

    python bench/wgmma_smoke.py [--limit-s 60] [--plans a,b]      (prints OPPO_PREFILL_WGMMA_OFF=<failed plans>)

Per plan: D=64 (G=7) and D=128 (G=4; not for the head-dim-64 wgmma3 plans), prefixes 0 to 700 not multiples of the page, chunks 1 to
300, shuffled pages, NaN-poisoned output, compared with the fp32 reference (the pool, tables and
check of ``bench/sanitize_attention.py``). The last line is
``OPPO_PREFILL_WGMMA_OFF=...`` (empty when every plan passed): bench/gpu_check.sh exports it, so
the tests, the sanitizers and the benchmark skip those plans and say so. Exits 0 when the device
cannot run wgmma at all (nothing to check) or every plan passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

PLANS = ("wgmma", "wgmma_pp", "wgmma_ov", "wgmma_pp_ov", "wgmma_pp_ov_ps", "wgmma_kv", "wgmma_pp_ov_kv",
         "wgmma_pp_ov_qp_ps", "wgmma3_pp_ov_qp_ps", "wgmma_pp_ov_qp_xc_ps", "wgmma3_pp_ov_qp_xc_ps",
         "wgmma_pp_ov_qp_mi_ps", "wgmma3_pp_ov_qp_mi_ps", "wgmma3_pp_ov_qp_xc_ks_ps",
         "wgmma3_pp_ov", "wgmma3_pp_ov_ps", "wgmma3_ov_ps")   # wgmma3: three consumer warpgroups, head dim 64 only

CASES = ((14, 2, 64, [0, 20, 3, 130, 700], [1, 70, 17, 300, 64]),     # Hq, Hkv, D, prefixes, chunks
         (8, 2, 128, [0, 200, 5, 511], [3, 90, 140, 257]))


def one(plan: str) -> int:
    """The child process: both cases under OPPO_PREFILL_PLAN=plan, through the sanitizer script's
    prefill check (paged pool with a page stride above one page, shuffled tables, NaN-poisoned
    output, fp32 reference); 0 when both pass."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from sanitize_attention import prefill_plan_check
    from oppo_runtime.ops import attention as A
    torch.manual_seed(0)
    ok = True
    for Hq, Hkv, D, pre, chk in CASES:
        if D not in A.prefill_plan_head_dims(plan):
            continue
        ok &= prefill_plan_check(f"{plan} D={D}", plan, Hq, Hkv, D, pre, chk, D ** -0.5, spare_blocks=5)
    return 0 if ok else 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-s", type=float, default=60.0, help="per plan (the first includes CUDA start-up)")
    ap.add_argument("--plans", default=None, help="comma list: only these of the plans (an A/B call's; each ~5 s)")
    ap.add_argument("--plan", help=argparse.SUPPRESS)     # the child process: run this plan's cases
    args = ap.parse_args()
    plans = PLANS
    if args.plans:
        plans = tuple(p.strip() for p in args.plans.split(",") if p.strip())
        unknown = [p for p in plans if p not in PLANS]
        assert not unknown, f"--plans: not wgmma plans of this smoke: {unknown} (known: {', '.join(PLANS)})"
    if args.plan:
        sys.exit(one(args.plan))
    from oppo_runtime.ops.attention import prefill_wgmma_available
    if not prefill_wgmma_available():
        print("no sm_90 device or no sm_90a build: no wgmma plan to check")
        print("OPPO_PREFILL_WGMMA_OFF=")
        return
    failed = []
    for plan in plans:
        t = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, __file__, "--plan", plan], capture_output=True, text=True,
                               timeout=args.limit_s)
            tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
            status = ("ok, " if r.returncode == 0 else f"FAIL rc={r.returncode}: ") + tail[0][:200]
        except subprocess.TimeoutExpired:
            status = f"HANG (killed after {args.limit_s:.0f} s)"
        print(f"{plan}: {status} ({time.perf_counter() - t:.1f} s)", flush=True)
        if not status.startswith("ok"):
            failed.append(plan)
    print("OPPO_PREFILL_WGMMA_OFF=" + ",".join(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
