"""Typed training configuration: YAML plus ``key=value`` overrides, validated once at start.

    cfg = load_config("my.yaml", ["rollout.batch_size=32", "ppo.kl_coef=0.02"])

Sections and names follow TRL/verl where users know them (``kl_coef``, ``cliprange_value``,
``gamma``, ``lam``, ``ppo_epochs``, ``num_mini_batches``, ``loss_agg_mode``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch
import yaml

__all__ = ["TrainConfig", "ModelSection", "RolloutSection", "PPOSection", "OptimSection", "RunSection",
           "load_config", "ConfigError", "OVERLAP_MODES"]

OVERLAP_MODES = ("none", "intra", "inter", "full")


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    actor_path: str | None = None       # HF directory; None = the embedded default
    reward_path: str | None = None      # *ForSequenceClassification dir; None = default / none
    critic_path: str | None = None      # None = reward_path (or the actor with a fresh score head)
    reference_path: str | None = None   # None = the actor's initial weights
    dtype: str = "float32"              # parameter dtype of the trained models (float64: CPU exactness checks)
    engine_dtype: str = "auto"          # actor engine / scorers: "auto" = bfloat16 on CUDA, else dtype
    gradient_checkpointing: bool = False
    reward_model_coef: float = 0.1      # total score = rule reward + coef * reward model score


@dataclass
class RolloutSection:
    batch_size: int = 16                # B: sequences trained per step
    prompt_file: str | None = None      # JSONL: {"prompt": text} or {"prompt_ids": [...]}, optional "target_len";
                                        # None = the embedded default task
    max_prompt_len: int = 512           # longer prompts: an error naming them (or skipped, run.nan_policy=skip)
    num_prompts: int = 512              # prompts of the embedded default set
    max_new_tokens: int = 96
    use_target_lens: bool = True        # tell the engine each prompt's response length (benchmarks, default task)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    chunk_size: int = 8                 # C
    adaptive_chunk: bool = True         # pick C from the cost model every step (logged as oppo/chunk_size)
    chunk_trial_every: int = 50         # adaptive C: try C/2, C, 2C (and the model's pick) one step each after
                                        # every N steps; 0 = never (the cost model alone)
    chunk_trial_margin: float = 0.05    # the model's pick stays in charge while within this fraction of the
                                        # trial's fastest C; else C is pinned to it (oppo/chunk_pinned)
    score_below_batch: int | None = None  # intra overlap: before the flush, scorers launch only once at most
                                        # this many sequences decode (the tail, where decode leaves SMs idle);
                                        # None: whenever enough tokens are pending (see Rollout._threshold)
    delta_init: int = 4                 # inter-step overlap: extra prompts admitted (Δ)
    delta_min: int = 0
    delta_max: int = 8
    delta_window: int = 5               # reward-trend window of the Δ controller
    staleness_limit: int = 2            # K: no trained token older than K policy versions
    stale_policy: str = "finish"        # "finish" (train what it has) | "regenerate" (restart it)
    keep_stale_kv: bool = False         # deferred sequences keep their actor KV (fast, approximate)
    is_cap: float = 2.0                 # truncated importance weight cap for off-policy tokens
    pool_pages: int | None = None       # None: from free memory (CUDA) or enough for the batch (CPU)
    memory_fraction: float = 0.5
    tokens_per_page: int = 16
    release_pool_in_training: bool = False  # give the KV pool's memory back during the update
                                            # (pages of in-flight sequences are kept)
    max_num_batched_tokens: int = 4096


@dataclass
class PPOSection:
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    micro_batch_size: int = 16          # sequences per forward (gradient accumulation)
    micro_batch_tokens: int | None = None   # if set: tokens per forward instead (sorted, packed)
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.02
    kl_estimator: str = "k1"
    kl_in_reward: bool = True           # False: KL to the reference as a loss term (kl_coef weights it)
    clip_ratio: float = 0.2
    clip_ratio_high: float | None = None
    dual_clip_c: float | None = None
    cliprange_value: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    whiten_advantages: bool = True
    loss_agg_mode: str = "token-mean"
    old_logprob: str = "recompute"      # "recompute" (proximal, current weights) | "behaviour" (engine's)


@dataclass
class OptimSection:
    actor_lr: float = 3e-3
    critic_lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"       # constant | linear | cosine


@dataclass
class RunSection:
    total_steps: int = 200
    seed: int = 0
    overlap: str = "intra"              # none | intra | inter | full
    out_dir: str = "runs/default"
    cache_dir: str = ".oppo_cache"      # where the embedded default models are written
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    scorer_device: str | None = None    # placement of the scorers (reward, reference, the critic's inference
                                        # copy): None = beside the actor, in its page pool; a device (e.g.
                                        # cuda:1) = there, with a page pool of their own
    save_every: int = 25
    keep_checkpoints: int = 3
    timeline_every: int = 10            # write the step's timeline (trace JSON + PNG) every N steps
    nan_policy: str = "error"           # error | skip (count and drop sequences with NaN/inf scores)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        r, p, o, run, m = self.rollout, self.ppo, self.optim, self.run, self.model
        checks = [
            (r.batch_size >= 1, "rollout.batch_size", r.batch_size, ">= 1"),
            (r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, ">= 1"),
            (r.num_prompts >= r.batch_size, "rollout.num_prompts", r.num_prompts, ">= rollout.batch_size"),
            (r.max_prompt_len >= 1, "rollout.max_prompt_len", r.max_prompt_len, ">= 1"),
            (r.temperature > 0, "rollout.temperature", r.temperature, "> 0 for PPO (sampling)"),
            (0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]"),
            (r.top_k >= 0, "rollout.top_k", r.top_k, ">= 0"),
            (r.chunk_size >= 1, "rollout.chunk_size", r.chunk_size, ">= 1"),
            (r.chunk_trial_every >= 0, "rollout.chunk_trial_every", r.chunk_trial_every, ">= 0 (0 = never)"),
            (r.score_below_batch is None or r.score_below_batch >= 1, "rollout.score_below_batch",
             r.score_below_batch, ">= 1 (or null)"),
            (0 <= r.chunk_trial_margin < 1, "rollout.chunk_trial_margin", r.chunk_trial_margin, "in [0, 1)"),
            (0 <= r.delta_min <= r.delta_init <= r.delta_max, "rollout.delta_init", r.delta_init,
             f"within [delta_min={r.delta_min}, delta_max={r.delta_max}]"),
            (r.staleness_limit >= 1, "rollout.staleness_limit", r.staleness_limit, ">= 1"),
            (r.stale_policy in ("finish", "regenerate"), "rollout.stale_policy", r.stale_policy, "finish | regenerate"),
            (r.is_cap >= 1, "rollout.is_cap", r.is_cap, ">= 1"),
            (r.pool_pages is None or r.pool_pages >= 1, "rollout.pool_pages", r.pool_pages, ">= 1"),
            (0 < r.memory_fraction <= 1, "rollout.memory_fraction", r.memory_fraction, "in (0, 1]"),
            (r.tokens_per_page >= 1, "rollout.tokens_per_page", r.tokens_per_page, ">= 1"),
            (p.ppo_epochs >= 1, "ppo.ppo_epochs", p.ppo_epochs, ">= 1"),
            (1 <= p.num_mini_batches <= r.batch_size, "ppo.num_mini_batches", p.num_mini_batches,
             "in [1, rollout.batch_size]"),
            (p.micro_batch_size >= 1, "ppo.micro_batch_size", p.micro_batch_size, ">= 1"),
            (p.micro_batch_tokens is None or p.micro_batch_tokens >= 1, "ppo.micro_batch_tokens",
             p.micro_batch_tokens, "None or >= 1"),
            (0 <= p.gamma <= 1, "ppo.gamma", p.gamma, "in [0, 1]"),
            (0 <= p.lam <= 1, "ppo.lam", p.lam, "in [0, 1]"),
            (p.kl_coef >= 0, "ppo.kl_coef", p.kl_coef, ">= 0"),
            (p.kl_estimator in ("k1", "k2", "k3", "abs"), "ppo.kl_estimator", p.kl_estimator, "k1 | k2 | k3 | abs"),
            (p.clip_ratio > 0, "ppo.clip_ratio", p.clip_ratio, "> 0"),
            (p.dual_clip_c is None or p.dual_clip_c > 1, "ppo.dual_clip_c", p.dual_clip_c, "> 1 or null"),
            (p.loss_agg_mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"), "ppo.loss_agg_mode",
             p.loss_agg_mode, "token-mean | seq-mean-token-sum | seq-mean-token-mean"),
            (p.old_logprob in ("recompute", "behaviour"), "ppo.old_logprob", p.old_logprob, "recompute | behaviour"),
            (o.actor_lr > 0 and o.critic_lr > 0, "optim.actor_lr/critic_lr", (o.actor_lr, o.critic_lr), "> 0"),
            (o.max_grad_norm > 0, "optim.max_grad_norm", o.max_grad_norm, "> 0"),
            (o.lr_schedule in ("constant", "linear", "cosine"), "optim.lr_schedule", o.lr_schedule,
             "constant | linear | cosine"),
            (run.total_steps >= 1, "run.total_steps", run.total_steps, ">= 1"),
            (run.overlap in OVERLAP_MODES, "run.overlap", run.overlap, " | ".join(OVERLAP_MODES)),
            (run.save_every >= 1, "run.save_every", run.save_every, ">= 1"),
            (run.keep_checkpoints >= 1, "run.keep_checkpoints", run.keep_checkpoints, ">= 1"),
            (run.nan_policy in ("error", "skip"), "run.nan_policy", run.nan_policy, "error | skip"),
            (run.scorer_device is None or _is_device(run.scorer_device), "run.scorer_device", run.scorer_device,
             "null (beside the actor), cpu, cuda or cuda:N"),
            (m.dtype in ("float32", "bfloat16", "float16", "float64"), "model.dtype", m.dtype,
             "float32 | bfloat16 | float16 | float64 (CPU exactness checks)"),
            (m.engine_dtype in ("auto", "float32", "bfloat16", "float16"), "model.engine_dtype", m.engine_dtype,
             "auto | float32 | bfloat16 | float16"),
        ]
        for ok, name, value, want in checks:
            if not ok:
                raise ConfigError(f"invalid config value {name} = {value!r}: must be {want}")

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return asdict(self)

    def dumps(self) -> str:
        return yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        sections = {}
        for f in fields(cls):
            sec_cls = f.default_factory
            raw = dict(d.get(f.name) or {})
            known = {sf.name for sf in fields(sec_cls)}
            unknown = set(raw) - known
            if unknown:
                raise ConfigError(f"unknown config keys in [{f.name}]: {sorted(unknown)}; known: {sorted(known)}")
            if "betas" in raw:
                raw["betas"] = tuple(raw["betas"])
            sections[f.name] = sec_cls(**raw)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}; known: model, rollout, ppo, optim, run")
        return cls(**sections)


def _is_device(spec) -> bool:
    if not isinstance(spec, str):
        return False
    try:
        return torch.device(spec).type in ("cpu", "cuda")
    except (RuntimeError, ValueError):
        return False


def _parse_value(text: str):
    v = yaml.safe_load(text)
    return v


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """``base`` (e.g. a checkpoint's saved config), then a YAML file, then ``section.key=value``
    overrides -> validated TrainConfig."""
    d: dict = {k: dict(v) for k, v in (base or {}).items()}
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        for section, values in loaded.items():
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"{path}: section [{section}] must be a mapping, got {values!r}")
            d.setdefault(section, {}).update(values or {})
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        d.setdefault(section, {})[name] = _parse_value(value)
    try:
        return TrainConfig.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"invalid config: {e}") from None
