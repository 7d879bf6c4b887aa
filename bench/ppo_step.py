"""Full PPO steps (rollout + scoring + training update) under the four overlap modes, and TRL's
PPO trainer beside them (issue 10).

Each mode drives the real ``PPOTrainer`` (oppo_runtime/ppo/trainer.py) with a TrainConfig built
here: actor, reward model and critic of the Qwen2.5-0.5B shape (random weights, full 151936
vocabulary; HF directories written once under --cache-dir), reference = the actor's initial
weights, prompts of 128 random token ids, batch B=64, one PPO epoch, one mini-batch (micro-batches
of 16). Each prompt carries a response length drawn from a lognormal (``target_len`` in the prompt
file; the engine decodes exactly that many tokens), so every mode decodes the same tokens. Δ is
fixed (delta_min = delta_init = delta_max) and the staleness limit is high enough that no
deferred sequence is cut short, so inter/full train the same sequences as none, only later.

Workloads (--workload):
  G  median 400, capped at 4096   long tail: speedup and GPU busy ratio of full vs none
  T  median 150, capped at 512    beside TRL's PPOTrainer (--trl; response_length=512)
  I  median 200, capped at 2048   issue 6: per-step time of inter and full vs none
(lengths: exp(log(median) + sigma * N(0, 1)), sigma 1, rounded, clipped to [1, cap]).

Per mode: median seconds per step over --steps timed steps after --warmup steps; generated tokens
per second (engine count / step time); stages from the trainer (rollout = timing_s/rollout,
scoring not hidden = seconds of the step's timeline where a scorer ran and the actor did not,
training = timing_s/train + timing_s/sync_weights); kernel active ("GPU busy" in the table) = mean
of NVML utilization (pynvml, sampled every 50 ms by a thread) over the timed steps (null on the
CPU), and SM busy = NVML GPM SM utilization over ~100 ms windows (Hopper+: how much of the machine
ran, where plain utilization counts any running kernel as busy). summary.busy_ratio_full_vs_none
is the SM-busy ratio where GPM is there (its _source says which), else the kernel-active one;
kernel_active_ratio_full_vs_none keeps the latter beside it. The timeline of
the last timed step of `none` and `full` as PNG next to the JSON. TRL runs in a subprocess
(bench/trl_ppo_step.py) on the same model directories and prompts; where trl is not importable its
wheels are installed from .whl/ (pip --no-index) into a folder put on its PYTHONPATH.

    python bench/ppo_step.py --workload G                 [--out bench/results/ppo_step.json]
    python bench/ppo_step.py --workload T --trl
    python bench/ppo_step.py --workload I
    python bench/ppo_step.py --merge a.json b.json --out bench/results/ppo_step.json
    python bench/ppo_step.py --tiny --workload T --trl    # CPU, tiny models, < 60 s (tests)

Results of several workloads live in one JSON (``workloads``): a run whose --out exists keeps the
other workloads in it, --merge joins files of separate runs; ``summary`` is recomputed from all.

Expected time on one H100 (estimates from the rollout benchmark and TRL's measured 12.6-16.5 s per
step; the first call also writes the model directories, ~30 s): setup ~20 s per mode;
G: none/intra ~19 s/step, inter/full ~11 s/step -> 1+3 steps x 4 modes ~ 240 s + setup ~ 6 min;
T: ~3-4 s/step -> ~1.5 min for 4 modes, TRL ~15 s/step x 4 + ~40 s start ~ 1.7 min -> ~3.5 min;
I: ~8-10 s/step x 4 x 3 modes + setup ~ 3 min. --budget-s (default 420) stops a mode after its
current step and skips the modes left once spent; the JSON is rewritten after every mode.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))
from common import matmul_flops, print_table, tree_commit, write_json  # noqa: E402
from models import SHAPES  # noqa: E402

from oppo_runtime.models import ModelConfig, build_model, save_model  # noqa: E402
from oppo_runtime.ppo.config import TrainConfig  # noqa: E402
from oppo_runtime.ppo.default_task import _tokenizer_json  # noqa: E402

MODES = ("none", "intra", "inter", "full")
WORKLOADS = {
    "G": dict(median=400, cap=4096, modes=MODES, about="long tail"),
    "T": dict(median=150, cap=512, modes=MODES, about="beside TRL (response_length = cap)"),
    "I": dict(median=200, cap=2048, modes=("none", "inter", "full"), about="issue 6"),
}
FULL = dict(shape="qwen2.5-0.5b", vocab=151936, max_pos=32768, B=64, prompt_len=128, sigma=1.0, delta=16, chunk=64,
            micro=16, micro_tokens=16384, max_batched=16384, memory_fraction=0.25, lr=1e-6)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
TINY = dict(shape="tiny", vocab=128, max_pos=256, B=8, prompt_len=16, sigma=1.0, delta=2, chunk=4, micro=4,
            max_batched=512, memory_fraction=0.25, lr=1e-6, median=5, cap=16)


# ---------------------------------------------------------------------------------------------- inputs
def ensure_models(cache_dir: str | Path, shape: str, vocab: int, max_pos: int, seed: int = 0) -> dict[str, str]:
    """Write (once) random-weight HF directories (config.json, model.safetensors, tokenizer) of the
    actor (also the reference), the reward model and the critic; return their paths."""
    root = Path(cache_dir) / f"{shape}-v{vocab}-seed{seed}"
    paths = {role: root / role for role in ("actor", "reward", "critic")}
    if (root / "DONE").exists():
        return {k: str(v) for k, v in paths.items()}
    dims = TINY_SHAPE if shape == "tiny" else SHAPES[shape]
    base = dict(model_type="qwen2", vocab_size=vocab, max_position_embeddings=max_pos, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True, num_labels=1, **dims)
    dtype = torch.float32 if shape == "tiny" else torch.bfloat16       # halves the files; loading casts
    for i, (role, kind, arch) in enumerate([("actor", "causal_lm", "Qwen2ForCausalLM"),
                                            ("reward", "score", "Qwen2ForSequenceClassification"),
                                            ("critic", "score", "Qwen2ForSequenceClassification")]):
        t0 = time.perf_counter()
        model = build_model(ModelConfig.from_dict({**base, "architectures": [arch]}), kind, seed=seed * 100 + i)
        save_model(model.to(dtype), paths[role])
        del model
        (paths[role] / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
        (paths[role] / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>"}))
        print(f"  wrote {paths[role]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    (root / "DONE").write_text("ok\n")
    return {k: str(v) for k, v in paths.items()}


def target_lengths(n: int, median: float, sigma: float, cap: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(min(cap, max(1, round(math.exp(math.log(median) + sigma * rng.gauss(0.0, 1.0)))))) for _ in range(n)]


def write_prompts(path: Path, n: int, prompt_len: int, vocab: int, median: float, sigma: float, cap: int,
                  seed: int = 0) -> Path:
    """JSONL: {"prompt_ids": [prompt_len random ids], "target_len": L}; ids avoid the tokenizer's
    own tokens (specials, TRL's [PAD]) so that no prompt token reads as padding."""
    lo = 100 if vocab > 1000 else 80       # above the tokenizer's 71 tokens and TRL's [PAD]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, vocab, (n, prompt_len), generator=gen).tolist()
    lens = target_lengths(n, median, sigma, cap, seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p, L in zip(ids, lens):
            f.write(json.dumps({"prompt_ids": p, "target_len": L}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- measuring
class BusySampler:
    """GPU utilization (NVML: percent of time a kernel ran, over the driver's last sample period)
    polled every ``interval`` s by a daemon thread; ``busy(t0, t1)`` is the mean over samples taken
    between two ``time.perf_counter()`` readings, as a fraction. None without CUDA/NVML."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.samples, self.source = interval, [], None
        self.sm_samples: list[tuple[float, dict]] = []      # (interval midpoint, {GPM metric: %})
        self.sm_source: str | None = None
        self._gpm = None
        self._read = None
        self._thread = None
        self._stop = threading.Event()
        if not torch.cuda.is_available():
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            idx = int(visible) if visible.isdigit() else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            self.source = "pynvml"
            self._gpm = self._gpm_reader(pynvml, handle)
        except Exception:  # noqa: BLE001
            try:
                torch.cuda.utilization()
                self._read = torch.cuda.utilization
                self.source = "torch.cuda.utilization"
            except Exception as e:  # noqa: BLE001
                print(f"  (no GPU utilization source: {type(e).__name__}: {e})")
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()

    # GPM metrics sampled together (name -> pynvml constant name, its id where the binding lacks it)
    GPM_METRICS = {"sm": ("NVML_GPM_METRIC_SM_UTIL", 2), "occupancy": ("NVML_GPM_METRIC_SM_OCCUPANCY", 3),
                   "tensor": ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", 5)}

    def _gpm_reader(self, nv, handle):
        """GPM metrics (Hopper+) between two samples: SM utilization, the fraction of SM time that
        had a warp resident (how much of the machine ran, not just whether a kernel did: NVML's
        plain "utilization" counts a batch-1 decode kernel on 8 of 132 SMs as 100% busy); SM
        occupancy, resident warps over the maximum (how full the SMs that ran were); and tensor
        activity, the fraction of time any tensor pipe was busy (useful matmul work). A metric
        the driver refuses is left out (None), the others go on."""
        try:
            sup = nv.nvmlGpmQueryDeviceSupport(handle)
            if not getattr(sup, "isSupportedDevice", 0):
                print("  (NVML GPM not supported on this device: no SM utilization)")
                return None
            samples = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
            nv.nvmlGpmSampleGet(handle, samples[0])
            state = {"prev": 0, "t": time.perf_counter()}
            ids = {k: getattr(nv, name, fallback) for k, (name, fallback) in self.GPM_METRICS.items()}

            def read():
                cur = 1 - state["prev"]
                nv.nvmlGpmSampleGet(handle, samples[cur])
                t = time.perf_counter()
                mg = nv.c_nvmlGpmMetricsGet_t()
                mg.version = nv.NVML_GPM_METRICS_GET_VERSION
                mg.numMetrics = len(ids)
                mg.sample1, mg.sample2 = samples[state["prev"]], samples[cur]
                for j, mid in enumerate(ids.values()):
                    mg.metrics[j].metricId = mid
                nv.nvmlGpmMetricsGet(mg)
                mid_t = (state["t"] + t) / 2
                state["prev"], state["t"] = cur, t
                vals = {k: (float(mg.metrics[j].value) if mg.metrics[j].nvmlReturn == 0 else None)
                        for j, k in enumerate(ids)}
                if vals["sm"] is None:
                    raise RuntimeError(f"GPM SM_UTIL returned {mg.metrics[0].nvmlReturn}")
                return mid_t, vals

            read()
            self.sm_source = "nvml-gpm SM_UTIL, SM_OCCUPANCY, ANY_TENSOR_UTIL"
            return read
        except Exception as e:  # noqa: BLE001  (old driver / nvidia-ml-py without GPM / no permission)
            print(f"  (no NVML GPM SM utilization: {type(e).__name__}: {e})")
            return None

    def _loop(self):
        n = 0
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), float(self._read())))
            except Exception:  # noqa: BLE001
                pass
            n += 1
            if self._gpm is not None and n % 2 == 0:      # GPM over ~100 ms windows
                try:
                    self.sm_samples.append(self._gpm())
                except Exception as e:  # noqa: BLE001
                    print(f"  (NVML GPM sampling stopped: {type(e).__name__}: {e})")
                    self._gpm = None
            self._stop.wait(self.interval)

    def busy(self, windows: list[tuple[float, float]]) -> float | None:
        if self._read is None:
            return None
        vals = [u for t, u in list(self.samples) if any(a <= t <= b for a, b in windows)]
        return sum(vals) / len(vals) / 100.0 if vals else None

    def gpm_mean(self, windows: list[tuple[float, float]], metric: str = "sm") -> float | None:
        """Mean of a GPM metric (fraction; "sm" utilization, "occupancy", "tensor") over the GPM
        intervals whose midpoint is in a window."""
        vals = [u[metric] for t, u in list(self.sm_samples)
                if u.get(metric) is not None and any(a <= t <= b for a, b in windows)]
        return sum(vals) / len(vals) / 100.0 if vals else None

    def close(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=1)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeline_stages(tl) -> dict:
    """Seconds of the step's timeline: scoring not hidden (a scorer ran, the actor did not), and
    the union of all lanes (trace busy)."""
    return {"exposed_score_s": tl.exposed_s(), "score_union_s": tl.union_s(tl.scorer_lanes()),
            "trace_busy_s": tl.union_s()}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


RENDERS: list[subprocess.Popen] = []


def render_png(tl, png: Path, work: Path, title: str) -> subprocess.Popen:
    """Timeline.to_png in a child process (thousands of decode spans take matplotlib tens of
    seconds), so that the next mode runs meanwhile; ``wait_renders`` collects them."""
    import pickle
    src = work / f"{png.stem}.spans.pkl"
    with open(src, "wb") as f:
        pickle.dump({"step": tl.step, "spans": tl.spans, "png": str(png), "title": title}, f)
    code = ("import pickle, sys; from oppo_runtime.engine.timeline import Timeline; "
            "d = pickle.load(open(sys.argv[1], 'rb')); tl = Timeline(step=d['step'], use_cuda=False); "
            "tl.spans = d['spans']; tl.to_png(d['png'], title=d['title'])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, str(src)], env=env)


def wait_renders(timeout: float = 180.0) -> None:
    end = time.perf_counter() + timeout
    for proc in RENDERS:
        try:
            proc.wait(timeout=max(1.0, end - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            print("  (a timeline PNG did not finish in time)", flush=True)
    RENDERS.clear()


# ---------------------------------------------------------------------------------------------- our trainer
def train_config(mode: str, p: dict, paths: dict, prompt_file: Path, out_dir: Path, args, total_steps: int) -> TrainConfig:
    train_dtype = "bfloat16" if args.ours_dtype == "bf16" else "float32"
    return TrainConfig.from_dict({
        "model": {"actor_path": paths["actor"], "reward_path": paths["reward"], "critic_path": paths["critic"],
                  "dtype": train_dtype, "engine_dtype": "auto"},
        "rollout": {"batch_size": p["B"], "prompt_file": str(prompt_file), "max_prompt_len": p["prompt_len"],
                    "max_new_tokens": p["cap"], "use_target_lens": True, "temperature": 1.0,
                    "chunk_size": p["chunk"], "adaptive_chunk": not args.fixed_chunk,
                    "delta_init": p["delta"], "delta_min": p["delta"], "delta_max": p["delta"],
                    "staleness_limit": args.staleness_limit, "memory_fraction": p["memory_fraction"],
                    "max_num_batched_tokens": p["max_batched"], "score_below_batch": args.score_below_batch,
                    "keep_stale_kv": args.keep_stale_kv},
        "ppo": {"ppo_epochs": 1, "num_mini_batches": 1, "micro_batch_size": p["micro"],
                "micro_batch_tokens": p.get("micro_tokens"), "old_logprob": args.old_logprob},
        "optim": {"actor_lr": p["lr"], "critic_lr": p["lr"]},
        "run": {"total_steps": total_steps, "seed": 0, "overlap": mode, "out_dir": str(out_dir),
                "device": args.device, "scorer_device": args.scorer_device, "timeline_every": 0,
                "nan_policy": "skip", "tensorboard": False, "progress": False, "save_every": 10 ** 9},
    })


def profile_step(tr, mode: str, p: dict, args) -> None:
    """One more step (not timed) under torch.profiler: where the rollout and the update spend their
    device and host time. Tables go to stdout and to ppo_step_<W>_<mode>_profile.txt beside --out."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        m = tr.step()
        _sync()
    ka = prof.key_averages()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = (f"profile of one {mode} step, workload {p['workload']}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k.startswith("timing_s/")) + "\n"
            + ka.table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n"
            + ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    print(text, flush=True)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "ppo_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"ppo_step_{p['workload']}_{mode}_profile.txt").write_text(text)
    # the whole trace, gzipped (a few MB: the decode replays graphs): per-phase kernel sums offline
    # (bench/trace_phases.py), which key_averages over the whole step cannot give
    raw = out.parent / f"ppo_step_{p['workload']}_{mode}_trace.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as f, gzip.open(str(raw) + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    raw.unlink()


def update_flop(tr, sequences: float, response_tokens: float, prompt_len: int) -> float:
    """GEMM FLOPs of one PPO update by count (attention's are <2% at these lengths and left out):
    the actor's old-log-prob forward (when recomputed), its forward and backward (x3) with the LM
    head's logits once more in backward (the fused log-prob op recomputes them), the critic's
    forward and backward. Body = parameters outside the embedding / LM head (tied here)."""
    def body(m):
        return sum(q.numel() for n, q in m.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    n_tok = response_tokens + sequences * prompt_len
    vh = tr.actor.model.embed_tokens.weight.numel()
    fwd_actor = 2 * body(tr.actor) * n_tok + 2 * vh * response_tokens
    old = fwd_actor if tr.cfg.ppo.old_logprob == "recompute" else 0.0
    return old + 3 * fwd_actor + 2 * vh * response_tokens + 3 * 2 * body(tr.critic) * n_tok


def run_mode(mode: str, p: dict, paths: dict, prompt_file: Path, work: Path, args, sampler: BusySampler,
             png: Path | None, deadline: float) -> dict:
    from oppo_runtime.ppo.trainer import PPOTrainer

    total = args.warmup + args.steps
    cfg = train_config(mode, p, paths, prompt_file, work / f"run-{mode}", args, total)
    t_setup = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tr = PPOTrainer(cfg)
    setup_s = time.perf_counter() - t_setup
    steps, windows = [], []
    phase_windows: dict[str, list] = {"rollout": [], "train": []}   # host windows of each timed step's stages
    try:
        for i in range(total):
            _sync()
            t0 = time.perf_counter()
            m = tr.step()
            _sync()
            t1 = time.perf_counter()
            st = timeline_stages(tr.last_timeline)
            rec = {"step": i, "wall_s": t1 - t0, "trainer_step_s": m["timing_s/step"],
                   "rollout_s": m.get("timing_s/rollout"), "gen_s": m.get("timing_s/gen"),
                   "score_host_s": m.get("timing_s/score"),
                   "engine_host_s": m.get("timing_s/engine_host"),
                   "decode_steps": tr.engine.stats["decode_steps"], "prefill_steps": tr.engine.stats["prefill_steps"],
                   "decode_drains": m.get("perf/decode_drains"), "waiting_decode_steps": m.get("perf/waiting_decode_steps"),
                   "lagged_prefills": m.get("perf/lagged_prefills"),
                   "scorer_pages_evicted": m.get("oppo/scorer_pages_evicted"),
                   "train_s": m.get("timing_s/train", 0.0) + m.get("timing_s/sync_weights", 0.0),
                   "generated_tokens": tr.engine.stats["generated_tokens"],
                   "trained_tokens": m["response_length/mean"] * m["oppo/trained_sequences"],
                   "update_flop": update_flop(tr, m["oppo/trained_sequences"],
                                              m["response_length/mean"] * m["oppo/trained_sequences"], p["prompt_len"]),
                   "deferred": m["oppo/num_deferred"], "stale_finished": m["oppo/num_stale_finished"],
                   "preemptions": m["oppo/preemptions"], "chunk_size": m["oppo/chunk_size"],
                   "scorer_graph_captures": m.get("perf/scorer_graph_captures"),
                   "scorer_capture_s": m.get("perf/scorer_graph_capture_s"),
                   "scorer_graph_borrowed": m.get("perf/scorer_graph_borrowed"),
                   "hidden_fraction": m["oppo/hidden_fraction"], "alloc_retries": m.get("memory/alloc_retries"), **st,
                   # device seconds of the update's phases (old log-probs, actor, critic, optimizer)
                   "update_phases": {k[len("timing_s/update_"):]: v for k, v in m.items()
                                     if k.startswith("timing_s/update_")},
                   "busy": sampler.busy([(t0, t1)]), "timed": i >= args.warmup}
            steps.append(rec)
            if rec["timed"]:
                windows.append((t0, t1))
                tl = tr.last_timeline
                train_span = next((sp for sp in tl.spans if sp.lane == "train"), None)
                if train_span is not None:       # rollout (+ scoring tail) = step start .. train start
                    a, b = tl.t0 + train_span.start_s, tl.t0 + train_span.end_s
                    phase_windows["rollout"].append((t0, a))
                    phase_windows["train"].append((a, b))
            print(f"  [{mode}] step {i}{'' if rec['timed'] else ' (warm-up)'}: {rec['wall_s']:.2f} s, "
                  f"rollout {rec['rollout_s']:.2f}, not hidden scoring {st['exposed_score_s']:.2f}, "
                  f"train {rec['train_s']:.2f} ("
                  + ", ".join(f"{k} {v:.2f}" for k, v in rec["update_phases"].items())
                  + f"), {rec['generated_tokens']} tokens generated in {rec['decode_steps']} decode + "
                  f"{rec['prefill_steps']} prefill steps (engine host {rec['engine_host_s'] or 0:.2f} s, "
                  f"{rec['decode_drains']} drains, {rec['lagged_prefills']} lagged prefills, "
                  f"{rec['waiting_decode_steps']} decode steps with sequences waiting, "
                  f"{rec['scorer_pages_evicted']} scorer pages evicted), "
                  f"deferred {rec['deferred']}, busy {rec['busy']}, allocator retries {rec['alloc_retries']}, "
                  f"scorer graph captures {rec['scorer_graph_captures']} ({rec['scorer_capture_s'] or 0:.2f} s), "
                  f"borrowed {rec['scorer_graph_borrowed']}",
                  flush=True)
            if time.perf_counter() > deadline and windows and i + 1 < total:
                print(f"  [{mode}] time budget spent: stopping after {len(windows)} timed steps", flush=True)
                break
        if args.profile is not None and (args.profile == "all" or mode in args.profile.split(",")):
            profile_step(tr, mode, p, args)
        if png is not None:
            RENDERS.append(render_png(tr.last_timeline, png, work, f"PPO step {tr.last_timeline.step} ({mode}), "
                                      f"{p['workload']}: B={p['B']}, median {p['median']}, cap {p['cap']}"))
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    finally:
        tr.rollout.close()
        tr.metrics.close()
        del tr
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved() / 2 ** 30 if torch.cuda.is_available() else None
    timed = [s for s in steps if s["timed"]] or steps[-1:]
    step_s = _median([s["wall_s"] for s in timed])
    row = {
        "mode": mode, "steps_timed": len([s for s in steps if s["timed"]]), "setup_s": setup_s,
        "step_s": step_s, "step_s_mean": _mean([s["wall_s"] for s in timed]),
        "rollout_s": _median([s["rollout_s"] for s in timed]),
        "gen_s": _median([s["gen_s"] for s in timed]),
        "exposed_score_s": _median([s["exposed_score_s"] for s in timed]),
        "score_union_s": _median([s["score_union_s"] for s in timed]),
        "train_s": _median([s["train_s"] for s in timed]),
        "update_phases_s": {k: _median([s["update_phases"].get(k, 0.0) for s in timed])
                            for k in dict.fromkeys(k for s in timed for k in s["update_phases"])},
        "gen_tok_s": sum(s["generated_tokens"] for s in timed) / sum(s["wall_s"] for s in timed),
        "trained_tok_s": sum(s["trained_tokens"] for s in timed) / sum(s["wall_s"] for s in timed),
        "generated_tokens_per_step": _mean([s["generated_tokens"] for s in timed]),
        "trained_tokens_per_step": _mean([s["trained_tokens"] for s in timed]),
        "busy": sampler.busy(windows),
        "sm_busy": sampler.gpm_mean(windows),
        "sm_occupancy": sampler.gpm_mean(windows, "occupancy"),
        "tensor_active": sampler.gpm_mean(windows, "tensor"),
        # the same two, within the rollout (step start to the update) and within the update: where
        # the GPU's idle time is
        "busy_by_phase": {k: sampler.busy(w) for k, w in phase_windows.items()},
        "sm_busy_by_phase": {k: sampler.gpm_mean(w) for k, w in phase_windows.items()},
        "trace_busy": sum(s["trace_busy_s"] for s in timed) / sum(s["wall_s"] for s in timed),
        # the update's GEMM FLOPs by count over its measured time (fraction of the matmul rate: main)
        "update_flop_per_s": _median([s["update_flop"] / s["train_s"] for s in timed if s["train_s"] > 0]),
        "hidden_fraction": _mean([s["hidden_fraction"] for s in timed]),
        "deferred_mean": _mean([s["deferred"] for s in timed]),
        "stale_finished": sum(s["stale_finished"] for s in steps),
        "preemptions": sum(s["preemptions"] for s in steps),
        "peak_mem_gib": peak,
        "reserved_after_gib": reserved,     # left reserved once the trainer is gone (a leak would show)
        "steps": steps,
    }
    if png is not None:
        row["timeline_png"] = png.name
    if row["stale_finished"]:
        print(f"  [{mode}] warning: {row['stale_finished']} sequences were cut at the staleness limit "
              f"(--staleness-limit {args.staleness_limit}): fewer tokens than the other modes", flush=True)
    return row


# ---------------------------------------------------------------------------------------------- TRL
def trl_env() -> dict:
    """Environment in which ``import trl.experimental.ppo`` works: as is, or with the wheels under
    .whl/ installed (no index, no dependencies) into a folder put first on PYTHONPATH."""
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    probe = [sys.executable, "-c", "import trl.experimental.ppo, datasets"]
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return env
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        raise RuntimeError("trl is not importable and there are no wheels under .whl/ (see bench/trl_ppo_step.py)")
    target = Path(tempfile.gettempdir()) / "oppo_trl_site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(target), *map(str, wheels)]
    print("  installing", " ".join(w.name for w in wheels), "->", target, flush=True)
    subprocess.run(cmd, check=True)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env["PYTHONPATH"]])
    out = subprocess.run(probe, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"trl still not importable after installing .whl/: {out.stderr[-1500:]}")
    return env


def run_trl(p: dict, paths: dict, prompt_file: Path, work: Path, args, timeout: float) -> dict:
    out = work / "trl.json"
    cmd = [sys.executable, str(HERE / "trl_ppo_step.py"), "--actor", paths["actor"], "--reward", paths["reward"],
           "--critic", paths["critic"], "--prompts", str(prompt_file), "--batch", str(p["B"]),
           "--micro", str(p["micro"]), "--response-length", str(p["cap"]),
           "--steps", str(args.steps if args.trl_steps is None else args.trl_steps),
           "--warmup", str(args.warmup if args.trl_warmup is None else args.trl_warmup), "--dtype", args.dtype, "--lr", str(p["lr"]), "--out", str(out),
           "--device", args.device]
    try:
        env = trl_env()
        print("  $", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env=env, timeout=max(30.0, timeout)).returncode
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        return {"mode": "trl", "error": f"{type(e).__name__}: {e}"}
    if rc != 0 or not out.exists():
        return {"mode": "trl", "error": f"bench/trl_ppo_step.py exited with {rc}"}
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------- summary
def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def summarize(workloads: dict) -> dict:
    by = {}
    for w, entry in workloads.items():
        rows = {r["mode"]: r for r in entry["rows"] if r.get("step_s") is not None}
        d = {}
        none = rows.get("none")
        for m, r in rows.items():
            if none is not None and m != "none":
                d[f"speedup_{m}_vs_none"] = _ratio(none["step_s"], r["step_s"])
                # of the means too: on G none's step is bimodal (a batch reaching the length cap or
                # not), and with few timed steps the median and the mean tell different stories
                d[f"speedup_{m}_vs_none_mean"] = _ratio(none.get("step_s_mean"), r.get("step_s_mean"))
                # GPU busy fraction, the ratio: SM busy (NVML GPM, the fraction of SM time
                # with a warp resident) where both modes have it, else NVML utilization (the
                # fraction of time any kernel ran). The second counts a 1-SM decode kernel of
                # none's tail as fully busy (none reads 0.86-0.98 on G), so no mode could reach
                # 1.4x of it; it stays beside as kernel_active_ratio.
                kernel_active = _ratio(r.get("busy"), none.get("busy"))
                sm_busy = _ratio(r.get("sm_busy"), none.get("sm_busy"))
                d[f"busy_ratio_{m}_vs_none"] = sm_busy if sm_busy is not None else kernel_active
                d[f"busy_ratio_{m}_vs_none_source"] = ("nvml-gpm SM_UTIL" if sm_busy is not None else
                                                       "nvml utilization" if kernel_active is not None else None)
                d[f"kernel_active_ratio_{m}_vs_none"] = kernel_active
                d[f"sm_busy_ratio_{m}_vs_none"] = sm_busy
                d[f"sm_occupancy_ratio_{m}_vs_none"] = _ratio(r.get("sm_occupancy"), none.get("sm_occupancy"))
                d[f"tensor_active_ratio_{m}_vs_none"] = _ratio(r.get("tensor_active"), none.get("tensor_active"))
                d[f"gen_tok_s_ratio_{m}_vs_none"] = _ratio(r.get("gen_tok_s"), none.get("gen_tok_s"))
            if "trl" in rows and m != "trl":
                d[f"speedup_{m}_vs_trl"] = _ratio(rows["trl"]["step_s"], r["step_s"])
        d["step_s"] = {m: r["step_s"] for m, r in rows.items()}
        by[w] = d
    s = {"by_workload": by}
    g, t, i = by.get("G", {}), by.get("T", {}), by.get("I", {})
    s["speedup_full_vs_none"] = g.get("speedup_full_vs_none")
    s["speedup_full_vs_none_mean"] = g.get("speedup_full_vs_none_mean")
    s["busy_ratio_full_vs_none"] = g.get("busy_ratio_full_vs_none")
    s["busy_ratio_full_vs_none_source"] = g.get("busy_ratio_full_vs_none_source")
    s["kernel_active_ratio_full_vs_none"] = g.get("kernel_active_ratio_full_vs_none")
    s["sm_busy_ratio_full_vs_none"] = g.get("sm_busy_ratio_full_vs_none")
    s["sm_occupancy_ratio_full_vs_none"] = g.get("sm_occupancy_ratio_full_vs_none")
    s["tensor_active_ratio_full_vs_none"] = g.get("tensor_active_ratio_full_vs_none")
    s["speedup_full_vs_trl"] = t.get("speedup_full_vs_trl")
    s["speedup_none_vs_trl"] = t.get("speedup_none_vs_trl")
    s["speedup_full_vs_none_T"] = t.get("speedup_full_vs_none")
    s["speedup_inter_vs_none_I"] = i.get("speedup_inter_vs_none")
    s["speedup_full_vs_none_I"] = i.get("speedup_full_vs_none")
    return s


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save(path: Path, info: dict, workloads: dict, infos: dict | None = None) -> dict:
    """Write info + all workloads (this run's replace the file's of the same name) + summary.
    ``infos``: the run info of each workload (default: ``info`` for all of ``workloads``)."""
    old = _load(path)
    merged = {**old.get("workloads", {}), **workloads}
    infos = {**old.get("info_by_workload", {}), **(infos or {w: info for w in workloads})}
    payload = {"info": info, "info_by_workload": infos, "workloads": merged, "summary": summarize(merged)}
    write_json(path, payload)
    return payload


def print_rows(name: str, entry: dict) -> None:
    rows = [r for r in entry["rows"] if r.get("step_s") is not None]
    none = next((r for r in rows if r["mode"] == "none"), None)
    for r in rows:
        r["x_none"] = _ratio(none["step_s"], r["step_s"]) if none else None
    c = entry["config"]
    print(f"\nworkload {name}: B={c['B']}, prompts {c['prompt_len']}, lengths median {c['median']} cap {c['cap']} "
          f"(mean {c['target_len_mean']:.0f}), Δ={c['delta']}, dtype {c['dtype']}")
    print_table(rows, [("mode", "mode", "s"), ("step_s", "s/step", ".3f"), ("x_none", "x none", ".2f"),
                       ("gen_tok_s", "gen tok/s", ".0f"), ("rollout_s", "rollout s", ".2f"),
                       ("exposed_score_s", "scoring not hidden s", ".2f"), ("train_s", "train s", ".2f"),
                       ("update_frac_of_matmul", "update / matmul rate", ".2f"),
                       ("busy", "kernel active", ".2f"), ("sm_busy", "SM busy", ".2f"), ("sm_occupancy", "SM occ", ".2f"),
                       ("tensor_active", "tensor", ".2f"), ("trace_busy", "trace busy", ".2f"),
                       ("deferred_mean", "deferred", ".1f"), ("peak_mem_gib", "peak GiB", ".1f"),
                       ("steps_timed", "steps", "d")])
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:                     # where the idle time is, and what the update is made of
        bp, sp = r.get("busy_by_phase") or {}, r.get("sm_busy_by_phase") or {}
        ph = r.get("update_phases_s") or {}
        if bp or ph:
            print(f"  {r['mode']}: busy rollout {fmt(bp.get('rollout'))} / train {fmt(bp.get('train'))}, "
                  f"SM busy rollout {fmt(sp.get('rollout'))} / train {fmt(sp.get('train'))}; update phases (s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    for r in entry["rows"]:
        if r.get("error"):
            print(f"  {r['mode']}: {r['error']}")


def device_info(args) -> dict:
    import datetime as dt
    import platform
    import shlex
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])}
    if torch.cuda.is_available() and args.device != "cpu":
        pr = torch.cuda.get_device_properties(0)
        info.update(card=pr.name, sm_count=pr.multi_processor_count, memory_gib=round(pr.total_memory / 2 ** 30, 1))
    else:
        info.update(card="cpu", threads=torch.get_num_threads())
    info["commit"] = tree_commit()
    return info


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="G")
    ap.add_argument("--modes", default=None, help="comma-separated subset of none,intra,inter,full "
                                                  "(default: the workload's)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--trl", action="store_true", help="also time TRL's PPOTrainer (subprocess)")
    ap.add_argument("--trl-steps", type=int, default=None, help="timed TRL steps (default --steps)")
    ap.add_argument("--trl-warmup", type=int, default=None, help="TRL warm-up steps (default --warmup)")
    ap.add_argument("--out", default=None, help="JSON (default bench/results/ppo_step.json); PNGs go beside it")
    ap.add_argument("--tiny", action="store_true", help="tiny models and lengths (CPU, tests)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="trained models' weights: bf16 (engine shares them) or fp32 with bf16 autocast; the same "
                         "for TRL (policy/value weights; its ref/reward bf16)")
    ap.add_argument("--no-fallback", action="store_true", help="no retry with fp32 weights when a bf16 mode fails")
    ap.add_argument("--delta", type=int, default=None, help="fixed Δ of inter/full (default 16; tiny 2)")
    ap.add_argument("--chunk", type=int, default=None, help="initial chunk size C (default 64; tiny 4)")
    ap.add_argument("--fixed-chunk", action="store_true", help="keep C fixed (rollout.adaptive_chunk=false)")
    ap.add_argument("--staleness-limit", type=int, default=16,
                    help="high: no deferred sequence is cut, every mode decodes the same tokens")
    ap.add_argument("--old-logprob", choices=("recompute", "behaviour"), default="recompute")
    ap.add_argument("--score-below-batch", type=int, default=None,
                    help="intra/full: scorers launch before the flush only once at most this many sequences "
                         "decode (rollout.score_below_batch; default: whenever enough tokens are pending)")
    ap.add_argument("--keep-stale-kv", action="store_true",
                    help="rollout.keep_stale_kv: deferred sequences keep their actor KV across the weight "
                         "update (no recompute; approximate)")
    ap.add_argument("--micro-tokens", type=int, default=None,
                    help="ppo.micro_batch_tokens of our modes (default 16384; TRL keeps --micro 16 sequences)")
    ap.add_argument("--median", type=float, default=None)
    ap.add_argument("--cap", type=int, default=None)
    ap.add_argument("--sigma", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--scorer-device", default=None,
                    help="place the scorers (reward, reference, critic copy) on this device, e.g. cuda:1 "
                         "(run.scorer_device; default beside the actor). TRL runs on one GPU: compare with care")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "oppo_bench_models"))
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget of the run: modes stop early / are skipped once it is spent")
    ap.add_argument("--profile", nargs="?", const="all", default=None, metavar="MODES",
                    help="after the timed steps of each mode (or of the comma-separated MODES only), one more "
                         "step under torch.profiler (tables to a .txt, the trace to a .json.gz). A step of none "
                         "on G takes minutes to write: --profile full")
    ap.add_argument("--merge", nargs="+", default=None, help="join the workloads of these JSON files into --out")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else HERE / "results" / "ppo_step.json"

    if args.merge:
        workloads, info, infos = {}, {}, {}
        for f in args.merge:      # each workload keeps the info (card, date, command) of its own run
            d = _load(Path(f))
            workloads.update(d.get("workloads", {}))
            info = d.get("info", info)
            for w in d.get("workloads", {}):
                infos[w] = d.get("info_by_workload", {}).get(w, d.get("info", {}))
            for png in Path(f).parent.glob("ppo_step_*timeline.png"):
                if png.parent.resolve() != out.parent.resolve():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(png, out.parent / png.name)
        payload = save(out, info, workloads, infos)
        print(json.dumps({k: v for k, v in payload["summary"].items() if k != "by_workload"}, indent=1))
        return payload

    if args.tiny:          # tiny models: threads only contend (also in the TRL subprocess)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    wl = WORKLOADS[args.workload]
    p = dict(TINY if args.tiny else FULL)
    p.update(workload=args.workload, median=wl["median"], cap=wl["cap"])
    if args.tiny:
        p.update(median=TINY["median"], cap=TINY["cap"])
    for k in ("median", "cap", "sigma", "delta", "chunk", "micro_tokens"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else list(wl["modes"])
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; choose from {MODES}")
    if args.device == "cpu" or not torch.cuda.is_available():
        args.dtype = "fp32"
    args.ours_dtype = args.dtype
    info = device_info(args)
    print(f"ppo_step: workload {args.workload} ({wl['about']}), modes {modes}{' + TRL' if args.trl else ''}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, card {info['card']}", flush=True)

    paths = ensure_models(args.cache_dir, p["shape"], p["vocab"], p["max_pos"])
    work = Path(tempfile.mkdtemp(prefix="oppo_ppo_step_"))
    n_prompts = p["B"] * (args.warmup + args.steps + 2) + p["delta"] * 4
    prompt_file = write_prompts(work / "prompts.jsonl", max(n_prompts, p["B"] * 4), p["prompt_len"], p["vocab"],
                                p["median"], p["sigma"], p["cap"])
    lens = [json.loads(line)["target_len"] for line in open(prompt_file)]
    config = {k: v for k, v in p.items() if k != "workload"}
    config.update(steps=args.steps, warmup=args.warmup, dtype=args.dtype, ours_dtype=args.ours_dtype, old_logprob=args.old_logprob,
                  score_below_batch=args.score_below_batch, keep_stale_kv=args.keep_stale_kv,
                  staleness_limit=args.staleness_limit, adaptive_chunk=not args.fixed_chunk, tiny=args.tiny,
                  target_len_mean=sum(lens) / len(lens), target_len_max=max(lens),
                  first_batch_max=max(lens[:p["B"]]), num_prompts=len(lens),
                  trl_response_length=p["cap"] if args.trl else None, scorer_device=args.scorer_device)
    entry = {"config": config, "rows": []}
    sampler = BusySampler()
    config["busy_source"] = sampler.source
    config["sm_busy_source"] = sampler.sm_source
    if torch.cuda.is_available() and args.device != "cpu" and not args.tiny:
        config["matmul_flop_per_s"] = matmul_flops()      # the update's ceiling, measured in this run
    order = [m for m in ("none", "full") if m in modes] + (["trl"] if args.trl else []) + \
        [m for m in modes if m not in ("none", "full")]
    rows = {}
    need = 0.0           # seconds the shortest useful run (set-up, warm-up, one timed step) took so far
    try:
        for m in order:
            left = deadline - time.perf_counter()
            if left <= 0 or (m != "trl" and left < 0.5 * need):
                print(f"  {m}: skipped, the time budget (--budget-s {args.budget_s:.0f}) is spent "
                      f"({left:.0f} s left)", flush=True)
                rows[m] = {"mode": m, "error": "skipped: time budget spent"}
            elif m == "trl":
                print(f"== trl (TRL {p['cap']}-token responses)", flush=True)
                rows[m] = run_trl(p, paths, prompt_file, work, args, timeout=left + 60)
                if rows[m].get("error"):
                    print(f"  trl: {rows[m]['error']}", flush=True)
            else:
                print(f"== {m}", flush=True)
                png = out.parent / f"ppo_step_{args.workload}_{m}_timeline.png" if m in ("none", "full") else None
                try:
                    rows[m] = run_mode(m, p, paths, prompt_file, work, args, sampler, png, deadline)
                except Exception as e:  # noqa: BLE001  (one failing mode must not lose the others)
                    import traceback
                    traceback.print_exc()
                    rows[m] = {"mode": m, "error": f"{type(e).__name__}: {e}"}
                    if args.ours_dtype == "bf16" and not args.no_fallback:
                        # bf16 training weights shared with the engine is the less travelled path:
                        # fall back (this mode and the rest) to fp32 weights + bf16 autocast
                        print(f"  [{m}] failed with bf16 weights; this and later modes run with fp32 weights "
                              f"(bf16 autocast, bf16 engine copy)", flush=True)
                        args.ours_dtype = config["ours_dtype"] = "fp32"
                        config["bf16_error"] = rows[m]["error"]
                        try:
                            rows[m] = run_mode(m, p, paths, prompt_file, work, args, sampler, png, deadline)
                        except Exception as e2:  # noqa: BLE001
                            traceback.print_exc()
                            rows[m] = {"mode": m, "error": f"{type(e2).__name__}: {e2}"}
                rows[m]["dtype"] = args.ours_dtype
                if rows[m].get("step_s") is not None:
                    need = max(need, rows[m]["setup_s"] + (args.warmup + 1) * rows[m]["step_s"])
            for r in rows.values():
                if r.get("update_flop_per_s") and config.get("matmul_flop_per_s"):
                    r["update_frac_of_matmul"] = r["update_flop_per_s"] / config["matmul_flop_per_s"]
            entry["rows"] = [rows[k] for k in ("none", "intra", "inter", "full", "trl") if k in rows]
            entry["wall_s"] = time.perf_counter() - t_start
            save(out, info, {args.workload: entry})
    finally:
        sampler.close()
        wait_renders()
        shutil.rmtree(work, ignore_errors=True)
    print_rows(args.workload, entry)
    payload = save(out, info, {args.workload: entry})
    summ = {k: v for k, v in payload["summary"].items() if k != "by_workload"}
    print("summary:", json.dumps(summ))
    print("workload summary:", json.dumps(payload["summary"]["by_workload"][args.workload]))
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
