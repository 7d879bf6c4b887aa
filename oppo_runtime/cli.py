"""`oppo train | doctor | bench`."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys

__all__ = ["main"]


def _doctor(args) -> int:
    import torch

    from . import ops
    from .memory import KVGeometry, PagePool
    from .ops import attention

    print(f"oppo-runtime   {__import__('oppo_runtime').__version__}")
    print(f"python         {platform.python_version()} ({sys.executable})")
    print(f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    cuda = torch.cuda.is_available()
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        print(f"CUDA device    {torch.cuda.get_device_name(0)} (sm_{major}{minor}, {torch.cuda.device_count()} visible)")
        if torch.cuda.device_count() > 1:
            print("placement      scorers can run on a second GPU: oppo train run.scorer_device=cuda:1")
    else:
        print("CUDA device    none")
    ext = ops.extension()
    if ext is None:
        print(f"extension _C   NOT LOADED: {ops.extension_error()}")
    else:
        print(f"extension _C   loaded; CUDA kernels compiled: {ext.cuda_kernels_compiled()}"
              f"{' for ' + ext.cuda_arch_list() if ext.cuda_kernels_compiled() else ' (host-only build: CPU torch or no nvcc)'}")
    # run each op once on a tiny input, so that the backend it really uses is recorded
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    g = KVGeometry(1, 2, 64, dtype)
    pool = PagePool(4, PagePool.page_bytes_for([g], 16), dev)
    k, v = pool.register("doctor", g).kv_caches[0]
    q = torch.randn(2, 4, 64, device=dev, dtype=dtype)
    kv = torch.randn(3, 2, 64, device=dev, dtype=dtype)
    problems = []
    for name, fn in [
        ("kv_append", lambda: attention.kv_append(kv, kv, k, v, torch.tensor([0, 1, -1], device=dev))),
        ("paged_decode_attention", lambda: attention.paged_decode_attention(
            q, k, v, torch.tensor([[0], [1]], dtype=torch.int32, device=dev),
            torch.tensor([2, 1], dtype=torch.int32, device=dev), 0.125)),
        ("paged_prefill_attention", lambda: attention.paged_prefill_attention(
            q, k, v, torch.tensor([0, 2], dtype=torch.int32, device=dev), torch.tensor([2], dtype=torch.int32, device=dev),
            torch.tensor([[0]], dtype=torch.int32, device=dev), 0.125)),
        ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(
            kv.reshape(3, 128), None, torch.ones(128, device=dev, dtype=dtype), 1e-6)),
        ("rotary_qk", lambda: ops.rotary_qk(q, kv[:2], ops.rotary_cos_sin_cache(torch.ones(32), 8, dev),
                                            torch.tensor([0, 1], device=dev))),
        ("silu_mul", lambda: ops.silu_mul(kv.reshape(3, 128))),
    ]:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {type(e).__name__}: {e}")
    if cuda:
        torch.cuda.synchronize()
    print("op backends:")
    for op, backend in sorted(ops.backends().items()):
        note = "" if backend in ("cuda", "triton") or not cuda else "   <- reference on a GPU: no GPU kernel for this op"
        print(f"  {op:28s} {backend}{note}")
    print("switches (environment; unset = default):")
    for name, default in _SWITCHES:
        print(f"  {name:24s} {os.environ.get(name, '-'):10s} default: {default}")
    for p in problems:
        print(f"  PROBLEM {p}")
    return 1 if problems else 0


# Environment switches the runtime reads, and what it does without them (doctor lists them).
_SWITCHES = (
    ("OPPO_OP_BACKEND", "each op's fastest backend here (cuda > triton > reference)"),
    ("OPPO_PREFILL_BACKEND", "chunk prefill: triton on sm_90, else cuda"),
    ("OPPO_REQUIRE_KERNELS", "off (1: a missing GPU kernel is an error, not a reference fallback)"),
    ("OPPO_DECODE_PLAN", "v7 (v3's kernel, the splits merged by each group's last CTA; v2/v3/v4/v5/v6: A/B plans of the decode kernel; v3 merges splits with a second kernel, v5 claims items dynamically, v6 is v3 lean at D=128)"),
    ("OPPO_DECODE_V5_ITEMS", "4 (v5: work items per resident CTA slot, at least)"),
    ("OPPO_DECODE_V5_MAX_PART", "512 (v5: tokens per work item, at most)"),
    ("OPPO_PREFILL_PLAN", "auto (on sm_90a wgmma_pp_ov_qp_xc_ps at D=128, wgmma3_pp_ov_qp_xc_ps at D=64 bf16, else mma; wgmma[3][_pp][_ov][_kv][_qp][_xc][_mi][_ks][_ps]: the sm_90a plans, wgmma3 D=64 bf16)"),
    ("OPPO_PREFILL_WGMMA_OFF", "none (a comma list of wgmma plans, or all, that tests and benches skip)"),
    ("OPPO_DECODE_TICKETS", "pool (memset: v4/v5/v7's counters in the per-call workspace)"),
    ("OPPO_DECODE_PDL", "0 (1: the decode split kernel and its reduction with programmatic dependent launch)"),
    ("OPPO_DIAG_SKIP_ELEMENTWISE", "unset (norm,silu: a bench diagnostic, those Triton kernels not launched on CUDA"
                                   " tensors; wrong outputs, it warns)"),
    ("OPPO_DECODE_PREFETCH", "1 (0|1|2: the decode split kernel also prefetches the next 0, 1 or 2 tiles' rows into L2)"),
    ("OPPO_DECODE_REFILL", "0 (1: the decode split kernel refills each stage as soon as its tile is done; an A/B"
                           " switch, slower beside the prefetch in session 23)"),
    ("OPPO_DECODE_DIAG_LOADS_ONLY", "0 (1: a bench diagnostic, the decode split kernel's loads without its arithmetic;"
                                    " wrong outputs, it warns)"),
    ("OPPO_DECODE_FAST_MERGE", "1 (decode v7's split merge by an acq_rel ticket and 32-split batches at head dim"
                               " 128; 0: two fences and 16-split batches)"),
    ("OPPO_DECODE_REG_STAGE", "0 (1: the decode split kernel loads tiles through registers, not cp.async; head dim"
                              " 128, plans v2/v3/v7; an A/B switch)"),
    ("OPPO_DECODE_HEADS_AS_N", "unset (the decode split kernel's tiles with the heads as the mma's N, half its mma"
                               " and exponentials, for groups of 1..8 query heads with plans v2/v3/v7; 1: forced"
                               " on, groups of <= 8; 0: the 16-row form)"),
    ("OPPO_DECODE_SPLIT_SLOTS", "0 (N: the decode split rule (v3/v4/v6/v7) plans one wave of N CTAs per SM, not the"
                                " kernel's resident count; an A/B switch)"),
    ("OPPO_FUSE_KV_APPEND", "1 (K/V append inside the rotary kernel)"),
    ("OPPO_ASYNC_DECODE", "1 on CUDA (tokens read back one step late)"),
    ("OPPO_GRAPH_SAMPLING", "1 (LM head + sampler inside the decode graphs; 0: eager head)"),
    ("OPPO_DECODE_GATE_UP_SILU", "0 (1: the decode MLP's gate_up GEMM and silu*mul as one sm_90a kernel, batches of <= 256"
                                 " rows; an A/B switch)"),
    ("OPPO_GATE_UP_SILU_LAG", "1 (gate_up_silu's MMA groups left in flight at a K step's end; 0: an A/B with one"
                              " more stage of copies in flight)"),
    ("OPPO_DECODE_LINEAR_KSPLIT", "0 (1: the decode layers' o_proj and down_proj as one sm_90a kernel in clusters of 8"
                                  " CTAs splitting K, batches of <= 256 rows; an A/B switch)"),
    ("OPPO_DECODE_GEMM_FUSION", "0 (1: add+RMSNorm fused into the decode QKV and gate_up GEMMs)"),
    ("OPPO_DECODE_NORM_FOLD", "0 (1: each decode RMSNorm folded into the projection after it: its weight into a "
                              "copy of the qkv/gate_up weights, its row scale into the rotary/silu*mul kernels)"),
    ("OPPO_DECODE_ROPE_IN", "1 (the decode layer's rotary and K/V append as the decode attention kernel's "
                            "prologue, one launch a layer fewer: -37 to -50 us of the step and -60 us of kernel "
                            "time at 0.5B B=256 on an H100, pages bit-equal to the rotary kernel's; "
                            "0: the rotary kernel, then the attention)"),
    ("OPPO_STATIC_DECODE", "0 (1 on a CPU: decode through the graphs' packed input buffers, eagerly)"),
    ("OPPO_SCORER_GRAPHS", "1 (scorers' chunk prefill in CUDA graphs; 0: eager)"),
    ("OPPO_TRAIN_ATTENTION", "auto (FlashAttention-2 varlen on sm_80+, else padded SDPA)"),
    ("OPPO_TRAIN_FUSED", "1 (Triton RMSNorm and silu*up for training)"),
    ("OPPO_TRITON_AUTOTUNE", "1 (0: the Triton prefill takes one fixed config, no autotuning)"),
)


def _train(args) -> int:
    from .ppo.config import load_config
    from .ppo.trainer import PPOTrainer

    overrides = list(args.overrides)
    if args.overlap:
        overrides.append(f"run.overlap={args.overlap}")
    if args.steps:
        overrides.append(f"run.total_steps={args.steps}")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    cfg = load_config(args.config, overrides)
    if args.resume:
        # the run's own saved config wins over defaults, the command line over both
        from .ppo.checkpoint import latest_checkpoint
        import json
        ck = latest_checkpoint(os.path.join(cfg.run.out_dir, "checkpoints"))
        if ck is not None:
            saved = json.loads((ck / "state.json").read_text())["config"]
            cfg = load_config(None, overrides, base=saved)
    print("config:\n" + cfg.dumps())
    trainer = PPOTrainer(cfg, resume=args.resume)
    last = trainer.train()
    print(f"done: {cfg.run.total_steps} steps; last mean reward {last.get('objective/scores', float('nan')):.4f}; "
          f"metrics in {cfg.run.out_dir}/metrics.jsonl, curve in {cfg.run.out_dir}/reward_curve.png, "
          f"timelines in {cfg.run.out_dir}/timelines/")
    return 0


def _bench_dir():
    """The repository's bench/ beside the package (a source checkout or an editable install)."""
    from pathlib import Path
    d = Path(__file__).resolve().parent.parent / "bench"
    return d if (d / "common.py").exists() else None


def _benches(d) -> dict[str, str]:
    """Runnable benchmarks: bench/*.py with a __main__ guard, and the first line of their docstring."""
    import ast
    out = {}
    for f in sorted(d.glob("*.py")):
        src = f.read_text(encoding="utf-8")
        if f.stem.startswith("_") or '__name__ == "__main__"' not in src:
            continue
        doc = ast.get_docstring(ast.parse(src)) or ""
        out[f.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def _bench(args) -> int:
    """``oppo bench NAME [ARGS...]``: run bench/NAME.py with ARGS (``oppo bench`` lists them)."""
    import subprocess
    d = _bench_dir()
    if d is None:
        print("oppo bench: the benchmarks live in the repository's bench/ folder, which this install does "
              "not have: clone the repository and install it with `pip install -e .`", file=sys.stderr)
        return 2
    benches = _benches(d)
    if not args.name:
        width = max(map(len, benches))
        for name, doc in benches.items():
            print(f"{name:<{width}}  {doc}")
        print("\nrun one: oppo bench NAME [ARGS...]   (NAME --help for its options; commands and results: "
              "bench/RESULTS.md)")
        return 0
    if args.name not in benches:
        print(f"oppo bench: no benchmark {args.name!r}; there are: {', '.join(benches)}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(d / f"{args.name}.py"), *args.bench_args])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="oppo", description="oppo-runtime: PPO with an overlapped pipeline")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="PPO training (no arguments: the embedded default task)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--overlap", choices=["none", "intra", "inter", "full"])
    t.add_argument("--steps", type=int, help="run.total_steps")
    t.add_argument("--out", help="run.out_dir")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.out_dir")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    sub.add_parser("doctor", help="torch, CUDA, GPU, extension, and the backend of every op")
    b = sub.add_parser("bench", help="run a benchmark of bench/ (no name: list them)")
    b.add_argument("name", nargs="?", help="e.g. decode_attention, intra_overlap, ppo_step")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    # overrides may stand between options ("--steps 3 run.seed=1 --overlap full"): argparse takes
    # one run of positionals only, so the later runs come back unknown and join the overrides
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.cmd != "train" or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO if args.cmd == "doctor" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .ppo.config import ConfigError
    try:
        return {"train": _train, "doctor": _doctor, "bench": _bench}[args.cmd](args)
    except ConfigError as e:
        print(f"oppo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
