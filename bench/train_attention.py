"""Training attention (forward + backward) over packed variable-length sequences, one run, one card.

The PPO update runs causal attention over packed sequences of different lengths with autograd
(``ops.attention.varlen_causal_attention``). This compares ways to do it on the shapes of a
micro-batch of the PPO-step workloads (Qwen2.5-0.5B heads: Hq 14, Hkv 2, D 64, bf16), sorted by
length as ``ppo.trainer.micro_batches`` sorts them:

  ours_current       ops.attention.varlen_causal_attention as the trainer calls it
  flash_varlen       FlashAttention-2 varlen on the packed tokens (what ours_current runs on CUDA)
  padded_sdpa_gqa    right-pad to the longest, SDPA(enable_gqa=True), default backend choice
  padded_sdpa_rep    right-pad, K/V repeated to Hq heads, SDPA (flash eligible)
  per_backend        the padded_sdpa_rep call forced to FLASH / EFFICIENT / CUDNN
  flex_document      FlexAttention over the packed tokens, causal + same-sequence block mask

Time = median of fwd+bwd over repeats (CUDA events); FLOP = the causal FLOP of the real tokens only
(4*D*Hq per visible (q, k) pair forward, 2.5x that for fwd+bwd), reported against the bf16 matmul
rate measured in the same run.

    python3 bench/train_attention.py --out bench/results/train_attention.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_flops, time_ms  # noqa: E402


def lengths(n: int, median: float, cap: int, prompt: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    r = torch.exp(torch.randn(n, generator=g) + math.log(median)).clamp(1, cap).long()
    return sorted(prompt + int(x) for x in r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/train_attention.json")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from oppo_runtime.ops.attention import _FlashVarlen, varlen_causal_attention

    dev = torch.device("cuda")
    Hq, Hkv, D = 14, 2, 64
    scale = D ** -0.5
    rate = matmul_flops()
    rows = []
    for name, med, cap in (("T", 150, 512), ("G", 400, 4096)):
        lens = lengths(64, med, cap, 128, seed=1)
        for mb_name, mb in (("short16", lens[:16]), ("long16", lens[-16:])):
            N = sum(mb)
            cu = torch.tensor([0] + list(torch.tensor(mb).cumsum(0)), device=dev, dtype=torch.int32)
            q = torch.randn(N, Hq, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(N, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(N, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            go = torch.randn(N, Hq, D, device=dev, dtype=torch.bfloat16)
            pairs = sum(n * (n + 1) // 2 for n in mb)
            flop = 4 * D * Hq * pairs * 3.5       # fwd (1) + bwd (2.5)
            row = {"workload": name, "micro_batch": mb_name, "tokens": N, "max_len": max(mb), "flop": flop}

            def run(f):
                def go_():
                    q.grad = k.grad = v.grad = None
                    f().backward(go)
                try:
                    t = time_ms(go_, graph=False, calls_per_replay=1, reps=10, warmup=2) / 1e3
                    return {"s": t, "frac_matmul": flop / t / rate}
                except Exception as e:   # noqa: BLE001  (a backend that refuses this shape)
                    return {"error": f"{type(e).__name__}: {str(e)[:160]}"}

            row["ours_current"] = run(lambda: varlen_causal_attention(q, k, v, cu, scale, max_seqlen=max(mb)))
            row["flash_varlen"] = run(lambda: _FlashVarlen.apply(q, k, v, cu, max(mb), scale))
            T = max(mb)
            lens_t = torch.tensor(mb, device=dev)
            idx = torch.arange(T, device=dev)
            valid = idx[None, :] < lens_t[:, None]
            gather = (cu[:-1, None].long() + idx[None, :]).clamp_max(N - 1)

            def padded(rep: bool, backend=None):
                def f():
                    qq, kk, vv = (x[gather].transpose(1, 2) for x in (q, k, v))
                    if rep:
                        kk = kk.repeat_interleave(Hq // Hkv, dim=1)
                        vv = vv.repeat_interleave(Hq // Hkv, dim=1)
                    if backend is None:
                        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=not rep)
                    else:
                        with sdpa_kernel(backend):
                            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                                               enable_gqa=not rep)
                    return o.transpose(1, 2)[valid]
                return f

            row["padded_sdpa_gqa"] = run(padded(False))
            row["padded_sdpa_rep"] = run(padded(True))
            for bname, b in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                             ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
                row[f"gqa_{bname}"] = run(padded(False, b))
                row[f"rep_{bname}"] = run(padded(True, b))
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                seq_id = torch.repeat_interleave(torch.arange(len(mb), device=dev), lens_t)
                flex = torch.compile(flex_attention, dynamic=False)

                def doc_causal(b, h, qi, ki):
                    return (seq_id[qi] == seq_id[ki]) & (qi >= ki)
                t0 = time.perf_counter()
                bm = create_block_mask(doc_causal, 1, 1, N, N, device=dev)

                def fx():
                    o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             block_mask=bm, scale=scale, enable_gqa=True)
                    return o[0].transpose(0, 1)
                row["flex_document"] = run(fx)
                row["flex_document"]["first_call_s"] = time.perf_counter() - t0
            except Exception as e:   # noqa: BLE001
                row["flex_document"] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
            rows.append(row)
            cells = "  ".join(f"{k2}={v2['s']*1e3:.2f}ms({v2['frac_matmul']:.2f})" if "s" in v2 else f"{k2}=ERR"
                              for k2, v2 in row.items() if isinstance(v2, dict))
            print(f"{name} {mb_name} N={N} T={T}: {cells}", flush=True)
            for k2, v2 in row.items():
                if isinstance(v2, dict) and "error" in v2:
                    print(f"   {k2}: {v2['error']}")
    res = {"card": torch.cuda.get_device_name(), "matmul_tflops": rate / 1e12, "rows": rows,
           "command": "python3 bench/train_attention.py --out bench/results/train_attention.json"}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
