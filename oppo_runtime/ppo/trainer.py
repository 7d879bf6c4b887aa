"""The PPO trainer: rollout (engine + scorers, overlapped) -> advantages -> PPO epochs -> new weights.

Overlap modes (``run.overlap``), which share all code but the schedule:
  none   generate all B, then score all B (the sequential baseline);
  intra  the scorers prefill chunks while the actor decodes;
  inter  overcommit: B+Δ prompts in flight, train the first B finished, defer the rest;
  full   intra + inter.
Deferred sequences keep their tokens, behaviour log-probs and policy versions; their actor KV is
recomputed under the new weights (``rollout.keep_stale_kv`` keeps it), critic values are
recomputed when they are finally scored, reward and reference KV are kept (frozen models).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..engine import ActorEngine, EngineConfig, SamplingParams, Sequence, SeqStatus
from ..engine.rollout import Rollout, ScoredSequence
from ..engine.runner import _Staging
from ..engine.scorer import RuleReward, Scorer
from ..engine.timeline import Timeline
from ..memory import PagePool
from ..models import DenseContext, build_model, load_model, load_tokenizer
from . import core_algos as algo
from .checkpoint import load_latest, save_checkpoint
from .config import TrainConfig
from .controllers import ChunkSizeController, DeltaController
from .default_task import case_reward, default_prompts, ensure_default_models
from .metrics import MetricsLogger, StageTimer, plot_reward_curve

__all__ = ["PPOTrainer"]

log = logging.getLogger("oppo_runtime.ppo")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _device(spec: str, key: str = "run.device") -> torch.device:
    d = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key}={spec!r} but CUDA is not available")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise RuntimeError(f"{key}={spec!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())     # "cuda" and "cuda:0" compare equal
    return d


def micro_batches(idx: list[int], seq_tokens: list[int], size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split the sequences ``idx`` into micro-batches of similar length and bounded tokens.

    Sorted by length, then packed greedily. With ``max_tokens`` (``ppo.micro_batch_tokens``) a
    micro-batch holds up to that many tokens, however many sequences that is: few large
    micro-batches keep the GPU busy (each forward is launch-bound below a few thousand tokens).
    Without it, up to ``size`` sequences and a token budget of ``size`` x the mean length of
    ``idx``: every micro-batch holds about as many tokens as an average fixed-size one, so the
    long tail of responses does not land in one micro-batch whose activations dwarf the others.
    A sequence longer than the budget forms its own micro-batch. The loss weights are per token
    (or per sequence), so the split does not change the update."""
    if not idx:
        return []
    order = sorted(idx, key=lambda i: seq_tokens[i])
    if max_tokens is not None:
        size, budget = len(idx), max_tokens
    else:
        budget = size * sum(seq_tokens[i] for i in idx) / len(idx)
    out, cur, cur_tokens = [], [], 0
    for i in order:
        if cur and (len(cur) >= size or cur_tokens + seq_tokens[i] > budget):
            out.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += seq_tokens[i]
    out.append(cur)
    return out


UPDATE_LANE = "update"


class _Phases:
    """Phases of the PPO update as spans of the timeline's "update" lane: CUDA events on the
    current stream (no sync; resolved with the step's timeline), the host clock on the CPU. One
    phase is open at a time (begin() ends the open one); `phase` in the span's args names it for
    the metrics."""

    def __init__(self, tl: Timeline | None):
        self.tl, self.open, self.rf = tl, None, None

    def begin(self, phase: str, name: str) -> None:
        if self.tl is None:
            return
        self.end()
        self.open = name
        self.tl.cuda_span_begin(UPDATE_LANE, name, phase=phase, kind="train")
        # the same range for torch.profiler (ppo_step --profile; bench/trace_phases.py sums its kernels)
        self.rf = torch.profiler.record_function(f"update/{phase}")
        self.rf.__enter__()

    def end(self) -> None:
        if self.open is not None:
            self.tl.cuda_span_end(UPDATE_LANE, self.open)
            self.open = None
            self.rf.__exit__(None, None, None)
            self.rf = None

    @contextlib.contextmanager
    def __call__(self, phase: str, name: str):
        self.begin(phase, name)
        try:
            yield
        finally:
            self.end()


def _copy_for_engine(model, dtype, kind, device=None):
    """A copy of a training model in the engine's dtype, on ``device`` (default: the model's);
    weights are copied in at each update."""
    clone = build_model(model.config, kind, dtype=dtype, device=device or next(model.parameters()).device)
    clone.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    return clone.eval().requires_grad_(False)


class PPOTrainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        run, r, m = cfg.run, cfg.rollout, cfg.model
        torch.manual_seed(run.seed)
        self.device = _device(run.device)
        # scorers beside the actor (one page pool), or placed on a device of their own with their own pool
        self.scorer_device = self.device if run.scorer_device is None else _device(run.scorer_device,
                                                                                   "run.scorer_device")
        # a second GPU of the scorers: its own timeline clock and its own peak memory
        self.scorer_gpu = self.scorer_device if (self.scorer_device.type == "cuda"
                                                 and self.scorer_device != self.device) else None
        self.out_dir = Path(run.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        train_dtype = _DTYPES[m.dtype]
        eng_dtype = (torch.bfloat16 if self.device.type == "cuda" else train_dtype) if m.engine_dtype == "auto" \
            else _DTYPES[m.engine_dtype]
        self.autocast = self.device.type == "cuda" and train_dtype == torch.float32
        self.acc = torch.float64 if train_dtype == torch.float64 else torch.float32   # loss arithmetic

        # ---------------------------------------------------------------- models
        default = m.actor_path is None
        paths = ensure_default_models(run.cache_dir, seed=run.seed) if default else {}
        actor_path = m.actor_path or paths["actor"]
        reward_path = m.reward_path or paths.get("reward")
        critic_path = m.critic_path or reward_path
        self.tokenizer = load_tokenizer(actor_path)
        self.skipped = 0
        self.prompts = (default_prompts(r.num_prompts, seed=run.seed, max_len=r.max_new_tokens) if r.prompt_file is None
                        else self._load_prompts(r.prompt_file))
        if len(self.prompts) < r.batch_size:
            raise ValueError(f"{r.prompt_file}: {len(self.prompts)} usable prompts, fewer than rollout.batch_size={r.batch_size}")
        if reward_path is None and not default:
            raise ValueError("no reward: give model.reward_path (a *ForSequenceClassification directory), "
                             "or leave model.actor_path unset for the embedded default task and its rule reward")
        max_len = max(len(p["prompt_ids"]) for p in self.prompts) + r.max_new_tokens + 1
        self.actor = load_model(actor_path, "causal_lm", train_dtype, self.device, max_model_len=max_len)
        self.actor.gradient_checkpointing = m.gradient_checkpointing
        if max_len > self.actor.config.max_position_embeddings:
            raise ValueError(f"the longest prompt plus rollout.max_new_tokens needs {max_len} positions; "
                             f"{actor_path} has a context of {self.actor.config.max_position_embeddings}")
        if critic_path is not None:
            self.critic = load_model(critic_path, "score", train_dtype, self.device, max_model_len=max_len)
        else:
            self.critic = load_model(actor_path, "score", train_dtype, self.device, allow_new_head=True,
                                     seed=run.seed, max_model_len=max_len)
        self.critic.gradient_checkpointing = m.gradient_checkpointing
        sdev = self.scorer_device
        ref = load_model(m.reference_path or actor_path, "causal_lm", eng_dtype, sdev, max_model_len=max_len)
        reward = load_model(reward_path, "score", eng_dtype, sdev, max_model_len=max_len) if reward_path else None
        for frozen in (ref, reward):
            if frozen is not None:
                frozen.eval().requires_grad_(False)
        self.share_actor = eng_dtype == train_dtype
        # placed apart (run.scorer_device set), the critic scorer reads an inference copy, synced after each update
        self.share_critic = self.share_actor and run.scorer_device is None
        self.engine_actor = self.actor if self.share_actor else _copy_for_engine(self.actor, eng_dtype, "causal_lm")
        self.engine_critic = self.critic if self.share_critic else _copy_for_engine(self.critic, eng_dtype, "score",
                                                                                    sdev)
        if self.tokenizer.vocab_size > self.actor.config.vocab_size:
            raise ValueError(f"tokenizer of {actor_path} has {self.tokenizer.vocab_size} tokens, the model "
                             f"{self.actor.config.vocab_size}")

        # ---------------------------------------------------------------- pool, engine, scorers
        scoring = {"critic": self.engine_critic, "ref": ref}
        if reward is not None:
            scoring["reward"] = reward
        if run.scorer_device is None:
            self.pool = self._make_pool([self.engine_actor, *scoring.values()], max_len, self.device)
            self.scorer_pool = self.pool
        else:
            self.pool = self._make_pool([self.engine_actor], max_len, self.device)
            self.scorer_pool = self._make_pool(list(scoring.values()), max_len, sdev)
            log.info("placement: actor and training on %s (%d KV pages), scorers on %s (%d KV pages of their own)",
                     self.device, self.pool.num_pages, sdev, self.scorer_pool.num_pages)
        inter = run.overlap in ("inter", "full")
        self.engine = ActorEngine(self.engine_actor, self.pool, EngineConfig(
            max_num_seqs=r.batch_size + (r.delta_max if inter else 0), max_num_batched_tokens=r.max_num_batched_tokens,
            max_model_len=max_len, chunk_size=r.chunk_size, seed=run.seed), eos_token_id=self.tokenizer.eos_token_id)
        self.engine.warmup()      # every decode graph now, not inside the first steps' rollouts
        scorers = []
        if reward is not None:
            scorers.append(Scorer("reward", reward, self.scorer_pool, "reward", max_model_len=max_len,
                                  max_num_batched_tokens=r.max_num_batched_tokens))
        scorers.append(Scorer("critic", self.engine_critic, self.scorer_pool, "critic", max_model_len=max_len,
                              max_num_batched_tokens=r.max_num_batched_tokens))
        scorers.append(Scorer("ref", ref, self.scorer_pool, "reference", max_model_len=max_len,
                              max_num_batched_tokens=r.max_num_batched_tokens, temperature=r.temperature))
        self.scorers = {s.name: s for s in scorers}
        rule = RuleReward(case_reward, self.tokenizer, name="rule") if default else None
        self.rollout = Rollout(self.engine, scorers, rule, overlap=run.overlap in ("intra", "full"),
                               score_below_batch=cfg.rollout.score_below_batch)
        self.sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                       max_new_tokens=r.max_new_tokens)

        # ---------------------------------------------------------------- optim, control
        o = cfg.optim
        # CUDA: the fused AdamW (one multi-tensor kernel per step: ~1e9 parameters read and written
        # once instead of by ~8 foreach passes); same update rule
        fused = self.device.type == "cuda"
        self.opt_actor = torch.optim.AdamW(self.actor.parameters(), lr=o.actor_lr, betas=o.betas,
                                           weight_decay=o.weight_decay, fused=fused)
        self.opt_critic = torch.optim.AdamW(self.critic.parameters(), lr=o.critic_lr, betas=o.betas,
                                            weight_decay=o.weight_decay, fused=fused)
        self.sched_actor = torch.optim.lr_scheduler.LambdaLR(self.opt_actor, self._lr_lambda)
        self.sched_critic = torch.optim.lr_scheduler.LambdaLR(self.opt_critic, self._lr_lambda)
        self.delta_ctl = DeltaController(r.delta_init if inter else 0, r.delta_min if inter else 0,
                                         r.delta_max if inter else 0, window=r.delta_window)
        # the cost model is about hiding scorer work under decode on a GPU; on the CPU both share
        # the same cores, nothing hides, and C stays as configured
        self.chunk_ctl = ChunkSizeController(r.chunk_size, adaptive=r.adaptive_chunk and self.device.type == "cuda"
                                             and run.overlap in ("intra", "full"),
                                             trial_every=r.chunk_trial_every, trial_margin=r.chunk_trial_margin)
        self.step_idx = 0
        self.version = 0
        self.next_prompt = 0
        self.trained_keys: list[int] = []     # sample keys of trained sequences (conservation checks)
        resumed_from = self._resume() if resume else None
        self.metrics = MetricsLogger(self.out_dir, tensorboard=run.tensorboard,
                                     truncate_after=(self.step_idx - 1) if resumed_from else None)
        log.info("backends: engine dtype %s, training dtype %s, device %s, shared weights: %s",
                 eng_dtype, train_dtype, self.device, self.share_actor)

    # ------------------------------------------------------------------ setup helpers
    def _load_prompts(self, path: str) -> list[dict]:
        """JSONL prompts, tokenized with the actor's tokenizer; too long ones name their line."""
        import json

        r, out = self.cfg.rollout, []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                d = json.loads(line)
                ids = d.get("prompt_ids") or self.tokenizer.encode(d["prompt"])
                if not ids:
                    raise ValueError(f"{path}:{n}: empty prompt")
                if len(ids) > r.max_prompt_len:
                    msg = f"{path}:{n}: prompt of {len(ids)} tokens is longer than rollout.max_prompt_len={r.max_prompt_len}"
                    if self.cfg.run.nan_policy != "skip":
                        raise ValueError(msg + " (run.nan_policy=skip drops such prompts)")
                    log.warning("%s: skipped", msg)
                    self.skipped += 1
                    continue
                out.append({"prompt_ids": list(ids), "text": d.get("prompt", ""), "target_len": d.get("target_len")})
        return out

    def _make_pool(self, models: list, max_len: int, device: torch.device) -> PagePool:
        """One page pool on ``device`` for the KV of ``models``: rollout.pool_pages pages, else
        rollout.memory_fraction of the device's free memory (CUDA), else enough for every
        sequence in flight at its longest (CPU)."""
        r = self.cfg.rollout
        pages = r.pool_pages
        if pages is None and device.type != "cuda":
            pages = (r.batch_size + r.delta_max) * -(-max_len // r.tokens_per_page) * len(models) + 8
        return PagePool.for_models(models, device, r.tokens_per_page, pages, r.memory_fraction)

    def _lr_lambda(self, step: int) -> float:
        o, total = self.cfg.optim, self.cfg.run.total_steps
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        frac = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        if o.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    # ------------------------------------------------------------------ prompts
    def _prompt(self, i: int) -> dict:
        n = len(self.prompts)
        epoch, j = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.run.seed * 1000 + epoch))
        return self.prompts[int(perm[j])]

    def _admit(self, count: int) -> None:
        if count <= 0:
            return
        items = [self._prompt(self.next_prompt + k) for k in range(count)]
        keys = list(range(self.next_prompt, self.next_prompt + count))
        self.next_prompt += count
        tl = [it["target_len"] for it in items] if self.cfg.rollout.use_target_lens else None
        if tl is not None and any(t is None for t in tl):
            tl = None if all(t is None for t in tl) else [t if t is not None else self.cfg.rollout.max_new_tokens
                                                          for t in tl]
        self.rollout.submit([it["prompt_ids"] for it in items], self.sampling, target_lens=tl, sample_keys=keys,
                            metas=[{"text": it["text"]} for it in items])

    def _enforce_staleness(self) -> int:
        """Sequences whose oldest token would be more than K versions old when trained next."""
        r = self.cfg.rollout
        n = 0
        for seq in list(self.rollout.in_flight.values()):
            if seq.is_finished or not seq.versions:
                continue
            if self.version + 1 - min(seq.versions) > r.staleness_limit:
                n += 1
                if r.stale_policy == "finish":
                    self.engine.finish_now(seq, "stale")
                else:
                    self.engine.scheduler.finish(seq)
                    for s in self.scorers.values():
                        s.release(seq.seq_id)
                    seq.output_ids.clear(), seq.logprobs.clear(), seq.versions.clear()
                    seq.num_cached_tokens = seq.num_emitted = 0
                    seq.status, seq.finish_reason = SeqStatus.WAITING, None
                    self.engine.resume(seq)
        return n

    # ------------------------------------------------------------------ the step
    def train(self) -> dict:
        run = self.cfg.run
        bar = None
        if run.progress:
            from tqdm import tqdm
            bar = tqdm(total=run.total_steps, initial=self.step_idx, desc="ppo", unit="step", dynamic_ncols=True)
        last = {}
        while self.step_idx < run.total_steps:
            last = self.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{last['objective/scores']:.3f}", kl=f"{last['objective/kl']:.3f}")
            if self.step_idx % run.save_every == 0 or self.step_idx == run.total_steps:
                self.save()
        if bar is not None:
            bar.close()
        self.metrics.close()
        plot_reward_curve(self.out_dir / "metrics.jsonl", self.out_dir / "reward_curve.png",
                          title=f"oppo train ({run.overlap})")
        return last

    def step(self) -> dict:
        cfg, r = self.cfg, self.cfg.rollout
        timer = StageTimer()
        tl = Timeline(step=self.step_idx)
        tl.mark_reference()
        if self.scorer_gpu is not None:
            tl.mark_reference(torch.cuda.current_stream(self.scorer_gpu))
        self.rollout.timeline = tl
        self.rollout.reset_stats()
        self.engine.reset_stats()
        t_step = time.perf_counter()
        preempt0 = self.engine.scheduler.num_preemptions
        graphs0 = self._scorer_graph_stats()
        B = r.batch_size
        delta = self.delta_ctl.delta
        stale = self._enforce_staleness()
        self._admit(B + delta - len(self.rollout.in_flight))
        with timer("rollout"):
            results = self.rollout.collect(B)
        results = self._check_results(results)
        if r.release_pool_in_training:
            keep = [o for o in self.pool.owners() if o[1] in self.rollout.in_flight]
            self.pool.release(keep=keep)
        with tl.span("train", "train"), timer("train"):
            stats = self._update(results, tl)
        if r.release_pool_in_training:
            self.pool.reacquire()
        self.version += 1
        with timer("sync_weights"):
            self._sync_weights()
        tl.resolve()
        # device seconds of each phase of the update (the "update" lane: CUDA events on the
        # training stream, host clock on the CPU), to see what the train time is made of
        phases = {}
        for sp in tl.spans:
            if sp.lane == UPDATE_LANE:
                key = sp.args.get("phase", sp.name)
                phases[key] = phases.get(key, 0.0) + sp.duration_s

        # ---------------------------------------------------------------- metrics
        lens = [len(x.seq.output_ids) for x in results]
        scores = [self._total_score(x) for x in results]
        es = self.engine.stats
        chunk_metrics = self.chunk_ctl.metrics()       # the C this step ran with, before choosing the next
        mean_batch = es["generated_tokens"] / max(1, es["decode_steps"] + es["prefill_steps"])
        self.chunk_ctl.update(self.rollout.stats["actor_s"], es["decode_steps"] + es["prefill_steps"], mean_batch,
                              self.rollout.scorer_calls, num_scorers=len(self.rollout.scorers),
                              rollout_s=timer.seconds()["rollout"])
        self.rollout.set_chunk_size(self.chunk_ctl.chunk_size)
        new_delta = self.delta_ctl.update(sum(scores) / len(scores)) if scores else delta
        step_s = time.perf_counter() - t_step
        total_tokens = sum(len(x.seq.prompt_ids) + len(x.seq.output_ids) for x in results)
        versions = [v for x in results for v in x.seq.versions]
        metrics = {
            **stats,
            "response_length/mean": sum(lens) / len(lens) if lens else 0.0,
            "response_length/max": max(lens) if lens else 0,
            **chunk_metrics,
            "oppo/delta": delta,
            "oppo/next_delta": new_delta,
            "oppo/num_deferred": len(self.rollout.in_flight),
            "oppo/num_stale_finished": stale,
            "oppo/staleness_max": max((self.version - 1 - v for v in versions), default=0),
            **{f"oppo/staleness_lag{k}_frac": sum(1 for v in versions if self.version - 1 - v == k) / max(1, len(versions))
               for k in range(r.staleness_limit + 1)},
            "oppo/hidden_fraction": tl.hidden_fraction(),
            "oppo/skipped_sequences": self.skipped,
            "oppo/preemptions": self.engine.scheduler.num_preemptions - preempt0,
            # chunk-prefill graphs the scorers captured in this step (a new shape bucket: two eager
            # runs and a capture, inside the step) and the host seconds that took
            **{f"perf/scorer_graph_{k}": v - graphs0[k] for k, v in self._scorer_graph_stats().items()},
            "timing_s/step": step_s,
            "timing_s/gen": self.rollout.stats["actor_s"],
            "timing_s/score": self.rollout.stats["score_s"],
            "timing_s/engine_host": es["host_s"],
            "perf/wasted_decode_rows": es["wasted_rows"],
            "perf/decode_drains": es["drains"],
            "perf/lagged_prefills": es["lagged_prefills"],
            "perf/waiting_decode_steps": es["waiting_decode_steps"],
            "oppo/scorer_pages_evicted": self.rollout.stats["scorer_pages_evicted"],
            **timer.metrics(),
            **{f"timing_s/update_{k}": v for k, v in phases.items()},
            "perf/throughput": total_tokens / step_s,
            "perf/gen_throughput": es["generated_tokens"] / max(self.rollout.stats["actor_s"], 1e-9),
            **self._memory_metrics(),
            "lr": self.sched_actor.get_last_lr()[0],
            "val/lr": self.sched_critic.get_last_lr()[0],
        }
        self.metrics.log(self.step_idx, metrics)
        if cfg.run.timeline_every and self.step_idx % cfg.run.timeline_every == 0:
            d = self.out_dir / "timelines"
            d.mkdir(exist_ok=True)
            tl.to_chrome_trace(d / f"step-{self.step_idx:06d}.json")
            tl.to_png(d / f"step-{self.step_idx:06d}.png", title=f"step {self.step_idx} ({cfg.run.overlap})")
        self.last_timeline = tl
        self.step_idx += 1
        return metrics

    def _scorer_graph_stats(self) -> dict:
        st = [s.runner.prefill_stats for s in self.rollout.scorers]
        return {k: sum(x[k] for x in st) for k in ("captures", "capture_s", "eager", "borrowed")}

    def _memory_metrics(self) -> dict:
        """Peak GPU memory so far and the caching allocator's retries in this step (each one frees cached
        blocks and synchronizes: many of them mean the update runs short of memory)."""
        if self.device.type != "cuda":
            return {}
        st = torch.cuda.memory_stats(self.device)
        retries = st.get("num_alloc_retries", 0)
        out = {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30,
               "memory/alloc_retries": retries - getattr(self, "_alloc_retries", 0)}
        self._alloc_retries = retries
        if self.scorer_gpu is not None:
            out["memory/scorer_max_allocated_gib"] = torch.cuda.max_memory_allocated(self.scorer_gpu) / 2 ** 30
        return out

    def _total_score(self, x: ScoredSequence) -> float:
        coef = self.cfg.model.reward_model_coef
        return sum(v * (coef if k == "reward" else 1.0) for k, v in x.scores.items())

    def _check_results(self, results: list[ScoredSequence]) -> list[ScoredSequence]:
        bad = [x for x in results if x.error is not None or not x.scores or
               not all(math.isfinite(v) for v in x.scores.values())]
        if not bad:
            return results
        desc = "; ".join(f"sequence {x.seq.seq_id} (prompt {x.seq.meta.get('text')!r}): {x.error or x.scores}"
                         for x in bad[:5])
        if self.cfg.run.nan_policy == "skip":
            self.skipped += len(bad)
            log.warning("skipping %d sequences with invalid scores: %s", len(bad), desc)
            good = [x for x in results if x not in bad]
            if not good:
                raise FloatingPointError(f"step {self.step_idx}: every sequence had an invalid score: {desc}")
            return good
        raise FloatingPointError(f"step {self.step_idx}: invalid scores (set run.nan_policy=skip to drop them): "
                                 f"{desc}. The last checkpoint under {self.out_dir}/checkpoints is intact.")

    # ------------------------------------------------------------------ training
    def _h2d(self, values, dtype) -> torch.Tensor:
        """Host values on the training device without a stream sync (the engine's pinned,
        non-blocking staging): ``torch.tensor(list, device=cuda)`` waits for every queued kernel,
        which made the update host-bound."""
        if getattr(self, "_stage", None) is None:
            self._stage = _Staging(self.device)
        return self._stage(values, dtype)

    def _forward(self, model, items: list[ScoredSequence], kind: str, with_entropy: bool = False):
        """Packed forward (no padding) -> per response token [sum T_i] logprobs (actor) or values."""
        ids, pos, cu, rows, nexts = [], [], [0], [], []
        for x in items:
            s = x.seq
            P, T = len(s.prompt_ids), len(s.output_ids)
            base = cu[-1]
            ids.extend(s.prompt_ids)
            ids.extend(s.output_ids)
            pos.extend(range(P + T))
            cu.append(base + P + T)
            rows.extend(range(base + P - 1, base + P + T - 1))
            nexts.extend(s.output_ids)
        max_len = max(b - a for a, b in zip(cu, cu[1:]))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            hidden = model(self._h2d(ids, torch.long), self._h2d(pos, torch.long),
                           DenseContext(self._h2d(cu, torch.int32), max_seqlen=max_len))
            h = hidden.index_select(0, self._h2d(rows, torch.long))
            if kind == "critic":
                return model.compute_scores(h), None
            return model.compute_token_logprobs(h, self._h2d(nexts, torch.long), self.cfg.rollout.temperature,
                                                with_entropy=with_entropy)

    def _pad(self, flat: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """[sum lens] -> right-padded [len(lens), max(lens)] in one scatter (autograd flows)."""
        n = np.asarray(lens, dtype=np.int64)
        rows = np.repeat(np.arange(len(lens)), n)
        cols = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        out = flat.new_zeros(len(lens), int(n.max()))
        return out.index_put((self._h2d(rows, torch.long), self._h2d(cols, torch.long)), flat)

    def _update(self, results: list[ScoredSequence], tl: Timeline | None = None) -> dict:
        cfg, p = self.cfg, self.cfg.ppo
        phase = _Phases(tl)
        B = len(results)
        lens = [len(x.seq.output_ids) for x in results]
        mask = self._pad(self._h2d(np.ones(sum(lens)), self.acc), lens)

        def as_t(rows):   # per-token lists -> [B, T] (numpy builds the buffer: ~40k tokens per step on G)
            flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.float64, count=sum(lens))
            return self._pad(self._h2d(flat, self.acc), lens)
        behaviour = as_t([x.seq.logprobs for x in results])
        ref_lp = as_t([x.ref_logprobs for x in results])
        old_values = as_t([x.values for x in results])
        versions = as_t([x.seq.versions for x in results])
        scores = self._h2d([self._total_score(x) for x in results], self.acc)
        for name, t in (("behaviour log-probs", behaviour), ("reference log-probs", ref_lp),
                        ("critic values", old_values), ("scores", scores)):
            algo.check_finite(name, t, mask if t.dim() == 2 else None)

        mb = cfg.ppo.micro_batch_size
        mb_tokens = cfg.ppo.micro_batch_tokens
        seq_tokens = [len(x.seq.prompt_ids) + len(x.seq.output_ids) for x in results]
        with torch.no_grad():
            if p.old_logprob == "recompute":
                per_seq: list = [None] * B
                with phase("old_logprob", "old log-probs"):
                    for sub in micro_batches(list(range(B)), seq_tokens, mb, mb_tokens):
                        lp_sub = self._forward(self.actor, [results[i] for i in sub], "actor")[0]
                        for i, piece in zip(sub, torch.split(lp_sub, [lens[i] for i in sub])):
                            per_seq[i] = piece
                old_lp = self._pad(torch.cat(per_seq).to(self.acc), lens)
            else:
                old_lp = behaviour
            offpolicy = (versions < self.version) & (mask > 0)
            if p.old_logprob == "recompute":
                iw = algo.truncated_importance_weights(old_lp, behaviour, cfg.rollout.is_cap)
                iw = torch.where(offpolicy, iw, torch.ones_like(iw))
            else:
                iw = None
            kl = algo.kl_estimate(old_lp, ref_lp, p.kl_estimator) * mask
            kl_coef = p.kl_coef if p.kl_in_reward else 0.0
            rewards = algo.token_level_rewards(scores, kl, mask, kl_coef)
            adv, returns = algo.compute_gae(rewards, old_values, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                adv = algo.masked_whiten(adv, mask)

        agg = {k: [] for k in ("loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "policy/approxkl_avg",
                                "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "policy/grad_norm",
                                "val/grad_norm", "policy/dual_clipfrac_avg", "policy/kl_loss_avg")}
        gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + self.step_idx)
        self.actor.train(), self.critic.train()
        for epoch in range(p.ppo_epochs):
            order = torch.randperm(B, generator=gen).tolist()
            for mb_idx in range(p.num_mini_batches):
                idx = order[mb_idx::p.num_mini_batches]
                tokens = float(sum(lens[i] for i in idx))
                self.opt_actor.zero_grad(set_to_none=True)
                self.opt_critic.zero_grad(set_to_none=True)
                for sub in micro_batches(idx, seq_tokens, mb, mb_tokens):
                    items = [results[i] for i in sub]
                    sub_lens = [lens[i] for i in sub]
                    sub_T = max(sub_lens)
                    sub_t = self._h2d(sub, torch.long)        # a list index would copy (and sync) per use

                    def rows(t, sub_t=sub_t, sub_T=sub_T):
                        return t.index_select(0, sub_t)[:, :sub_T]
                    m = rows(mask)
                    w = sum(sub_lens) / tokens if p.loss_agg_mode == "token-mean" else len(sub) / len(idx)
                    phase.begin("actor", "actor fwd+bwd")
                    lp, ent = self._forward(self.actor, items, "actor", with_entropy=True)
                    lp = self._pad(lp.to(self.acc), sub_lens)
                    pl, st = algo.policy_loss(lp, rows(old_lp), rows(adv), m, p.clip_ratio,
                                              p.clip_ratio_high, p.dual_clip_c,
                                              None if iw is None else rows(iw), p.loss_agg_mode)
                    ent_pad = self._pad(ent.to(self.acc), sub_lens)
                    loss = pl
                    if p.ent_coef:      # the entropy bonus; at 0 the entropy stays out of the graph and
                        # the LM-head backward skips its term (~4 passes over each chunk's logits)
                        loss = loss - p.ent_coef * algo.entropy_loss(ent_pad, m, p.loss_agg_mode)
                    if not p.kl_in_reward:
                        kll = algo.kl_loss(lp, rows(ref_lp), m, "k3", p.loss_agg_mode)
                        loss = loss + p.kl_coef * kll
                        agg["policy/kl_loss_avg"].append(kll.detach())
                    (loss * w).backward()
                    phase.begin("critic", "critic fwd+bwd")
                    v, _ = self._forward(self.critic, items, "critic")
                    v = self._pad(v.to(self.acc), sub_lens)
                    vl, vst = algo.value_loss(v, rows(old_values), rows(returns), m,
                                              p.cliprange_value, p.loss_agg_mode)
                    (p.vf_coef * vl * w).backward()
                    phase.end()
                    # statistics stay on the device until the update is over (a float() here
                    # would drain the queue every micro-batch and expose the host's launch time)
                    agg["loss/policy_avg"].append(pl.detach())
                    agg["loss/value_avg"].append(vl.detach())
                    agg["policy/clipfrac_avg"].append(st["clipfrac"])
                    agg["policy/dual_clipfrac_avg"].append(st["dual_clipfrac"])
                    agg["policy/approxkl_avg"].append(st["approx_kl"])
                    agg["val/ratio"].append(st["ratio_mean"])
                    agg["val/clipfrac_avg"].append(vst["vf_clipfrac"])
                    agg["policy/entropy_avg"].append(algo.masked_mean(ent_pad.detach(), m))
                phase.begin("optimizer", "clip+optimizer")
                gn_a = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.optim.max_grad_norm)
                gn_c = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.optim.max_grad_norm)
                if not (torch.isfinite(gn_a) and torch.isfinite(gn_c)):
                    phase.end()
                    raise FloatingPointError(f"step {self.step_idx}: non-finite gradient norm (actor {float(gn_a)}, "
                                             f"critic {float(gn_c)}); weights left as they were before this step")
                self.opt_actor.step()
                self.opt_critic.step()
                phase.end()
                agg["policy/grad_norm"].append(gn_a.detach())
                agg["val/grad_norm"].append(gn_c.detach())
        self.sched_actor.step()
        self.sched_critic.step()
        self.actor.eval(), self.critic.eval()
        self.trained_keys.extend(x.seq.sample_key for x in results)

        seq_kl = (kl * mask).sum(1)
        out = {k: float(torch.stack([t.float() for t in v]).mean()) for k, v in agg.items() if v}
        out.update({
            "objective/scores": float(scores.mean()),
            "objective/scores_std": float(scores.std()) if B > 1 else 0.0,
            "objective/kl": float(seq_kl.mean()),
            "objective/entropy": float((-behaviour * mask).sum(1).mean()),
            "objective/non_score_reward": float((-kl_coef * seq_kl).mean()),
            "objective/rlhf_reward": float(scores.mean() - kl_coef * seq_kl.mean()),
            "objective/kl_coef": kl_coef,
            "val/explained_variance": float(algo.explained_variance(old_values, returns, mask)),
            "oppo/offpolicy_token_frac": float(offpolicy.sum() / mask.sum()),
            "policy/importance_weight_mean": float(algo.masked_mean(iw, mask)) if iw is not None else 1.0,
            "oppo/trained_sequences": B,
        })
        return out

    def _sync_weights(self) -> None:
        """New weights to the engine and the critic scorer; deferred sequences' stale KV dropped."""
        if self.share_actor:
            self.engine.update_weights(self.version)
        else:
            with torch.no_grad():
                self.engine.update_weights(self.version, self.actor.state_dict())
        if not self.share_critic:       # (to the scorers' device, if they are placed elsewhere)
            with torch.no_grad():
                self.engine_critic.load_state_dict({k: v.to(self.engine_critic.dtype)
                                                    for k, v in self.critic.state_dict().items()})
        if not self.cfg.rollout.keep_stale_kv:
            self.engine.drop_kv()
        self.scorers["critic"].invalidate()       # the critic changed: values of deferred sequences are recomputed

    # ------------------------------------------------------------------ checkpoints
    def _seq_state(self, seq: Sequence) -> dict:
        return {"prompt_ids": seq.prompt_ids, "output_ids": seq.output_ids, "logprobs": seq.logprobs,
                "versions": seq.versions, "target_len": seq.target_len, "sample_key": seq.sample_key,
                "admit_order": seq.admit_order, "finish_reason": seq.finish_reason,
                "num_emitted": seq.num_emitted, "meta": seq.meta}

    def save(self) -> Path:
        finished = {s.seq_id for s in self.rollout._finished}
        state = {
            "step": self.step_idx, "version": self.version, "next_prompt": self.next_prompt,
            "skipped": self.skipped, "config": self.cfg.to_dict(),
            "delta": self.delta_ctl.state_dict(), "chunk": self.chunk_ctl.state_dict(),
            "sched_actor": self.sched_actor.state_dict(), "sched_critic": self.sched_critic.state_dict(),
            "admitted": self.engine.scheduler._admitted, "num_requests": self.engine._num_requests,
            "in_flight": [self._seq_state(s) for s in sorted(self.rollout.in_flight.values(),
                                                                   key=lambda s: s.admit_order)],
            "finished_in_flight": sorted(finished),
            "trained_keys": self.trained_keys,
        }
        path = save_checkpoint(self.out_dir / "checkpoints", self.step_idx,
                               {"actor": self.actor, "critic": self.critic},
                               {"actor": self.opt_actor, "critic": self.opt_critic}, state,
                               keep=self.cfg.run.keep_checkpoints)
        log.info("checkpoint %s", path)
        return path

    def _resume(self) -> str | None:
        state = load_latest(self.out_dir / "checkpoints", {"actor": self.actor, "critic": self.critic},
                            {"actor": self.opt_actor, "critic": self.opt_critic})
        if state is None:
            log.warning("--resume: no checkpoint under %s/checkpoints; starting fresh", self.out_dir)
            return None
        self.step_idx, self.version, self.next_prompt = state["step"], state["version"], state["next_prompt"]
        self.skipped = state["skipped"]
        self.delta_ctl.load_state_dict(state["delta"])
        self.chunk_ctl.load_state_dict(state["chunk"])
        self.rollout.set_chunk_size(self.chunk_ctl.chunk_size)
        self.sched_actor.load_state_dict(state["sched_actor"])
        self.sched_critic.load_state_dict(state["sched_critic"])
        self.trained_keys = state["trained_keys"]
        if not (self.share_actor and self.share_critic):
            self._sync_weights()
        self.engine.version = self.version
        self.engine.scheduler._admitted = state["admitted"]
        self.engine._num_requests = state["num_requests"]
        seqs = []
        for d in state["in_flight"]:
            seq = Sequence(d["prompt_ids"], self.sampling, target_len=d["target_len"], sample_key=d["sample_key"])
            seq.output_ids, seq.logprobs, seq.versions = d["output_ids"], d["logprobs"], d["versions"]
            seq.admit_order, seq.num_emitted, seq.meta = d["admit_order"], d["num_emitted"], d["meta"]
            seq.finish_reason = d["finish_reason"]
            seqs.append(seq)
        finished = [s for s in seqs if s.finish_reason is not None]
        self.rollout.resume([s for s in seqs if s.finish_reason is None])
        self.rollout.resume_finished(finished)
        log.info("resumed from %s at step %d with %d sequences in flight", state["_path"], self.step_idx, len(seqs))
        return state["_path"]
