"""Whether the decode step's projections and its attention run faster side by side than in turn: the
question the engine's two-halves decode (`OPPO_DECODE_MICROBATCH=2`, two halves of the batch on two
CUDA streams; measured slower and removed in session 41, code at 1eed463) rested on, asked of the
kernels alone, without the engine's small kernels, host or sampler. Session 41 (H100): side by side
hid 29% of the shorter; the halves took 1.16x the in-turn time.

    python bench/overlap_probe.py [--shape qwen2.5-0.5b] [--batch 256] [--ctx 384] [--layers 8]
                                  [--out bench/results/overlap_probe.json]

Per layer l (``--layers`` distinct weight sets and page pools, so that as in the engine the weights
and K/V come from DRAM, not from the last layer's L2): the four projections as cuBLAS runs them
(qkv, o_proj, gate_up, down: F.linear) and the CUDA decode attention over ``--ctx`` tokens a
sequence on shuffled pages. Timed as CUDA graphs (bench/common.time_ms: median of replays):
- ``proj`` / ``attn``: all layers' projections alone / attentions alone, the full batch;
- ``in turn``: per layer, projections then attention, the full batch (the engine's order);
- ``side by side``: all projections on one stream and all attentions on another (forked and joined
  in the graph): how much of the shorter one the longer one hides, with nothing ordering them;
- ``halves``: the batch as two halves, each per layer projections then attention, the second half
  on a second stream (the removed OPPO_DECODE_MICROBATCH=2 at the kernel level: each half reads the
  weights once more); ``halves, lag 1``: the second half starts after the first half's layer 0.
Reported beside ``in turn``: each form's time and ratio. No timing assertion.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_info, paged_pool, print_table, results_path, time_ms, write_json  # noqa: E402
from linear_probe import SHAPES  # noqa: E402  (hidden, intermediate, Hq, Hkv, D)


class Layer:
    """One decoder layer's projections and attention over a batch, on distinct weights and pages."""

    def __init__(self, shape, B: int, ctx: int, seed: int, dtype=torch.bfloat16):
        from oppo_runtime.ops.attention import paged_decode_workspace
        H, inter, Hq, Hkv, D = shape
        g = torch.Generator(device="cuda").manual_seed(seed)

        def w(n, k):
            return (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(dtype)

        self.w_qkv, self.w_o = w((Hq + 2 * Hkv) * D, H), w(H, Hq * D)
        self.w_gu, self.w_d = w(2 * inter, H), w(H, inter)
        self.x = torch.randn(B, H, device="cuda", generator=g).to(dtype)
        self.a = torch.randn(B, Hq * D, device="cuda", generator=g).to(dtype)
        self.m = torch.randn(B, inter, device="cuda", generator=g).to(dtype)
        self.k, self.v, self.bt = paged_pool(B, ctx, Hkv, D, 16, dtype=dtype, seed=seed)
        self.q = torch.randn(B, Hq, D, device="cuda", generator=g).to(dtype)
        self.lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        self.out = torch.empty(B, Hq, D, device="cuda", dtype=dtype)
        self.scale = D ** -0.5
        self.B = B
        self.ws = {}
        for half in (slice(0, B), slice(0, B // 2), slice(B // 2, B)):
            self.ws[(half.start, half.stop)] = paged_decode_workspace(self.q[half], self.k, self.bt[half])

    def proj(self, rows: slice) -> None:
        F.linear(self.x[rows], self.w_qkv)
        F.linear(self.a[rows], self.w_o)
        F.linear(self.x[rows], self.w_gu)
        F.linear(self.m[rows], self.w_d)

    def attn(self, rows: slice) -> None:
        from oppo_runtime.ops.attention import paged_decode_attention
        paged_decode_attention(self.q[rows], self.k, self.v, self.bt[rows], self.lens[rows], self.scale,
                               out=self.out[rows], backend="cuda", workspace=self.ws[(rows.start, rows.stop)])


def forms(layers: list[Layer]) -> dict:
    """The forms timed, each a callable that launches one step's work on the current stream (and a
    side stream it forks and joins)."""
    B = layers[0].B
    full, a, b = slice(0, B), slice(0, B // 2), slice(B // 2, B)
    side = torch.cuda.Stream()

    def proj():
        for lay in layers:
            lay.proj(full)

    def attn():
        for lay in layers:
            lay.attn(full)

    def in_turn():
        for lay in layers:
            lay.proj(full)
            lay.attn(full)

    def fork(first, second, lag: int = 0):
        cur = torch.cuda.current_stream()
        if lag:
            ev = torch.cuda.Event()
            first(ev, lag)
            side.wait_event(ev)
            with torch.cuda.stream(side):
                second(None, 0)
        else:
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                second(None, 0)
            first(None, 0)
        cur.wait_stream(side)

    def half(rows):
        def run(ev, lag):
            for i, lay in enumerate(layers):
                lay.proj(rows)
                lay.attn(rows)
                if ev is not None and i == lag - 1:
                    ev.record(torch.cuda.current_stream())
        return run

    return {
        "proj": proj,
        "attn": attn,
        "in turn": in_turn,
        "side by side": lambda: fork(lambda ev, lag: proj(), lambda ev, lag: attn()),
        "halves": lambda: fork(half(a), half(b)),
        "halves, lag 1": lambda: fork(half(a), half(b), lag=1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.batch < 2 or args.batch % 2 or args.layers < 1 or args.ctx < 1:
        raise SystemExit("overlap_probe: --batch must be even and >= 2, --layers and --ctx >= 1")
    from oppo_runtime import ops
    if not ops.has_cuda_kernels():
        raise SystemExit("overlap_probe: needs the CUDA kernels (the decode attention) and a GPU")
    bw = copy_bandwidth()
    layers = [Layer(SHAPES[args.shape], args.batch, args.ctx, seed=i) for i in range(args.layers)]
    rows = []
    times = {}
    for name, fn in forms(layers).items():
        ms = time_ms(fn, calls_per_replay=1, reps=15)
        times[name] = ms
        rows.append({"form": name, "us": ms * 1e3})
        print(f"{name:>14}: {ms * 1e3:9.1f} us", flush=True)
    base = times["in turn"]
    for r in rows:
        r["x_in_turn"] = r["us"] / (base * 1e3)
    hidden = (times["proj"] + times["attn"] - times["side by side"]) / min(times["proj"], times["attn"])
    print_table(rows, [("form", "form", ""), ("us", "us", ".1f"), ("x_in_turn", "/ in turn", ".3f")])
    print(f"side by side hides {hidden:.0%} of the shorter of proj and attn", flush=True)
    write_json(results_path("overlap_probe", args.out),
               {**device_info(), "copy_bandwidth_Bps": bw, "shape": args.shape, "batch": args.batch,
                "ctx": args.ctx, "layers": args.layers, "rows": rows, "hidden_fraction_side_by_side": hidden,
                "command": "python3 " + " ".join(sys.argv)})


if __name__ == "__main__":
    main()
