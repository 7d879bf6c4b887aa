"""The decode layer's norm+projection kernels, fused vs unfused, over the weights' bandwidth floor.

    python bench/decode_layer.py [--out bench/results/decode_layer.json] [--batches 1,64,256]

Per model shape and decode batch B, each timed as CUDA-graph replays of back-to-back calls:
  unfused QKV   = fused_add_rms_norm + F.linear (cuBLAS, bias) + rotary_qk with the K/V append
  fused QKV     = norm_qkv_rotary (one Triton kernel: ops.fused)
  unfused MLP-in = fused_add_rms_norm + F.linear (gate_up) + silu_mul
  fused MLP-in  = norm_gate_up_silu
The floor of each is its weight bytes over the copy bandwidth measured in the same run (the
activations are a few hundred KB). The fused kernels run with their default blocks and with each
``--configs`` entry (BLOCK_M, BLOCK_K, num_stages, num_warps), so one run also says which to keep.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_info, paged_pool, print_table, results_path, time_ms, write_json  # noqa: E402

from oppo_runtime.ops import fused, fused_triton  # noqa: E402

SHAPES = {   # H, I, Hq, Hkv, D
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--configs", default="16,64,3,4;64,64,3,4;64,128,3,4;64,64,4,8;128,64,3,8",
                    help="';'-separated BLOCK_M,BLOCK_K,num_stages,num_warps of the fused kernels to sweep")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]
    info, bw = device_info(), copy_bandwidth()
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        H, I, Hq, Hkv, D = SHAPES[shape]
        w_qkv = torch.randn((Hq + 2 * Hkv) * D, H, device="cuda", dtype=dt, generator=g) * H ** -0.5
        b_qkv = torch.randn((Hq + 2 * Hkv) * D, device="cuda", dtype=dt, generator=g)
        w_gu = torch.randn(2 * I, H, device="cuda", dtype=dt, generator=g) * H ** -0.5
        nw = 1 + 0.1 * torch.randn(H, device="cuda", dtype=dt, generator=g)
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        cache = fused.rotary_cos_sin_cache(inv, 32768, "cuda")
        for B in (int(b) for b in args.batches.split(",")):
            x = torch.randn(B, H, device="cuda", dtype=dt, generator=g)
            res = 4 * torch.randn(B, H, device="cuda", dtype=dt, generator=g)
            kc, vc, tables = paged_pool(B, 512, Hkv, D, 16)
            pos = torch.full((B,), 300, device="cuda", dtype=torch.long)
            slots = tables[:, 300 // 16].long() * 16 + 300 % 16

            def qkv_unfused():
                normed, _ = fused.fused_add_rms_norm(x, res, nw, 1e-6)
                q, k, v = F.linear(normed, w_qkv, b_qkv).split([Hq * D, Hkv * D, Hkv * D], -1)
                fused.rotary_qk(q.view(B, Hq, D), k.view(B, Hkv, D), cache, pos, kv=(v.view(B, Hkv, D), kc, vc, slots))

            def mlp_unfused():
                normed, _ = fused.fused_add_rms_norm(x, res, nw, 1e-6)
                fused.silu_mul(F.linear(normed, w_gu))

            def qkv_fused():
                fused.norm_qkv_rotary(x, res, nw, 1e-6, w_qkv, b_qkv, Hq, Hkv, cache, pos, kc, vc, slots)

            def mlp_fused():
                fused.norm_gate_up_silu(x, res, nw, 1e-6, w_gu)

            for part, unf, fus, wbytes in (("qkv", qkv_unfused, qkv_fused, w_qkv.numel() * 2),
                                          ("gate_up", mlp_unfused, mlp_fused, w_gu.numel() * 2)):
                floor_us = 1e6 * wbytes / bw
                r = {"shape": shape, "batch": B, "part": part, "floor_us": floor_us,
                     "unfused_us": 1e3 * time_ms(unf, calls_per_replay=20)}
                fused_triton.CONFIG_OVERRIDE = None
                r["fused_us"] = 1e3 * time_ms(fus, calls_per_replay=20)
                best = (r["fused_us"], "default")
                for c in configs:
                    fused_triton.CONFIG_OVERRIDE = c
                    try:
                        t = 1e3 * time_ms(fus, calls_per_replay=20)
                    except Exception as e:  # noqa: BLE001 (a config the GPU cannot run: say so, go on)
                        print(f"  {shape} B={B} {part} config {c}: {type(e).__name__}: {str(e)[:100]}")
                        continue
                    r[f"cfg_{'_'.join(map(str, c))}_us"] = t
                    best = min(best, (t, ",".join(map(str, c))))
                fused_triton.CONFIG_OVERRIDE = None
                r.update(best_fused_us=best[0], best_config=best[1], speedup=r["unfused_us"] / r["fused_us"],
                         best_speedup=r["unfused_us"] / best[0], fused_over_floor=r["fused_us"] / floor_us,
                         unfused_over_floor=r["unfused_us"] / floor_us)
                rows.append(r)
                print(f"{shape} B={B} {part}: unfused {r['unfused_us']:.1f} us, fused {r['fused_us']:.1f} us "
                      f"(best {best[0]:.1f} at {best[1]}), floor {floor_us:.1f} us", flush=True)
    print_table(rows, [("shape", "shape", "s"), ("batch", "B", "d"), ("part", "part", "s"),
                       ("floor_us", "floor us", ".1f"), ("unfused_us", "unfused us", ".1f"),
                       ("fused_us", "fused us", ".1f"), ("speedup", "x unfused", ".2f"),
                       ("best_fused_us", "best fused us", ".1f"), ("best_config", "best config", "s"),
                       ("best_speedup", "best x unfused", ".2f"), ("unfused_over_floor", "unfused/floor", ".2f"),
                       ("fused_over_floor", "fused/floor", ".2f")])
    summary = {"min_speedup_default": min(r["speedup"] for r in rows),
               "min_speedup_best_config": min(r["best_speedup"] for r in rows),
               "copy_bandwidth_Bps": bw, "configs": args.configs}
    print("summary:", summary)
    write_json(results_path("decode_layer", args.out), {"info": info, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
