"""Engine throughput: generated tokens/s of ActorEngine vs transformers' generate, and the decode
step time over its memory-bandwidth floor (weights + KV read per step, over the copy bandwidth
measured in the same run). Random weights; every sequence decodes exactly NEW tokens.

    python bench/engine.py [--out bench/results/engine.json] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_info, print_table, results_path, write_json  # noqa: E402
from models import qwen_model, weight_bytes  # noqa: E402

from oppo_runtime import ops  # noqa: E402
from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams  # noqa: E402
from oppo_runtime.memory import KVGeometry, PagePool  # noqa: E402


def ours(model, prompts, new, B):
    g = KVGeometry(*model.kv_geometry(), torch.bfloat16)
    pb = PagePool.page_bytes_for([g], 16)
    ctx = len(prompts[0]) + new
    pool = PagePool(B * (-(-ctx // 16)) + 64, pb, "cuda")
    eng = ActorEngine(model, pool, EngineConfig(max_num_seqs=B, max_num_batched_tokens=16384, seed=0,
                                                 max_model_len=ctx + 16))
    sp = SamplingParams(temperature=1.0, max_new_tokens=new)
    eng.generate(prompts, sp, target_lens=[8] * B)           # warm-up: graph capture for batch B
    eng.stats.update(decode_steps=0, prefill_steps=0, generated_tokens=0, host_s=0.0)
    decode_s = [0.0]
    eng.step_hooks.append(lambda kind, t0, t1: decode_s.__setitem__(0, decode_s[0] + (t1 - t0)) if kind == "decode" else None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    seqs = eng.generate(prompts, sp, target_lens=[new] * B)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert all(len(s.output_ids) == new for s in seqs)
    steps = eng.stats["decode_steps"]
    return {"ours_s": wall, "ours_tok_s": B * new / wall, "decode_steps": steps,
            "step_ms": 1e3 * decode_s[0] / steps, "host_ms": 1e3 * eng.stats["host_s"] / (steps + eng.stats["prefill_steps"]),
            "graphs": eng.runner.use_graphs}


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
    args = ap.parse_args()
    info = device_info()
    bw = copy_bandwidth()
    new, plen = (64, 128) if args.quick else (512, 128)
    rows = []
    for shape in ("qwen2.5-0.5b", "qwen2.5-1.5b"):
        model = qwen_model(shape)
        wb = weight_bytes(model)
        L, Hkv, D = model.kv_geometry()
        kv_tok = 2 * L * Hkv * D * 2
        for B in (64, 256):
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, model.config.vocab_size, (B, plen), generator=g).tolist()
            r = {"shape": shape, "batch": B, "prompt": plen, "new": new}
            r.update(ours(model, prompts, new, B))
            r.update(hf_generate(model, prompts, new))
            avg_ctx = plen + new / 2
            floor_ms = 1e3 * (wb + B * avg_ctx * kv_tok) / bw
            r.update(floor_ms=floor_ms, step_over_floor=r["step_ms"] / floor_ms,
                     speedup_vs_hf=r["ours_tok_s"] / r["hf_tok_s"], host_frac=r["host_ms"] / r["step_ms"])
            rows.append(r)
            print(f"{shape} B={B}: ours {r['ours_tok_s']:.0f} tok/s, hf {r['hf_tok_s']:.0f} tok/s, "
                  f"step {r['step_ms']:.2f} ms (floor {floor_ms:.2f}), host {r['host_ms']:.2f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    print_table(rows, [("shape", "shape", "s"), ("batch", "B", "d"), ("ours_tok_s", "ours tok/s", ".0f"),
                       ("hf_tok_s", "HF tok/s", ".0f"), ("speedup_vs_hf", "x HF", ".1f"),
                       ("step_ms", "step ms", ".2f"), ("floor_ms", "floor ms", ".2f"),
                       ("step_over_floor", "step/floor", ".2f"), ("host_ms", "host ms", ".2f"),
                       ("host_frac", "host/step", ".2f")])
    summary = {
        "speedup_vs_hf_generate": min(r["speedup_vs_hf"] for r in rows),
        "step_over_floor": next(r["step_over_floor"] for r in rows if r["shape"] == "qwen2.5-0.5b" and r["batch"] == 256),
        "copy_bandwidth_Bps": bw,
        "backends": ops.backends(),
    }
    print("summary:", summary)
    write_json(results_path("engine", args.out), {"info": info, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
