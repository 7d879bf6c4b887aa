"""Engine throughput: generated tokens/s of ActorEngine vs transformers' generate, and the decode
step time over its memory-bandwidth floor (weights + KV read per step, over the copy bandwidth
measured in the same run). Random weights; every sequence decodes exactly NEW tokens.

    python bench/engine.py [--out bench/results/engine.json] [--quick] [--shapes qwen2.5-0.5b]
                           [--batches 1,8,64,256] [--kernel-profile] [--host-profile]

--batches 1,8: the small batches of a long-tailed rollout's tail (HF generate only from
--hf-min-batch up); --kernel-profile: the device's step kernel by kernel, per shape and batch. --gemm-fusion: also
time the decode layer in 5 launches (OPPO_DECODE_GEMM_FUSION=1: add+RMSNorm as the prologue of the
QKV and gate_up GEMMs, rotary + K/V append and silu*mul as their epilogues; gf_* columns, and its
kernel profile beside the unfused one). --decode-env NAME:VAR=V[,VAR=V] (repeatable): one more timed
generate with the decode kernels' switches set (e.g. pdl:OPPO_DECODE_PDL=1), columns NAME_*.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_bandwidth, device_info, env_var, events_ms, print_table, results_path, stamp_stats,  # noqa: E402
                    write_json)
from models import qwen_model, weight_bytes  # noqa: E402

from oppo_runtime import ops  # noqa: E402
from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams  # noqa: E402
from oppo_runtime.memory import KVGeometry, PagePool  # noqa: E402


def gpu_only_ms(eng, B, iters=20, rounds=5):
    """Device time of one decode step alone: the captured graph for batch B replayed back to back
    with the LM head and the sampler, no host work in between; the median over ``rounds`` rounds of
    ``iters`` replays (one round read 2.23 and 2.37 ms for two identical engines in session 39).
    Replays repeat the step in flight (same inputs: the same K/V rewritten to the same slots), so
    the run goes on unchanged."""
    r = eng.runner
    bs = next(s for s in r.graph_batch_sizes if s >= B)
    graph, st = r.graphs[bs]
    dev = st["input_ids"].device
    temp = torch.ones(B, device=dev)
    top_k = torch.zeros(B, dtype=torch.long, device=dev)
    top_p = torch.ones(B, device=dev)
    keys = torch.arange(B, device=dev)
    pos = torch.full((B,), 300, dtype=torch.long, device=dev)

    def one():
        graph.replay()
        if not eng.graph_sampling:       # (with graph sampling the head is inside the graph)
            logits = eng.model.compute_logits(st["hidden"][:B])
            ops.sample_tokens(logits, temp, top_k, top_p, 0, keys, pos)

    one()
    return statistics.median(events_ms(one, iters) / iters for _ in range(rounds))


def kernel_profile(eng, B, path: str, iters=10) -> dict:
    """The device's decode step kernel by kernel: `gpu_only_ms`'s step (graph replay, LM head,
    sampler) under torch.profiler (CUDA activity; kernels inside graph replays are recorded one by
    one). Writes a table per kernel name to `path`; returns kernels per step and their summed
    time per step (against the step's wall time on the device, the difference is the gaps
    between kernels)."""
    from torch.profiler import ProfilerActivity, profile
    r = eng.runner
    bs = next(s for s in r.graph_batch_sizes if s >= B)
    graph, st = r.graphs[bs]
    dev = st["input_ids"].device
    args = (torch.ones(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev), torch.ones(B, device=dev), 0,
            torch.arange(B, device=dev), torch.full((B,), 300, dtype=torch.long, device=dev))

    def one():
        graph.replay()
        if not eng.graph_sampling:
            ops.sample_tokens(eng.model.compute_logits(st["hidden"][:B]), *args)

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            one()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    dev_us = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)  # noqa: E731
    kern = [e for e in ka if dev_us(e) > 0]
    total_us = sum(dev_us(e) for e in kern) / iters
    count = sum(e.count for e in kern) / iters
    rows = sorted(kern, key=dev_us, reverse=True)
    lines = [f"decode step kernels, B={B} (graph of batch {bs}) + LM head + sampler, {iters} steps profiled: "
             f"{count:.0f} kernels per step, {total_us:.1f} us of kernel time per step", "",
             f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel"]
    for e in rows:
        lines.append(f"{dev_us(e) / iters:9.1f} {e.count / iters:10.1f} {dev_us(e) / e.count:8.2f}  {e.key[:150]}")
    # The CTAs of the step's last decode attention call as they run inside the engine's graph (the
    # stamps' constant is read at each launch: a replay inside the block stamps, each layer's call
    # overwriting the one before): set beside bench/decode_stamps.py's loop of the same shape.
    stamped = {}
    if ops.backends().get("paged_decode_attention") == "cuda":
        from oppo_runtime.ops.attention import decode_cta_stamps
        with decode_cta_stamps(B * 512, dev) as stamps:    # rows: B x kv heads x chunks x splits, with room
            one()
            torch.cuda.synchronize()
            host = stamps.cpu()
        if bool((host[:, 1] > 0).any()):
            stamped = stamp_stats(host, torch.cuda.get_device_properties(dev).multi_processor_count, clock_tag=True)
            # the contexts that call read (the graph's static buffer as the generate left it), to set
            # the stamps beside decode_stamps.py's loop, whose sequences all have one length
            ctx = st["context_lens"][:B].float().cpu()
            stamped.update(ctx_min=int(ctx.min()), ctx_median=float(ctx.median()), ctx_mean=float(ctx.mean()),
                           ctx_max=int(ctx.max()), kv_tokens=int(ctx.sum()))
            lines += ["", "the step's last decode attention call, CTA stamps inside the graph: " +
                      ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stamped.items())]
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"  kernel profile B={B}: {count:.0f} kernels, {total_us:.0f} us per step -> {path}", flush=True)
    if stamped:
        print(f"  its last decode attention call: span {stamped['span_us']:.1f} us, {stamped['ctas']} CTAs, CTA us "
              f"{stamped['cta_us_p10']:.1f}/{stamped['cta_us_median']:.1f}/{stamped['cta_us_max']:.1f}, SM idle end "
              f"{stamped['sm_idle_fraction']:.3f}, SM clock {stamped.get('sm_mhz_median', float('nan')):.0f} MHz, "
              f"contexts {stamped['ctx_min']}/{stamped['ctx_median']:.0f}/{stamped['ctx_max']} (mean "
              f"{stamped['ctx_mean']:.0f})", flush=True)
    return {"kernels_per_step": count, "kernel_us_per_step": total_us, "decode_attention_stamps": stamped}


def ours(model, prompts, new, B, async_decode=True, host_profile: str | None = None,
         kernel_profile_path: str | None = None, graph_sampling: bool = False, gemm_fusion: bool = False,
         env: dict[str, str] | None = None, max_partition: int | None = None):
    """One timed generate (a fresh engine: its decode graphs are captured in its warm-up), with
    OPPO_DECODE_GEMM_FUSION and the variables ``env`` set for it (the launchers read them when the
    graphs are captured); ``max_partition``: EngineConfig.decode_max_partition (None: its default)."""
    with contextlib.ExitStack() as stack:
        for k, v in {"OPPO_DECODE_GEMM_FUSION": "1" if gemm_fusion else "0", **(env or {})}.items():
            stack.enter_context(env_var(k, v))
        return _ours(model, prompts, new, B, async_decode, host_profile, kernel_profile_path, graph_sampling,
                     max_partition)


def parse_decode_env(specs: list[str]) -> dict[str, dict[str, str]]:
    """--decode-env pdl:OPPO_DECODE_PDL=1 --decode-env l2:OPPO_DECODE_PREFETCH=1,OPPO_DECODE_PLAN=v6 ->
    {"pdl": {"OPPO_DECODE_PDL": "1"}, "l2": {...}}: one more timed generate per name. (Repeated
    rather than one string with a separator: gpu_check.sh passes ARGS_engine through eval.)"""
    out = {}
    for part in (p.strip() for p in specs if p.strip()):
        name, _, assigns = part.partition(":")
        kv = dict(a.split("=", 1) for a in assigns.split(",") if a.strip())
        assert name and kv and all(k.startswith("OPPO_") for k in kv), f"--decode-env: bad variant {part!r}"
        out[name] = kv
    return out


def _ours(model, prompts, new, B, async_decode, host_profile, kernel_profile_path, graph_sampling,
          max_partition=None):
    g = KVGeometry(*model.kv_geometry(), torch.bfloat16)
    pb = PagePool.page_bytes_for([g], 16)
    ctx = len(prompts[0]) + new
    pool = PagePool(B * (-(-ctx // 16)) + 64, pb, "cuda")
    cap = {} if max_partition is None else {"decode_max_partition": max_partition}
    eng = ActorEngine(model, pool, EngineConfig(max_num_seqs=B, max_num_batched_tokens=16384, seed=0,
                                                 max_model_len=ctx + 16, async_decode=async_decode,
                                                 graph_sampling=graph_sampling, **cap))
    sp = SamplingParams(temperature=1.0, max_new_tokens=new)
    eng.generate(prompts, sp, target_lens=[8] * B)           # warm-up: graph capture for batch B
    eng.reset_stats()
    acc = {"first_decode": None, "probe_s": 0.0, "gpu_ms": None}

    def hook(kind, t0, t1):
        if kind != "decode":
            return
        if acc["first_decode"] is None:
            acc["first_decode"] = t0
        # at the mean context (prompt + new/2), time the same step on the device alone
        if acc["gpu_ms"] is None and eng.stats["decode_steps"] == new // 2:
            tp = time.perf_counter()
            acc["gpu_ms"] = gpu_only_ms(eng, B) if eng.runner.graphs else float("nan")
            if kernel_profile_path and eng.runner.graphs:
                acc["kernels"] = kernel_profile(eng, B, kernel_profile_path)
            acc["probe_s"] += time.perf_counter() - tp

    eng.step_hooks.append(hook)
    prof = None
    if host_profile:                 # where the host's time per step goes (Python functions)
        import cProfile
        prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    seqs = eng.generate(prompts, sp, target_lens=[new] * B)
    if prof is not None:
        prof.disable()
    torch.cuda.synchronize()
    t_end = time.perf_counter()
    if prof is not None:
        import io
        import pstats
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        buf.write(f"cProfile of one generate: B={B}, {new} new tokens, {eng.stats['decode_steps']} decode steps "
                  f"(times include cProfile's own overhead; compare functions, not totals)\n")
        st.sort_stats("tottime").print_stats(35)
        st.sort_stats("cumulative").print_stats(35)
        Path(host_profile).write_text(buf.getvalue())
        print(f"  host profile -> {host_profile}")
    wall = t_end - t0 - acc["probe_s"]
    decode_wall = t_end - acc["first_decode"] - acc["probe_s"]
    assert all(len(s.output_ids) == new for s in seqs)
    steps = eng.stats["decode_steps"]
    # decode step time = wall clock of the decode phase (first decode step's start to the device's
    # end) over the steps: every host and device cost of the loop is in it
    return {"ours_s": wall, "ours_tok_s": B * new / wall, "decode_steps": steps,
            "step_ms": 1e3 * decode_wall / steps, "gpu_ms": acc["gpu_ms"],
            "host_ms": 1e3 * eng.stats["host_s"] / (steps + eng.stats["prefill_steps"]),
            # lagged decode steps made from the previous step's arrays vs by walking the sequences
            "lagged_from_rows": dict(eng.scheduler.rows_stats),
            "graphs": eng.runner.use_graphs, **acc.get("kernels", {})}


def hf_generate(model, prompts, new):
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=model.config.vocab_size, hidden_size=model.config.hidden_size,
                                   intermediate_size=model.config.intermediate_size,
                                   num_hidden_layers=model.config.num_hidden_layers,
                                   num_attention_heads=model.config.num_attention_heads,
                                   num_key_value_heads=model.config.num_key_value_heads,
                                   max_position_embeddings=model.config.max_position_embeddings,
                                   rope_theta=1000000.0, tie_word_embeddings=True)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(cfg)
    hf = hf.to_empty(device="cuda").to(torch.bfloat16)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    hf.eval()
    ids = torch.tensor(prompts, device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, eos_token_id=None, pad_token_id=0)
    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new
    del hf
    torch.cuda.empty_cache()
    return {"hf_s": wall, "hf_tok_s": len(prompts) * new / wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="fewer new tokens (smoke run)")
    ap.add_argument("--host-profile", action="store_true",
                    help="one more (untimed) generate of the 0.5B shape at B=64 under cProfile, to a .txt beside --out")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="the device's decode step kernel by kernel (torch.profiler), per shape and batch, to "
                         "engine_kernels_<shape>_B<B>.txt beside --out")
    ap.add_argument("--graph-sampling", action="store_true",
                    help="also time the engine with the LM head and sampler inside the decode graphs (gs_* columns)")
    ap.add_argument("--gemm-fusion", action="store_true",
                    help="also time the decode layer in 5 launches (OPPO_DECODE_GEMM_FUSION=1; gf_* columns)")
    ap.add_argument("--decode-env", action="append", default=[],
                    help="an A/B variant of the decode kernels' switches, one more timed generate (columns "
                         "<name>_step_ms, <name>_gpu_ms, ...), e.g. pdl:OPPO_DECODE_PDL=1; repeat for more")
    ap.add_argument("--caps", default="",
                    help="comma-separated EngineConfig.decode_max_partition values (0: no cap), one more timed "
                         "generate each (columns cap<N>_step_ms, ...; the default cap is EngineConfig's)")
    ap.add_argument("--batches", default="64,256",
                    help="comma-separated batch sizes (1 and 8: the decode tail of a long-tailed rollout)")
    ap.add_argument("--hf-min-batch", type=int, default=64, help="time HF generate only from this batch up")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b", help="comma-separated model shapes")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    decode_env = parse_decode_env(args.decode_env)
    info = device_info()
    bw = copy_bandwidth()
    new, plen = (64, 128) if args.quick else (512, 128)
    rows = []
    for shape in args.shapes.split(","):
        model = qwen_model(shape)
        wb = weight_bytes(model)
        L, Hkv, D = model.kv_geometry()
        kv_tok = 2 * L * Hkv * D * 2
        for B in batches:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, model.config.vocab_size, (B, plen), generator=g).tolist()
            r = {"shape": shape, "batch": B, "prompt": plen, "new": new}
            kp = (str(results_path("engine", args.out).parent / f"engine_kernels_{shape}_B{B}.txt")
                  if args.kernel_profile else None)
            r.update(ours(model, prompts, new, B, kernel_profile_path=kp))
            if "kernel_us_per_step" in r:   # kernels' own time vs the device step: the rest is gaps
                r["kernel_gap_frac"] = max(0.0, 1 - r["kernel_us_per_step"] / (1e3 * r["gpu_ms"]))
            def variant(prefix, **kw):
                """One more timed generate with the switches ``kw``; its columns ``<prefix>_*``, or
                ``<prefix>_error`` (the A/B switches' first runs on a GPU must not lose the bench)."""
                try:
                    v = ours(model, prompts, new, B, **kw)
                except Exception as e:  # noqa: BLE001
                    import traceback
                    traceback.print_exc()
                    r[f"{prefix}_error"] = f"{type(e).__name__}: {e}"[:300]
                    return None
                r.update({f"{prefix}_step_ms": v["step_ms"], f"{prefix}_host_ms": v["host_ms"],
                          f"{prefix}_gpu_ms": v["gpu_ms"], f"{prefix}_tok_s": v["ours_tok_s"],
                          f"{prefix}_kernel_us_per_step": v.get("kernel_us_per_step")})
                return v

            for name, env in decode_env.items():   # A/B: the decode kernels' switches (read at capture)
                v = variant(name, env=env, kernel_profile_path=kp and kp.replace(".txt", f"_{name}.txt"))
                if v is not None:
                    r[f"{name}_gpu_speedup"] = r["gpu_ms"] / v["gpu_ms"]
            for c in (int(x) for x in args.caps.split(",") if x.strip()):   # A/B: the decode split cap
                v = variant(f"cap{c}", max_partition=c, kernel_profile_path=kp and kp.replace(".txt", f"_cap{c}.txt"))
                if v is not None:
                    r[f"cap{c}_gpu_speedup"] = r["gpu_ms"] / v["gpu_ms"]
            if args.graph_sampling:          # A/B: the LM head and sampler inside the decode graph
                variant("gs", graph_sampling=True)
            if args.gemm_fusion:             # A/B: norm+QKV+rotary and norm+gate_up+silu as one kernel each
                gf = variant("gf", gemm_fusion=True, kernel_profile_path=kp and kp.replace(".txt", "_gemm_fused.txt"))
                if gf is not None:
                    r.update(gf_kernels_per_step=gf.get("kernels_per_step"), gf_gpu_speedup=r["gpu_ms"] / gf["gpu_ms"])
            if args.gemm_fusion and args.graph_sampling:   # both: what would become the default
                both = variant("gsgf", graph_sampling=True, gemm_fusion=True)
                if both is not None:
                    r["gsgf_step_speedup"] = r["step_ms"] / both["step_ms"]
            sync = ours(model, prompts, new, B, async_decode=False)
            r.update(sync_step_ms=sync["step_ms"], sync_host_ms=sync["host_ms"], sync_tok_s=sync["ours_tok_s"])
            if B >= args.hf_min_batch:       # HF at batch 1-8 would take most of a call
                r.update(hf_generate(model, prompts, new))
            avg_ctx = plen + new / 2
            floor_ms = 1e3 * (wb + B * avg_ctx * kv_tok) / bw
            r.update(floor_ms=floor_ms, step_over_floor=r["step_ms"] / floor_ms,
                     speedup_vs_hf=r["ours_tok_s"] / r["hf_tok_s"] if "hf_tok_s" in r else None,
                     # host work not hidden under the device: the step's wall time over its device time
                     host_exposed_frac=max(0.0, 1 - r["gpu_ms"] / r["step_ms"]),
                     gpu_over_floor=r["gpu_ms"] / floor_ms)
            rows.append(r)
            if args.host_profile and shape == "qwen2.5-0.5b" and B == 64:
                out = results_path("engine", args.out)
                ours(model, prompts, new, B, host_profile=str(out.parent / "engine_host_profile.txt"))
            print(f"{shape} B={B}: ours {r['ours_tok_s']:.0f} tok/s, hf {r.get('hf_tok_s', float('nan')):.0f} tok/s, "
                  f"step {r['step_ms']:.2f} ms (sync {r['sync_step_ms']:.2f}, device alone {r['gpu_ms']:.2f}, "
                  f"floor {floor_ms:.2f}), host {r['host_ms']:.2f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    print_table(rows, [("shape", "shape", "s"), ("batch", "B", "d"), ("ours_tok_s", "ours tok/s", ".0f"),
                       ("hf_tok_s", "HF tok/s", ".0f"), ("speedup_vs_hf", "x HF", ".1f"),
                       ("step_ms", "step ms", ".2f"), ("floor_ms", "floor ms", ".2f"),
                       ("step_over_floor", "step/floor", ".2f"), ("gpu_ms", "device ms", ".2f"),
                       ("gpu_over_floor", "device/floor", ".2f"), ("sync_step_ms", "sync step ms", ".2f"),
                       ("host_ms", "host ms", ".2f"), ("host_exposed_frac", "host exposed", ".2f"),
                       ("kernels_per_step", "kernels/step", ".0f"), ("kernel_gap_frac", "gaps", ".2f"),
                       ("gs_step_ms", "graph-sampling step ms", ".2f"), ("gs_host_ms", "its host ms", ".2f"),
                       ("gf_gpu_ms", "gemm-fused device ms", ".2f"), ("gf_gpu_speedup", "x unfused device", ".2f"),
                       ("gf_step_ms", "gemm-fused step ms", ".2f"), ("gf_kernels_per_step", "its kernels", ".0f"),
                       ("gsgf_step_ms", "both step ms", ".2f"), ("gsgf_step_speedup", "x default step", ".2f"),
                       *[c for n in [*decode_env, *(f"cap{int(x)}" for x in args.caps.split(",") if x.strip())]
                         for c in ((f"{n}_step_ms", f"{n} step ms", ".2f"),
                                   (f"{n}_gpu_ms", f"{n} device ms", ".2f"),
                                   (f"{n}_gpu_speedup", f"{n} x device", ".2f"))]])
    summary = {
        "speedup_vs_hf_generate": min((r["speedup_vs_hf"] for r in rows if r["speedup_vs_hf"] is not None),
                                      default=None),
        "step_over_floor": next((r["step_over_floor"] for r in rows
                                 if r["shape"] == "qwen2.5-0.5b" and r["batch"] == 256), None),
        "host_exposed_frac": next((r["host_exposed_frac"] for r in rows
                                   if r["shape"] == "qwen2.5-0.5b" and r["batch"] == 256), None),
        "both_step_over_floor": next((r["gsgf_step_ms"] / r["floor_ms"] for r in rows
                                      if r["shape"] == "qwen2.5-0.5b" and r["batch"] == 256 and "gsgf_step_ms" in r),
                                     None),
        "gemm_fused_device_over_floor": next((r["gf_gpu_ms"] / r["floor_ms"] for r in rows
                                              if r["shape"] == "qwen2.5-0.5b" and r["batch"] == 256
                                              and "gf_gpu_ms" in r), None),
        "copy_bandwidth_Bps": bw,
        "backends": ops.backends(),
    }
    print("summary:", summary)
    write_json(results_path("engine", args.out), {"info": info, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
