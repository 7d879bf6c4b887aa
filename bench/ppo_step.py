"""Rollout stage of a PPO step under the four overlap modes, on a long-tailed workload.

Actor, reward model and critic of the Qwen2.5-0.5B shape (random weights, bf16), batch B=64,
prompts of 128 tokens, response lengths lognormal (the engine is told each length). Each mode
runs STEPS steps after a warm-up step: 'none'/'intra' generate and score exactly the B admitted
prompts; 'inter'/'full' keep B+Δ in flight and take the first B finished (the rest continue in
the next step, their actor KV recomputed as after a weight update). Training is not run: every
mode trains exactly B sequences per step, so the update costs the same in all of them and is
left out of the comparison (it is measured by `oppo train`, timing_s/train).

    python bench/ppo_step.py [--out bench/results/ppo_step_rollout.json]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, print_table, results_path, write_json  # noqa: E402
from models import qwen_model  # noqa: E402

from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams  # noqa: E402
from oppo_runtime.engine.rollout import Rollout  # noqa: E402
from oppo_runtime.engine.scorer import Scorer  # noqa: E402
from oppo_runtime.memory import KVGeometry, PagePool  # noqa: E402


def run_mode(models, mode, steps, B, delta, median, cap, chunk):
    actor, reward, critic = models
    g = KVGeometry(*actor.kv_geometry(), torch.bfloat16)
    pool = PagePool(3 * (B + delta) * (-(-(128 + cap) // 16) + 1), PagePool.page_bytes_for([g], 16), "cuda")
    eng = ActorEngine(actor, pool, EngineConfig(max_num_seqs=B + delta, chunk_size=chunk, seed=0,
                                                 max_num_batched_tokens=16384, max_model_len=128 + cap + 16))
    scorers = [Scorer("reward", reward, pool, "reward", max_model_len=128 + cap + 16),
               Scorer("critic", critic, pool, "critic", max_model_len=128 + cap + 16)]
    ro = Rollout(eng, scorers, overlap=mode in ("intra", "full"))
    gen = torch.Generator().manual_seed(0)
    inter = mode in ("inter", "full")
    times, deferred = [], []
    for step in range(steps + 1):
        want = B + (delta if inter else 0) - len(ro.in_flight)
        prompts = torch.randint(0, 151936, (want, 128), generator=gen).tolist()
        z = torch.randn(want, generator=gen)
        lens = [int(min(cap, max(1, round(math.exp(math.log(median) + float(x)))))) for x in z]
        ro.submit(prompts, SamplingParams(max_new_tokens=cap), target_lens=lens)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = ro.collect(B)
        torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t0)
            deferred.append(len(ro.in_flight))
        assert len(out) == B and all(r.error is None for r in out)
        eng.update_weights(eng.version + 1)
        eng.drop_kv()                      # deferred sequences recompute their actor KV
        scorers[1].invalidate()            # the critic changed
    ro.close()
    return {"mode": mode, "step_s_median": sorted(times)[len(times) // 2], "step_s_mean": sum(times) / len(times),
            "deferred_mean": sum(deferred) / len(deferred)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--median", type=int, default=200)
    ap.add_argument("--cap", type=int, default=1024)
    ap.add_argument("--delta", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()
    info = device_info()
    models = (qwen_model("qwen2.5-0.5b", seed=0), qwen_model("qwen2.5-0.5b", "score", seed=1),
              qwen_model("qwen2.5-0.5b", "score", seed=2))
    rows = []
    for mode in ("none", "intra", "inter", "full"):
        r = run_mode(models, mode, args.steps, 64, args.delta, args.median, args.cap, args.chunk)
        rows.append(r)
        print(r, flush=True)
    base = rows[0]["step_s_median"]
    for r in rows:
        r["speedup_vs_none"] = base / r["step_s_median"]
    print_table(rows, [("mode", "mode", "s"), ("step_s_median", "rollout s/step", ".3f"),
                       ("speedup_vs_none", "x none", ".2f"), ("deferred_mean", "deferred", ".1f")])
    summary = {"speedup_full_vs_none_rollout": rows[3]["speedup_vs_none"],
               "speedup_inter_vs_none_rollout": rows[2]["speedup_vs_none"],
               "workload": {"B": 64, "delta": args.delta, "median": args.median, "cap": args.cap, "chunk": args.chunk,
                            "steps": args.steps}}
    print("summary:", summary)
    write_json(results_path("ppo_step_rollout", args.out), {"info": info, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
