"""The actor's rollout alone, on intra_overlap's workload (Qwen2.5-0.5B shape, random weights, B=64,
128-token prompts, lognormal told lengths, median ~200, capped at 2048), timed step by step and
grouped by batch size, through the engine API that every version since session 2 has
(``ActorEngine``, ``EngineConfig``, ``generate``), so that the same script can time an older
checkout (``bench/ab_rollout.sh REV`` runs it against REV and against this tree in one call):

    python bench/rollout_probe.py [--out PATH] [--reps 3] [--quick] [--device cpu]
                                  [--via rollout] [--extra-models 2] [--pool-mult 3] [--warmup short]

The last four make the probe's setting intra_overlap's ``alone`` mode one piece at a time (the
actor driven by a scorer-less ``Rollout``, the reward model and critic resident, a pool of 3x the
workload's pages, a 4-token warm-up after ``ActorEngine.warmup()``): where the two disagree, these
say which piece costs the time.

A warm-up generate of the same workload comes first (every decode graph of the shrinking batch
is captured before the clock in any version). Reported: wall of each timed generate, decode
steps, the engine's host seconds, and the mean step time per batch-size bucket (1, 2-4, 5-16,
17-48, 49-64): where a regression between versions sits.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

BUCKETS = ((1, 1), (2, 4), (5, 16), (17, 48), (49, 1 << 30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="median 40, cap 200 (smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 1-layer model of width 32 (a CPU check of the script)")
    ap.add_argument("--via", choices=("generate", "rollout"), default="generate",
                    help="drive the actor by ActorEngine.generate or by a Rollout without scorers (overlap off)")
    ap.add_argument("--extra-models", type=int, default=0, help="idle models of the same shape kept on the device")
    ap.add_argument("--pool-mult", type=int, default=1, help="pool pages: this many times the workload's")
    ap.add_argument("--warmup", choices=("full", "short"), default="full",
                    help="full: the timed workload once; short: ActorEngine.warmup() and 4 tokens per sequence")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import lognormal_lengths  # noqa: E402  (this tree's bench helpers and shapes)
    from models import qwen_config  # noqa: E402

    import oppo_runtime
    from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams
    from oppo_runtime.memory import KVGeometry, PagePool
    from oppo_runtime.models import ModelConfig, build_model

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.tiny:
        cfg = ModelConfig.from_dict(dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=512,
                                         max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    else:
        cfg = qwen_config("qwen2.5-0.5b")
    model = build_model(cfg, "causal_lm", seed=0, dtype=dtype, device=dev).eval().requires_grad_(False)
    B, plen = 64, 128
    lens = lognormal_lengths(B, 40 if args.quick else 200, 200 if args.quick else 2048)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (B, plen), generator=g).tolist()
    geo = KVGeometry(*model.kv_geometry(), dtype)
    pb = PagePool.page_bytes_for([geo], 16)
    extra = [build_model(cfg, "causal_lm", seed=9 + i, dtype=dtype, device=dev).eval().requires_grad_(False)
             for i in range(args.extra_models)]   # noqa: F841  (kept resident on purpose)
    pool = PagePool(args.pool_mult * sum(-(-(plen + n) // 16) + 1 for n in lens) + 256, pb, dev)
    eng = ActorEngine(model, pool, EngineConfig(max_num_seqs=B, chunk_size=16, seed=0, max_num_batched_tokens=16384,
                                                 max_model_len=4096))
    sp = SamplingParams(temperature=1.0, max_new_tokens=max(lens))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    per_bucket: dict[str, list[float]] = {f"{lo}-{hi if hi < 1 << 30 else B}": [] for lo, hi in BUCKETS}
    step = eng.step

    def timed_step():   # wall of one engine step, by the batch it ran (the running set before it)
        n = len(eng.scheduler.running)
        t = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t
        for (lo, hi), name in zip(BUCKETS, per_bucket):
            if lo <= n <= hi:
                per_bucket[name].append(dt)
        return out

    if args.via == "rollout":
        from oppo_runtime.engine.rollout import Rollout
        ro = Rollout(eng, [], overlap=False)

        def generate(prompts, sp, target_lens):
            ro.submit(prompts, sp, target_lens=target_lens)
            return [r.seq for r in ro.collect()]
    else:
        generate = eng.generate
    if args.warmup == "short":      # intra_overlap's alone mode: the graphs up front, then 4 tokens each
        eng.warmup()
        generate(prompts, sp, target_lens=[4] * B)
    else:
        generate(prompts, sp, target_lens=lens)          # warm-up: the same workload
    sync()
    walls, stats = [], []
    for rep in range(args.reps):
        for v in per_bucket.values():
            v.clear()
        before = dict(eng.stats)
        eng.step = timed_step
        t = time.perf_counter()
        out = generate(prompts, sp, target_lens=lens)
        sync()
        walls.append(time.perf_counter() - t)
        eng.step = step
        assert sum(len(s.output_ids) for s in out) == sum(lens)
        stats.append({k: eng.stats[k] - before.get(k, 0) for k in eng.stats})
        print(f"rep {rep}: {walls[-1]:.3f} s, " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in stats[-1].items()), flush=True)
    buckets = {k: {"steps": len(v), "mean_ms": 1e3 * statistics.fmean(v) if v else None,
                   "total_s": sum(v)} for k, v in per_bucket.items()}
    for k, b in buckets.items():
        if b["steps"]:
            print(f"  batch {k:>6}: {b['steps']:5d} steps, {b['mean_ms']:.3f} ms mean, {b['total_s']:.3f} s")
    res = {"package": str(Path(oppo_runtime.__file__).resolve().parent), "device": str(dev),
           "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
           "setting": {"via": args.via, "extra_models": args.extra_models, "pool_mult": args.pool_mult,
                       "warmup": args.warmup},
           "tokens": sum(lens), "max_len": max(lens), "walls_s": walls, "median_s": statistics.median(walls),
           "stats_last": stats[-1], "buckets_last": buckets}
    print(f"median {res['median_s']:.3f} s ({res['package']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
