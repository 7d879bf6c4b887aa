"""Seconds per PPO step of TRL's PPOTrainer (``trl.experimental.ppo``, TRL 1.12.0): the baseline
of bench/ppo_step.py --trl, which runs this script in a subprocess on the same model directories
(policy and reference = actor, reward, value = critic) and the same prompt file.

One step = ``batch`` prompts (per_device_train_batch_size = micro, gradient_accumulation_steps =
batch / micro, one mini-batch, one PPO epoch), ``response_length`` new tokens per prompt with no
stop token (TRL decodes the whole batch for the longest response; with a stop token HF generate
still runs the batch until its longest row ends, and TRL trains on the padded [batch, prompt +
response_length] tensors either way), temperature 1, local_rollout_forward_batch_size = batch
(the whole batch generated at once). Weights: --dtype bf16 loads all four models in bf16;
fp32 keeps the policy and value model in fp32 (bf16 autocast) and the reference and reward in
bf16, as oppo_runtime's trainer does. A callback times each step (CUDA-synchronized); wrappers
around TRL's module-level ``batch_generation`` and ``forward`` split it into generation, scoring
(reference, value, reward forwards + GAE) and training.

    python bench/trl_ppo_step.py --actor DIR --reward DIR --critic DIR --prompts FILE.jsonl --out X.json

Needs trl, datasets, dill, multiprocess (ppo_step.py installs them from .whl/ where absent).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(args):
    """(trainer, timer) ready to train warmup + steps steps."""
    import trl.experimental.ppo.ppo_trainer as _trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    cuda = torch.cuda.is_available() and args.device != "cpu"
    total = args.warmup + args.steps
    prompts = [json.loads(line)["prompt_ids"] for line in open(args.prompts) if line.strip()]
    if len(prompts) < args.batch:
        raise ValueError(f"{args.prompts}: {len(prompts)} prompts, fewer than --batch {args.batch}")
    prompts = prompts[:args.batch * total] if len(prompts) >= args.batch * total else prompts
    tok = AutoTokenizer.from_pretrained(args.actor, padding_side="left")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    ds = Dataset.from_dict({"input_ids": prompts})
    if args.batch % args.micro:
        raise ValueError(f"--batch {args.batch} must be a multiple of --micro {args.micro}")
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_ppo_step_"), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.batch // args.micro, total_episodes=args.batch * total,
        response_length=args.response_length, num_ppo_epochs=1, num_mini_batches=1,
        local_rollout_forward_batch_size=args.batch, per_device_eval_batch_size=args.batch,
        learning_rate=args.lr, num_sample_generations=0, stop_token=None, temperature=1.0, kl_coef=0.02,
        vf_coef=0.5, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, missing_eos_penalty=None,
        report_to="none", bf16=cuda, use_cpu=not cuda, seed=0, logging_steps=1, save_strategy="no",
        disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0)
    frozen = torch.bfloat16 if cuda else torch.float32
    trained = torch.bfloat16 if (cuda and args.dtype == "bf16") else torch.float32
    load = AutoModelForCausalLM.from_pretrained
    score = AutoModelForSequenceClassification.from_pretrained
    policy, ref = load(args.actor, dtype=trained), load(args.actor, dtype=frozen)
    value, reward = score(args.critic, num_labels=1, dtype=trained), score(args.reward, num_labels=1, dtype=frozen)
    for m in (policy, ref):
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = tok.pad_token_id

    timer = _Timer(TrainerCallback)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds, callbacks=[timer.callback])
    timer.wrap(_trl, trainer)
    return trainer, timer


class _Timer:
    """Per-step wall times from TRL's callbacks plus generation/training boundaries from wrappers."""

    def __init__(self, callback_cls):
        timer = self
        self.steps: list[dict] = []
        self.cur: dict = {}
        self.t = None

        class Cb(callback_cls):
            def on_train_begin(self, args, state, control, **kw):
                _sync()
                timer.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                now = time.perf_counter()
                c = timer.cur
                g0, g1 = c.get("gen", (timer.t, timer.t))
                tr = c.get("train_start", now)
                timer.steps.append({"step": len(timer.steps), "wall_s": now - timer.t, "gen_s": g1 - g0,
                                    "score_s": tr - g1, "train_s": now - tr, "t0": timer.t, "t1": now})
                print(f"  [trl] step {len(timer.steps) - 1}: {now - timer.t:.2f} s (generate {g1 - g0:.2f}, "
                      f"score {tr - g1:.2f}, train {now - tr:.2f})", flush=True)
                timer.cur, timer.t = {}, now

        self.callback = Cb()

    def wrap(self, mod, trainer):
        orig_gen, orig_fwd = mod.batch_generation, mod.forward
        cur = lambda: self.cur  # noqa: E731

        def batch_generation(*a, **k):
            _sync()
            t0 = time.perf_counter()
            out = orig_gen(*a, **k)
            _sync()
            cur()["gen"] = (t0, time.perf_counter())
            return out

        def forward(model, *a, **k):
            if model is trainer.model and "train_start" not in cur():
                _sync()
                cur()["train_start"] = time.perf_counter()
            return orig_fwd(model, *a, **k)

        mod.batch_generation, mod.forward = batch_generation, forward
        self.unwrap = lambda: (setattr(mod, "batch_generation", orig_gen), setattr(mod, "forward", orig_fwd))


def run(args) -> dict:
    from ppo_step import BusySampler

    cuda = torch.cuda.is_available() and args.device != "cpu"
    t0 = time.perf_counter()
    trainer, timer = build(args)
    setup_s = time.perf_counter() - t0
    sampler = BusySampler() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    finally:
        if sampler is not None:
            sampler.close()
    timed = timer.steps[args.warmup:] or timer.steps[-1:]
    med = lambda k: statistics.median(s[k] for s in timed)  # noqa: E731
    tokens = args.batch * args.response_length
    import trl
    return {
        "mode": "trl", "trl_version": trl.__version__, "steps_timed": len(timer.steps[args.warmup:]),
        "setup_s": setup_s, "step_s": med("wall_s"), "step_s_mean": sum(s["wall_s"] for s in timed) / len(timed),
        "rollout_s": statistics.median(s["gen_s"] + s["score_s"] for s in timed), "gen_s": med("gen_s"),
        "exposed_score_s": med("score_s"), "train_s": med("train_s"),
        "gen_tok_s": tokens * len(timed) / sum(s["wall_s"] for s in timed),
        "generated_tokens_per_step": tokens, "trained_tokens_per_step": tokens,
        "busy": sampler.busy([(s["t0"], s["t1"]) for s in timed]) if sampler else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "config": {"response_length": args.response_length, "batch": args.batch, "micro": args.micro,
                   "dtype": args.dtype if cuda else "fp32", "stop_token": None,
                   "local_rollout_forward_batch_size": args.batch},
        "steps": [{k: v for k, v in s.items() if k not in ("t0", "t1")} for s in timer.steps],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actor", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--critic", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL with prompt_ids (bench/ppo_step.py writes it)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    row = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(f"trl: {row['step_s']:.3f} s/step (median of {row['steps_timed']}), peak {row['peak_mem_gib']} GiB")


if __name__ == "__main__":
    main()
