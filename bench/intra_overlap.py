"""Intra-step overlap on one GPU: rollout + scoring time with overlap on vs off, in one run.

Actor, reward model and critic of the Qwen2.5-0.5B shape (random weights, bf16), batch 64,
prompts of 128 tokens, response lengths lognormal (median ~200, capped at 2048; the engine is told
each length). Times from the first decode to the last score:
    alone : the actor only (no scorers)          -> the floor overlap can reach
    off   : generate all, then score all         (sequential)
    on    : scorers prefill chunks on their own stream while the actor decodes
hidden_fraction = (off - on) / (off - alone): the share of scoring time hidden under decode (None when
sequential scoring costs under 2% of alone: then it is noise); hidden_fraction_timeline = the share
of the scorers' busy seconds (CUDA events on their streams) that ran while the actor was busy.
Modes run interleaved over --reps rounds; each mode's time is its median.

--scorer-graphs (issue 4): "env" (default: Scorer's default, env OPPO_SCORER_GRAPHS), "off", "on",
or "both": every scorer mode twice in the same run, eager and with the chunk prefill in CUDA graphs
(modes "... graphs"); the summary stays the eager family's, ``summary.graphs`` holds the graph
family's. A graph mode warms up on the timed workload itself (its buckets are captured before the
clock starts); ``captures_timed`` counts captures that still fell inside the timed run.

--scorer-device cuda:1 (placement, issue 4): the reward model and critic on a second GPU with a page
pool of their own; their prefill runs beside the actor's decode instead of sharing its GPU.

    python bench/intra_overlap.py [--out bench/results/intra_overlap.json] [--quick] [--scorer-graphs both]
    python bench/intra_overlap.py --scorer-device cuda:1 --out bench/results/intra_overlap_2gpu.json
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, lognormal_lengths, print_table, results_path, write_json  # noqa: E402
from models import qwen_model  # noqa: E402

from oppo_runtime import ops  # noqa: E402
from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams  # noqa: E402
from oppo_runtime.engine.rollout import Rollout  # noqa: E402
from oppo_runtime.engine.scorer import Scorer  # noqa: E402
from oppo_runtime.engine.timeline import Timeline  # noqa: E402
from oppo_runtime.memory import PagePool  # noqa: E402


def sync(scorer_device):
    torch.cuda.synchronize()
    if scorer_device != torch.device("cuda", torch.cuda.current_device()):
        torch.cuda.synchronize(scorer_device)


def run(models, prompts, lens, mode, chunk, timeline=None, graphs=None):
    actor, reward, critic = models
    gc.collect()         # the last run's rollout (a reference cycle through its engine) and its memory
    need = sum(-(-(len(p) + n) // 16) + 1 for p, n in zip(prompts, lens))
    sdev = next(reward.parameters()).device
    apart = sdev != next(actor.parameters()).device
    pool = PagePool.for_models([actor], "cuda", 16, (1 if apart else 3) * need + 256)
    spool = PagePool.for_models([reward, critic], sdev, 16, 2 * need + 256) if apart else pool
    eng = ActorEngine(actor, pool, EngineConfig(max_num_seqs=len(prompts), chunk_size=chunk, seed=0,
                                                 max_num_batched_tokens=16384, max_model_len=4096))
    eng.warmup()         # every decode graph before the clock (captured lazily, they fell in the timed run)
    scorers = [] if mode == "alone" else [
        Scorer("reward", reward, spool, "reward", max_model_len=4096, graphs=graphs),
        Scorer("critic", critic, spool, "critic", max_model_len=4096, graphs=graphs)]
    ro = Rollout(eng, scorers, overlap=(mode == "on"), timeline=timeline)
    sp = SamplingParams(temperature=1.0, max_new_tokens=max(lens))
    use_graphs = any(s.graphs for s in scorers)
    # warm-up: decode graphs, allocator; with scorer graphs, the timed workload itself (its
    # prefill buckets are captured here, not on the clock)
    ro.submit(prompts, sp, target_lens=lens if use_graphs else [4] * len(prompts))
    ro.collect()
    sync(sdev)
    captures = sum(s.runner.prefill_stats["captures"] for s in scorers)
    if timeline is not None:
        timeline.clear()
        timeline.mark_reference()
        if apart:
            timeline.mark_reference(torch.cuda.current_stream(sdev))
    ro.submit(prompts, sp, target_lens=lens)
    t0 = time.perf_counter()
    out = ro.collect()
    sync(sdev)
    wall = time.perf_counter() - t0
    assert all(r.error is None for r in out)
    captures = sum(s.runner.prefill_stats["captures"] for s in scorers) - captures
    ro.close()           # the scorer thread holds the rollout (its pool, its graphs) until closed
    return wall, out, captures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--chunks", default="64,256,1024", help="chunk sizes C tried with overlap on")
    ap.add_argument("--reps", type=int, default=3, help="rounds over the modes (median per mode)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the 'on' run")
    ap.add_argument("--scorer-graphs", choices=("env", "off", "on", "both"), default="env",
                    help="scorers' chunk prefill in CUDA graphs: env (OPPO_SCORER_GRAPHS), off, on, or both (A/B)")
    ap.add_argument("--scorer-device", default="cuda",
                    help="where the reward model and critic run: cuda (beside the actor, one pool) or cuda:N")
    args = ap.parse_args()
    info = device_info()
    B, plen = 64, 128
    lens = lognormal_lengths(B, 200 if not args.quick else 40, 2048 if not args.quick else 200)
    sdev = torch.device(args.scorer_device)
    if sdev.index is None:
        sdev = torch.device("cuda", torch.cuda.current_device())
    if sdev.index >= torch.cuda.device_count():
        sys.exit(f"--scorer-device {args.scorer_device}: this machine has {torch.cuda.device_count()} GPU(s)")
    models = (qwen_model("qwen2.5-0.5b", seed=0), qwen_model("qwen2.5-0.5b", "score", seed=1, device=sdev),
              qwen_model("qwen2.5-0.5b", "score", seed=2, device=sdev))
    apart = sdev.index != torch.cuda.current_device()
    tag = f"_scorers_on_{sdev.type}{sdev.index}" if apart else ""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 151936, (B, plen), generator=g).tolist()
    rows = []
    res = {}
    timelines = {}
    # a suffix per scorer-graph family: "" = as --scorer-graphs says (env/off/on), " graphs" = on
    families = {"env": {"": None}, "off": {"": False}, "on": {"": True},
                "both": {"": False, " graphs": True}}[args.scorer_graphs]
    modes = ["alone"] + [f"off{f}" for f in families] + [f"on C={c}{f}" for f in families
                                                         for c in args.chunks.split(",")]
    walls: dict[str, list[float]] = {m: [] for m in modes}
    captures_timed: dict[str, list[int]] = {m: [] for m in modes}
    # modes interleaved over --reps rounds (GPU clocks and allocator state drift within a run);
    # each mode's time is its median over the rounds
    for rep in range(args.reps):
        for mode in modes:
            fam = " graphs" if mode.endswith(" graphs") else ""
            base = mode[:-len(fam)] if fam else mode
            chunk = int(base.split("=")[1]) if base.startswith("on") else 16
            tl = Timeline(step=0) if base.startswith("on") and rep == args.reps - 1 else None
            wall, out, caps = run(models, prompts, lens, "on" if base.startswith("on") else base, chunk, timeline=tl,
                                  graphs=families.get(fam))
            walls[mode].append(wall)
            captures_timed[mode].append(caps)
            res[mode] = (statistics.median(walls[mode]), out)
            if tl is not None:
                timelines[mode] = tl.resolve()
            print(f"round {rep} {mode}: {wall:.3f} s" + (f" ({caps} graph captures timed)" if caps else ""),
                  flush=True)
    for mode in modes:
        rows.append({"mode": mode, "seconds": res[mode][0], "runs": " ".join(f"{w:.3f}" for w in walls[mode]),
                     "captures_timed": " ".join(str(c) for c in captures_timed[mode])})

    def family_summary(fam):
        on_modes = [m for m in res if m.startswith("on") and m.endswith(fam) and (fam or not m.endswith(" graphs"))]
        best = min(on_modes, key=lambda m: res[m][0])
        on, off = res[best][1], res[f"off{fam}"][1]
        alone, t_off, t_on = res["alone"][0], res[f"off{fam}"][0], res[best][0]
        scoring = t_off - alone      # the scorers' time on the critical path when not overlapped
        return best, {
            # undefined when sequential scoring costs (within noise) nothing over the rollout alone
            "hidden_fraction": (t_off - t_on) / scoring if scoring > 0.02 * alone else None,
            # from the timeline of the best "on" run: the scorers' busy seconds that ran under the
            # actor's (their share), and the seconds a scorer ran while the actor did not
            "hidden_fraction_timeline": timelines[best].hidden_fraction() if best in timelines else None,
            "exposed_score_s_timeline": timelines[best].exposed_s() if best in timelines else None,
            "scoring_s": scoring,
            "speedup_on_vs_off": t_off / t_on,
            "on_over_alone": t_on / alone,
            # exactness: the same tokens, and scores within bf16 noise
            "same_tokens": all(a.seq.output_ids == b.seq.output_ids for a, b in zip(on, off)),
            "max_rel_score_diff": max(abs(a.score - b.score) / max(1e-6, abs(b.score)) for a, b in zip(on, off)),
            "best_chunk": best,
        }

    best, summary = family_summary("")
    tl = timelines[best]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(models, prompts, lens, "on", int(best.split("=")[1].split()[0]), graphs=families[""])
        ka = prof.key_averages()
        print(ka.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    out_dir = Path(args.out).parent if args.out else Path(__file__).resolve().parent / "results"
    where = f", scorers on {sdev}" if apart else ""
    tl.to_png(out_dir / f"intra_overlap{tag}_timeline.png",
              title=f"intra-step overlap ({best}), Qwen2.5-0.5B x3, B=64{where}")
    tl.to_chrome_trace(out_dir / f"intra_overlap{tag}_timeline.trace.json")    # for Perfetto: every span
    summary.update({
        "seconds": {m: res[m][0] for m in res},
        "lengths": {"median": sorted(lens)[B // 2], "max": max(lens), "sum": sum(lens)},
        "scorer_device": str(sdev) if apart else "beside the actor",
        "backends": ops.backends(),
        "scorer_graphs": args.scorer_graphs if args.scorer_graphs != "env" else
        ("off" if os.environ.get("OPPO_SCORER_GRAPHS", "").strip() == "0" else "on"),
    })
    if " graphs" in families:
        gbest, gsum = family_summary(" graphs")
        gsum["on_graphs_vs_on_eager"] = res[best][0] / res[gbest][0]       # > 1: graphs faster
        gsum["off_graphs_vs_off_eager"] = res["off"][0] / res["off graphs"][0]
        summary["graphs"] = gsum
        timelines[gbest].to_png(out_dir / f"intra_overlap{tag}_graphs_timeline.png",
                                title=f"intra-step overlap ({gbest}), Qwen2.5-0.5B x3, B=64{where}")
    print_table(rows, [("mode", "mode", "s"), ("seconds", "median s", ".3f"), ("runs", "runs", "s"),
                       ("captures_timed", "captures timed", "s")])
    print("summary:", summary)
    write_json(results_path("intra_overlap", args.out), {"info": info, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
