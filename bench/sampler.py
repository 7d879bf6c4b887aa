"""The fused Gumbel sampler (ops.sampling_triton.gumbel_sample): time per call and achieved read
bandwidth (B*V*2 bytes of bf16 logits over the time) over the copy bandwidth measured in the same
run, beside two baselines timed in the same run: what HF generate does (softmax(logits.float() / t)
then torch.multinomial) and the repository's reference path (sample_tokens(..., backend="reference"),
the CPU oracle, run on the device).

    python bench/sampler.py [--out PATH] [--batches 1,8,64,256] [--vocab 151936] [--reps 15]
    python bench/sampler.py --device cpu --quick          # smoke run: Triton's interpreter, small V

Rows are all sampled (temperature 1.0, the PPO rollout case) unless --temperature says otherwise;
`greedy_us` times the same logits with temperature 0 (the argmax branch). On CUDA the fused sampler
is timed over CUDA-graph replays (10 calls per replay: device time, as inside the engine's decode
graph), the baselines eagerly (the reference syncs the host). Each row also checks the fused
tokens against the reference's (identical tokens expected; the tests are the real check).
On the CPU (--device cpu) the fused sampler runs in Triton's interpreter: the times are wall-clock
and say nothing about a GPU; the run checks that the script and the kernel work.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small vocabulary and batches, few reps (smoke run)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,64,256)")
    ap.add_argument("--vocab", type=int, default=None, help="default 151936 (Qwen2); --quick: 5000")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=None, help="timed replays per row (default 15; --quick 3)")
    return ap.parse_args()


ARGS = _args()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"    # before Triton decorates the kernels (at import)

import torch  # noqa: E402

from common import print_table, results_path, write_json  # noqa: E402
from oppo_runtime.ops import sampling_triton  # noqa: E402
from oppo_runtime.ops.sampling import sample_tokens  # noqa: E402


def _cpu_time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _cpu_copy_bandwidth(nbytes: int = 256 << 20) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (_cpu_time_ms(lambda: dst.copy_(src), 5) * 1e-3)


def _cpu_info() -> dict:
    import shlex
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "card": "cpu (Triton interpreter)",
            "sm_count": None, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]), "cwd": os.getcwd()}


def _kernel_resources() -> dict:
    """Registers and spills of the compiled partial kernel(s) (best effort: Triton's cache layout)."""
    out = {}
    try:
        for caches in sampling_triton._gumbel_partial_kernel.device_caches.values():
            for k in caches[0].values():
                out.setdefault("partial_kernel_regs", []).append(getattr(k, "n_regs", None))
                out.setdefault("partial_kernel_spills", []).append(getattr(k, "n_spills", None))
    except Exception:  # noqa: BLE001
        pass
    return out


def main() -> None:
    dev = torch.device(ARGS.device)
    cuda = dev.type == "cuda"
    if cuda:
        from common import copy_bandwidth, device_info, time_ms
        info, bw = device_info(), copy_bandwidth()

        def timed(fn, graph: bool) -> float:
            return time_ms(fn, reps=reps, graph=graph)
    else:
        info, bw = _cpu_info(), _cpu_copy_bandwidth()

        def timed(fn, graph: bool) -> float:
            return _cpu_time_ms(fn, reps)
    reps = ARGS.reps or (3 if ARGS.quick else 15)
    V = ARGS.vocab or (5000 if ARGS.quick else 151936)
    batches = [int(b) for b in ARGS.batches.split(",")] if ARGS.batches else ([1, 8] if ARGS.quick else [1, 8, 64, 256])
    print(f"{info['card']}  torch {info['torch']}  copy bandwidth {bw / 1e12:.3f} TB/s (read + write)  V={V}")
    out_path = results_path("sampler", ARGS.out)
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for B in batches:
        logits = (torch.randn(B, V, device=dev, generator=g) * 2).to(torch.bfloat16)
        temp = torch.full((B,), ARGS.temperature, device=dev)
        greedy = torch.zeros(B, device=dev)
        keys = torch.arange(B, device=dev) * 7919 + 5
        pos = torch.arange(B, device=dev) + 100
        nbytes = B * V * logits.element_size()
        splits, _ = sampling_triton.split_layout(B, V, dev)      # the grid gumbel_sample launches
        row = {"B": B, "V": V, "temperature": ARGS.temperature, "bytes": nbytes, "floor_us": nbytes / bw * 1e6,
               "splits": splits, "programs": B * splits}

        def fused():
            return sampling_triton.gumbel_sample(logits, temp, 1, keys, pos)

        def fused_greedy():
            return sampling_triton.gumbel_sample(logits, greedy, 1, keys, pos)

        def hf():       # HF generate's sampling: temperature, softmax in fp32, multinomial
            return torch.multinomial(torch.softmax(logits.float() / temp[:, None], dim=-1), 1)

        def ref():
            return sample_tokens(logits, temp, None, None, 1, keys, pos, needs_filter=False, backend="reference")

        for key, fn, graph in (("ours", fused, True), ("greedy", fused_greedy, True), ("hf", hf, False),
                               ("ref", ref, False)):
            try:
                ms = timed(fn, graph)
                row[f"{key}_us"] = ms * 1e3
                row[f"{key}_frac_copy_bw"] = nbytes / (ms * 1e-3) / bw
            except Exception as e:  # noqa: BLE001
                row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
                print(row[f"{key}_error"])
        try:        # the timed output against the reference once (a smoke check; the tests are the check)
            t1, l1, b1 = fused()
            t2, l2, b2 = ref()
            row["token_mismatches_vs_ref"] = int((t1 != t2).sum())
            row["max_abs_dlogp_vs_ref"] = float((l1 - l2).abs().max())
            t1, l1, _ = fused_greedy()
            row["greedy_token_mismatches_vs_argmax"] = int((t1 != logits.float().argmax(-1)).sum())
        except Exception as e:  # noqa: BLE001
            row["check_error"] = f"{type(e).__name__}: {e}"[:300]
            print(row["check_error"])
        for k in ("hf_us", "ref_us"):
            if k in row and "ours_us" in row:
                row["speedup_vs_" + k[:-3]] = row[k] / row["ours_us"]
        rows.append(row)
        del logits
        if cuda:
            torch.cuda.empty_cache()
        summary = {"max_ours_us": max((r["ours_us"] for r in rows if "ours_us" in r), default=None),
                   "min_frac_copy_bw": min((r["ours_frac_copy_bw"] for r in rows if "ours_frac_copy_bw" in r),
                                           default=None),
                   "token_mismatches_vs_ref": sum(r.get("token_mismatches_vs_ref", 0) for r in rows),
                   **_kernel_resources()}
        write_json(out_path, {**info, "device": str(dev), "copy_bandwidth_Bps": bw, "dtype": "bfloat16",
                              "rows": rows, "summary": summary})
        print(f"  done B={B}: " + ", ".join(f"{k}={row[k]:.4g}" for k in row if k.endswith(("_us", "_bw"))),
              flush=True)
    print()
    print_table(rows, [("B", "B", "d"), ("V", "V", "d"), ("splits", "splits", "d"), ("programs", "progs", "d"),
                       ("floor_us", "floor us", ".1f"), ("ours_us", "ours us", ".1f"),
                       ("ours_frac_copy_bw", "ours/copy", ".3f"), ("greedy_us", "greedy us", ".1f"),
                       ("hf_us", "hf us", ".1f"), ("ref_us", "ref us", ".1f"), ("speedup_vs_hf", "x hf", ".2f"),
                       ("speedup_vs_ref", "x ref", ".2f"), ("token_mismatches_vs_ref", "mism", "d"),
                       ("max_abs_dlogp_vs_ref", "|dlogp|", ".1e")])
    print("summary:", summary)
    print("wrote", out_path)


if __name__ == "__main__":
    main()
