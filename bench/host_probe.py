"""The engine's host time per decode step without a device: the real ActorEngine (scheduler, page
pool, staging, booking, chunk emission) over a stub model whose forward and LM head return
preallocated zeros and a stub sampler, so what is timed is the Python and numpy a decode step
costs, not arithmetic.

    python bench/host_probe.py [--batches 64,256] [--new 256] [--reps 3] [--prompt-len 128] [--profile] [--out PATH]

Modes (each in the same process): ``sync`` (book every step before the next), ``async`` (the
GPU's default: the next step is launched before the previous one is booked) and ``static`` (async
through the decode graphs' static buffers, ``OPPO_STATIC_DECODE=1``, as on a GPU with graphs),
``static_gs`` (that, with the LM head and the sampler in the step: graph sampling). A chunk
consumer is attached (chunk 64) as the scorers would be. Reported per mode and batch: host ms per
step (the engine's ``host_s`` over its steps), median of the reps. CPU-only by design: on a GPU
host the same Python runs ~1.5-3x slower (NOTES "Engine host").
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from oppo_runtime.engine import ActorEngine, EngineConfig, SamplingParams  # noqa: E402
from oppo_runtime.engine import actor as actor_module  # noqa: E402
from oppo_runtime.memory import KVGeometry, PagePool  # noqa: E402
from oppo_runtime.models import ModelConfig, build_model  # noqa: E402

MODES = ("sync", "async", "static", "static_gs")


class StubModel(torch.nn.Module):
    """A 1-layer model's config and KV geometry; forward and LM head return zeros (no arithmetic)."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        cfg = ModelConfig.from_dict(dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab,
                                         max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        self.inner = build_model(cfg, "causal_lm", seed=0, dtype=torch.float32, device="cpu").eval()
        self.config = self.inner.config
        self._hidden = torch.zeros(0, cfg.hidden_size)
        self._logits = torch.zeros(0, vocab)

    def kv_geometry(self):
        return self.inner.kv_geometry()

    def forward(self, input_ids, positions, ctx):
        n = input_ids.shape[0]
        if n > self._hidden.shape[0]:
            self._hidden = torch.zeros(n, self._hidden.shape[1])
        return self._hidden[:n]

    def compute_logits(self, hidden):
        n = hidden.shape[0]
        if n > self._logits.shape[0]:
            self._logits = torch.zeros(n, self._logits.shape[1])
        return self._logits[:n]


def _stub_sample(logits, temperature, top_k, top_p, seed, keys, positions, needs_filter=None, backend=None):
    """Tokens 1 (never EOS here: told lengths), log-probs 0, no bad rows: on a GPU the sampler is
    one device launch, so its CPU reference arithmetic is no part of the host's cost."""
    n = logits.shape[0]
    return (torch.ones(n, dtype=torch.int64), torch.zeros(n), torch.zeros(n, dtype=torch.bool))


def run(B: int, new: int, mode: str, reps: int, profile: str | None = None, plen: int = 128) -> dict:
    actor_module.sample_tokens = _stub_sample
    os.environ["OPPO_ASYNC_DECODE"] = "0" if mode == "sync" else "1"
    os.environ["OPPO_STATIC_DECODE"] = "1" if mode.startswith("static") else "0"
    os.environ["OPPO_GRAPH_SAMPLING"] = "1" if mode == "static_gs" else "0"
    model = StubModel()
    geo = KVGeometry(*model.kv_geometry(), torch.float32)
    pool = PagePool(B * (-(-(plen + new) // 16) + 1) + 64, PagePool.page_bytes_for([geo], 16), "cpu")
    eng = ActorEngine(model, pool, EngineConfig(max_num_seqs=B, chunk_size=64, seed=0, max_num_batched_tokens=1 << 16,
                                                max_model_len=plen + new + 16))
    chunks = [0]
    eng.add_chunk_consumer(lambda cs: chunks.__setitem__(0, chunks[0] + len(cs)))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (B, plen), generator=g).tolist()
    sp = SamplingParams(temperature=1.0, max_new_tokens=new)
    eng.generate(prompts[:2], sp, target_lens=[4, 4])                 # warm-up (graph buffers, numpy paths)
    out = []
    for rep in range(reps + (1 if profile else 0)):
        prof = cProfile.Profile() if (profile and rep == reps) else None
        eng.reset_stats()
        t = time.perf_counter()
        if prof:
            prof.enable()
        seqs = eng.generate(prompts, sp, target_lens=[new] * B)
        if prof:
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
            Path(profile).write_text(f"cProfile, B={B}, mode {mode}, {new} new tokens\n" + buf.getvalue())
            continue
        wall = time.perf_counter() - t
        assert sum(len(s.output_ids) for s in seqs) == B * new
        steps = eng.stats["decode_steps"] + eng.stats["prefill_steps"]
        out.append((1e3 * eng.stats["host_s"] / steps, 1e3 * wall / steps))
    return {"B": B, "mode": mode, "host_ms": statistics.median(h for h, _ in out),
            "wall_ms": statistics.median(w for _, w in out), "steps": steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (long contexts: long block tables)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--profile", action="store_true", help="one more generate per mode and batch under cProfile, "
                                                          "to host_probe_<mode>_B<B>.txt beside --out (or in /tmp)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        for mode in args.modes.split(","):
            prof = None
            if args.profile:
                prof = str(Path(args.out).parent if args.out else Path("/tmp")) + f"/host_probe_{mode}_B{B}.txt"
            r = run(B, args.new, mode, args.reps, prof, args.prompt_len)
            rows.append(r)
            print(f"B={B:4d} {mode:9s} host {r['host_ms']:.3f} ms/step, wall {r['wall_ms']:.3f} ms/step", flush=True)
    print_table(rows, [("B", "B", "d"), ("mode", "mode", "s"), ("host_ms", "host ms/step", ".3f"),
                       ("wall_ms", "wall ms/step", ".3f")])
    if args.out:
        write_json(Path(args.out), {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                              "rows": rows})


if __name__ == "__main__":
    main()
