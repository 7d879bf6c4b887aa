"""Embedding API: OPPO's rollout stage inside someone else's PPO loop, in a few lines.

    from oppo_runtime import OPPORollout, SamplingParams

    rollout = OPPORollout(policy, tokenizer=tok, reward_model=rm, critic=critic, reference=ref,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=128))
    for step in range(num_steps):
        exp = rollout.generate_and_score(prompts)      # replaces "generate, then score"
        ...                                            # GAE, losses, optimizer.step() on exp
        rollout.update_weights()                       # the engine now samples with the new policy

``generate_and_score`` overlaps the scorers with generation (intra-step overlap): the reward
model, critic and reference prefill each sequence chunk by chunk while the actor still decodes.
With ``overcommit=delta`` it also overlaps steps: ``delta`` sequences beyond the batch stay in
flight when a call returns (they keep their tokens) and finish in a later call (see
``prompts_needed``). Every response token carries the policy version that sampled it and its
behaviour log-prob, so a trainer can correct for tokens of an older policy.

Models may be given as a local HF directory (loaded by ``oppo_runtime.models.load_model``), as
this package's ``CausalLM`` / ``ScalarHeadModel``, or as a ``transformers`` Llama / Qwen2 /
Qwen3 / Mistral model: that one is wrapped, sharing its parameters (no copy), so the engine
follows the trainer's optimizer without ``state_dict`` copies.

Misuse is reported here, at the call, with what to change (``ValueError`` / ``TypeError``):
prompts of the wrong type or shape, token ids outside the vocabulary, a tokenizer larger than the
actor's vocabulary, a scorer whose vocabulary differs from the actor's, a model on another device
than the page pool.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from .engine import ActorEngine, Chunk, EngineConfig, RequestError, SamplingParams
from .engine.rollout import Rollout, ScoredSequence
from .engine.scorer import RuleReward, Scorer
from .memory import PagePool
from .models import CausalLM, ModelConfig, ScalarHeadModel, load_model

__all__ = ["OPPORollout", "Experiences", "SamplingParams", "RuleReward"]

log = logging.getLogger("oppo_runtime.api")

_CPU_DEFAULT_PAGES = 1024
_CUDA_DEFAULT_FRACTION = 0.3


# ---------------------------------------------------------------------------------- experiences
@dataclass
class Experiences:
    """A batch of finished, scored sequences as padded tensors (on the CPU).

    Prompts are left-padded and responses right-padded with ``pad_token_id``; per-token tensors
    are ``[B, T]`` aligned with ``response_ids`` (entry j belongs to response token j) and are 0
    where ``response_mask`` is False (``versions``: -1).
    """
    prompt_ids: torch.Tensor              # [B, P] long, left-padded
    prompt_mask: torch.Tensor             # [B, P] bool
    response_ids: torch.Tensor            # [B, T] long, right-padded
    response_mask: torch.Tensor           # [B, T] bool
    logprobs: torch.Tensor                # [B, T] float32: behaviour log-probs (the sampling distribution)
    versions: torch.Tensor                # [B, T] long: policy version that sampled each token
    ref_logprobs: torch.Tensor | None     # [B, T] float32, with a reference model
    values: torch.Tensor | None           # [B, T] float32, with a critic: V before response token j
    final_values: torch.Tensor | None     # [B] float32: V after the last token (critic_final_value=True)
    scores: torch.Tensor | None           # [B] float32: reward model + rule reward, summed
    score_parts: dict[str, torch.Tensor]  # per source ("reward", "rule"), [B]
    prompt_uids: list[int]                # running index of the prompt over all calls (deferral-proof)
    finish_reasons: list[str]             # "eos" | "stop" | "length"
    texts: list[str] | None = None        # decoded responses, with a tokenizer
    pad_token_id: int = 0
    stats: dict = field(default_factory=dict)   # rollout timings and counts of this call

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def prompts(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.prompt_ids, self.prompt_mask)]

    @property
    def responses(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.response_ids, self.response_mask)]


# ---------------------------------------------------------------------------------- models
def _is_transformers_model(m) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(m).__mro__)


def _wrap_transformers(hf, kind: str, max_model_len: int | None):
    """Our module over a transformers model's own parameters (the same tensors: no copy)."""
    d = hf.config.to_dict()
    d["architectures"] = [type(hf).__name__]
    config = ModelConfig.from_dict(d, max_model_len=max_model_len, source=type(hf).__name__)
    if config.kind != kind:
        raise TypeError(f"{type(hf).__name__} is a {config.kind} model; this role needs a {kind} "
                        f"({'*ForCausalLM' if kind == 'causal_lm' else '*ForSequenceClassification, num_labels=1'})")
    with torch.device("meta"):
        ours = (CausalLM if kind == "causal_lm" else ScalarHeadModel)(config)
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for name, p in list(ours.named_parameters(remove_duplicate=False)):
        if name not in theirs:
            raise TypeError(f"{type(hf).__name__}: no parameter {name!r} (only plain Llama/Qwen2/Qwen3/Mistral "
                            "modules are wrapped; merge adapters first)")
        if theirs[name].shape != p.shape:
            raise TypeError(f"{type(hf).__name__}: parameter {name} has shape {tuple(theirs[name].shape)}, "
                            f"expected {tuple(p.shape)}")
        owner, _, attr = name.rpartition(".")
        setattr(ours.get_submodule(owner), attr, theirs[name])
    return ours.eval()


def _as_model(m, role: str, kind: str, device, dtype, max_model_len):
    if m is None:
        return None
    if isinstance(m, (str, os.PathLike)):
        return load_model(m, kind=kind, dtype=dtype, device=device or "cpu", max_model_len=max_model_len,
                          allow_new_head=(role == "critic"))
    if isinstance(m, (CausalLM, ScalarHeadModel)):
        want = CausalLM if kind == "causal_lm" else ScalarHeadModel
        if not isinstance(m, want):
            raise TypeError(f"{role}: expected a {want.__name__}, got a {type(m).__name__}")
        return m
    if _is_transformers_model(m):
        return _wrap_transformers(m, kind, max_model_len)
    raise TypeError(f"{role}: expected a model directory, a {('CausalLM' if kind == 'causal_lm' else 'ScalarHeadModel')} "
                    f"or a transformers model, got {type(m).__name__}")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _tokenizer_vocab(tok) -> int:
    if hasattr(tok, "__len__"):
        return len(tok)              # transformers: includes added tokens
    return tok.vocab_size            # oppo_runtime.models.Tokenizer: includes added tokens


def _copy_into(model, state_dict: dict, role: str) -> None:
    """In-place copy (tied weights appear under both names in a state_dict: either is fine)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [k for k in state_dict if k not in params]
    if unknown:
        raise KeyError(f"{role}: state_dict has tensors the model does not: {unknown[:5]}")
    with torch.no_grad():
        for k, v in state_dict.items():
            if v.shape != params[k].shape:
                raise ValueError(f"{role}: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}")
            params[k].copy_(v)


# ---------------------------------------------------------------------------------- the API
class OPPORollout:
    """The rollout stage of a PPO step: generate with the actor, score with the downstream models.

    Args:
        actor: the policy (model directory, ``CausalLM`` or transformers ``*ForCausalLM``).
        tokenizer: needed for string prompts and ``texts``; its size must not exceed the actor's
            vocabulary. Gives the EOS and pad ids unless ``eos_token_id`` / ``pad_token_id`` are set.
        reward_model / critic: ``*ForSequenceClassification`` (1 label) or ``ScalarHeadModel``.
        reference: a frozen ``*ForCausalLM``; its log-probs use the sampling temperature.
        rule_reward: ``fn(prompt_ids, response_ids, text) -> float`` or a ``RuleReward``; added to
            the reward model's score.
        sampling: ``SamplingParams`` (temperature, top_k, top_p, max_new_tokens, stop tokens).
        chunk_size: C, tokens per chunk streamed to the scorers.
        overlap: False runs the sequential pipeline (generate all, then score) for comparison.
        overcommit: delta, sequences kept in flight beyond the returned batch (deferral).
        recompute_deferred_kv: after ``update_weights`` the actor KV of in-flight sequences is
            recomputed under the new weights (exact); False keeps it (faster, approximate).
        critic_final_value: also return V after the last token (``Experiences.final_values``).
        pool_pages / memory_fraction: size of the shared KV page pool (default: 1024 pages on the
            CPU, 0.3 of the free memory on CUDA).
        device: where the actor and its page pool live (default: the actor's device).
        scorer_device: placement of the reward model, critic and reference (e.g. ``"cuda:1"``):
            there, with a page pool of their own (sized like the actor's), so their prefill runs
            beside the actor's decode instead of sharing its GPU. Default: beside the actor, in
            its pool. Models given as objects must already be on their device.
    """

    def __init__(self, actor, *, tokenizer=None, reward_model=None, rule_reward=None, critic=None,
                 reference=None, sampling: SamplingParams | None = None, chunk_size: int = 16,
                 overlap: bool = True, overcommit: int = 0, recompute_deferred_kv: bool = True,
                 critic_final_value: bool = False, pool_pages: int | None = None,
                 memory_fraction: float | None = None, tokens_per_page: int = 16,
                 device: str | torch.device | None = None, scorer_device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, seed: int = 0, enforce_eager: bool = False):
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if not isinstance(overcommit, int) or overcommit < 0:
            raise ValueError(f"overcommit must be an integer >= 0, got {overcommit!r}")
        if pool_pages is not None and memory_fraction is not None:
            raise ValueError("give pool_pages or memory_fraction, not both")
        self.sampling = sampling or SamplingParams()
        self.overcommit = overcommit
        self.recompute_deferred_kv = recompute_deferred_kv
        self.tokenizer = tokenizer
        dev = torch.device(device) if device is not None else None

        self.actor_model = _as_model(actor, "actor", "causal_lm", dev, dtype, max_model_len)
        if self.actor_model is None:
            raise TypeError("actor is required")
        dev = dev or _device_of(self.actor_model)
        sdev = dev if scorer_device is None else torch.device(scorer_device)
        models = {"actor": self.actor_model}
        for role, m, kind in (("reward_model", reward_model, "score"), ("critic", critic, "score"),
                              ("reference", reference, "causal_lm")):
            models[role] = _as_model(m, role, kind, sdev, dtype, max_model_len)
        self._check_models(models, dev, sdev)
        self.device, self.scorer_device = dev, sdev
        vocab = self.actor_model.config.vocab_size
        if tokenizer is not None and _tokenizer_vocab(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {_tokenizer_vocab(tokenizer)} tokens but the actor's vocabulary "
                             f"has {vocab}: ids >= {vocab} would index past the embedding. Resize the model's "
                             "embeddings (model.resize_token_embeddings) or use the model's own tokenizer")

        cfg = self.actor_model.config
        self.eos_token_id = eos_token_id if eos_token_id is not None else (
            getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None)
        if self.eos_token_id is None:
            self.eos_token_id = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else (
            getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None)
        if self.pad_token_id is None:
            self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (self.eos_token_id or 0)

        if memory_fraction is not None and dev.type != "cuda":
            raise ValueError("memory_fraction sizes the pool from free CUDA memory; on the CPU give pool_pages")

        def make_pool(members, where):
            pages = pool_pages if pool_pages is not None or where.type == "cuda" else _CPU_DEFAULT_PAGES
            return PagePool.for_models(members, where, tokens_per_page, pages, memory_fraction or _CUDA_DEFAULT_FRACTION)

        scoring = [models[r] for r in ("reward_model", "critic", "reference")]
        if scorer_device is None:
            self.pool = make_pool([self.actor_model, *scoring], dev)
            self.scorer_pool = self.pool
        else:
            self.pool = make_pool([self.actor_model], dev)
            self.scorer_pool = make_pool(scoring, sdev)
        self.engine = ActorEngine(self.actor_model, self.pool, EngineConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            chunk_size=chunk_size, seed=seed, enforce_eager=enforce_eager), eos_token_id=self.eos_token_id)
        mml = self.engine.max_model_len
        scorers = []
        if models["reward_model"] is not None:
            scorers.append(Scorer("reward", models["reward_model"], self.scorer_pool, "reward", max_model_len=mml,
                                  max_num_batched_tokens=max_num_batched_tokens))
        if models["critic"] is not None:
            scorers.append(Scorer("critic", models["critic"], self.scorer_pool, "critic", max_model_len=mml,
                                  max_num_batched_tokens=max_num_batched_tokens, final_value=critic_final_value))
        if models["reference"] is not None:
            scorers.append(Scorer("reference", models["reference"], self.scorer_pool, "reference", max_model_len=mml,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  temperature=self.sampling.temperature or 1.0))
        if rule_reward is not None and not isinstance(rule_reward, RuleReward):
            if not callable(rule_reward):
                raise TypeError(f"rule_reward must be callable fn(prompt_ids, response_ids, text) -> float, "
                                f"got {type(rule_reward).__name__}")
            rule_reward = RuleReward(rule_reward, tokenizer)
        self.critic_final_value = critic_final_value and models["critic"] is not None
        self.scorers = scorers
        self.rollout = Rollout(self.engine, scorers, rule_reward=rule_reward, overlap=overlap)
        self._next_uid = 0
        self.version = 0

    @staticmethod
    def _check_models(models: dict, dev: torch.device, sdev: torch.device) -> None:
        actor = models["actor"]
        for role, m in models.items():
            if m is None:
                continue
            d, want = _device_of(m), (dev if role == "actor" else sdev)
            if d.type != want.type or (want.index is not None and d.index is not None and d.index != want.index):
                where = "the actor's page pool" if want is dev else "the scorers' page pool (scorer_device)"
                raise ValueError(f"{role} is on {d} but {where} is on {want}: a model's KV pages live beside it, "
                                 f"so move it there first ({role}.to({str(want)!r}))"
                                 + ("" if role != "actor" else " or pass device=None"))
            if role != "actor" and m.config.vocab_size != actor.config.vocab_size:
                raise ValueError(f"{role} has a vocabulary of {m.config.vocab_size} tokens, the actor "
                                 f"{actor.config.vocab_size}: scorers read the actor's token ids, so they must "
                                 "share its tokenizer and vocabulary")

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            raise TypeError(f"prompts: got a tensor of shape {tuple(prompts.shape)}; pass a list of unpadded "
                            "token-id lists (or strings), one per prompt: padding would be read as prompt tokens")
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
            raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        kinds = {isinstance(p, str) for p in prompts}
        if kinds == {True}:
            if self.tokenizer is None:
                raise TypeError("prompts are strings but no tokenizer was given: pass tokenizer= or token ids")
            out = [list(self.tokenizer.encode(p)) for p in prompts]
        elif kinds == {False}:
            out = []
            for i, p in enumerate(prompts):
                if isinstance(p, torch.Tensor):
                    if p.dim() != 1:
                        raise ValueError(f"prompts[{i}]: expected a 1-D tensor of token ids, got shape {tuple(p.shape)}")
                    if p.is_floating_point():
                        raise TypeError(f"prompts[{i}]: token ids must be integers, got {p.dtype}")
                    p = p.tolist()
                if not isinstance(p, (list, tuple)):
                    raise TypeError(f"prompts[{i}]: expected a list of token ids, got {type(p).__name__}")
                if any(isinstance(t, (list, tuple)) for t in p):
                    raise ValueError(f"prompts[{i}] is nested: pass one flat list of token ids per prompt")
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                    bad = next(t for t in p if not (isinstance(t, int) and not isinstance(t, bool)))
                    raise TypeError(f"prompts[{i}]: token ids must be ints, found {bad!r} ({type(bad).__name__})")
                out.append(list(p))
        else:
            raise TypeError("prompts mix strings and token-id lists; pass one kind")
        vocab = self.actor_model.config.vocab_size
        for i, p in enumerate(out):
            if not p:
                raise ValueError(f"prompts[{i}] is empty: at least one token is needed")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompts[{i}]: token ids {bad[:5]} are outside the actor's vocabulary [0, {vocab})")
        return out

    # ------------------------------------------------------------------ the stage
    @property
    def num_in_flight(self) -> int:
        """Sequences admitted and not yet returned (deferred ones included)."""
        return len(self.rollout.in_flight)

    def prompts_needed(self, batch_size: int) -> int:
        """How many new prompts the next call needs so that batch_size + overcommit are in flight."""
        return max(0, batch_size + self.overcommit - self.num_in_flight)

    def generate_and_score(self, prompts, target_lens=None, batch_size: int | None = None) -> Experiences:
        """Admit ``prompts`` and return the first ``batch_size`` sequences finished *and* scored.

        ``batch_size`` defaults to ``len(prompts)`` without overcommit; with ``overcommit=delta``
        it defaults to ``len(prompts) + in-flight - delta`` (so give ``prompts_needed(B)`` prompts
        per call: B + delta the first time, B after). The others stay in flight, keep their
        tokens, and come back from a later call. ``target_lens`` (one per prompt) force response
        lengths (benchmarks). Returned rows are in finish order; ``prompt_uids`` name the prompts.
        """
        ids = self._encode(prompts)
        if target_lens is not None:
            if len(target_lens) != len(ids):
                raise ValueError(f"target_lens has {len(target_lens)} entries for {len(ids)} prompts")
            if not all(isinstance(t, int) and t >= 1 for t in target_lens):
                raise ValueError("target_lens must be positive integers")
        in_flight = self.num_in_flight + len(ids)
        if batch_size is None:
            batch_size = len(ids) if self.overcommit == 0 else in_flight - self.overcommit
        if not 1 <= batch_size <= in_flight:
            raise ValueError(f"batch_size {batch_size}: {in_flight} sequences would be in flight "
                             f"({self.num_in_flight} deferred + {len(ids)} new); with overcommit={self.overcommit} "
                             f"pass prompts_needed(B) = {self.prompts_needed(max(batch_size, 1))} prompts")
        for i, p in enumerate(ids):       # check all before queueing any: a bad prompt leaves nothing behind
            try:
                self.engine.validate(p, self.sampling, None if target_lens is None else target_lens[i])
            except RequestError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        uids = list(range(self._next_uid, self._next_uid + len(ids)))
        self._next_uid += len(ids)
        self.rollout.submit(ids, self.sampling, target_lens=target_lens, metas=[{"uid": u} for u in uids])
        before = {k: float(v) for k, v in self.rollout.stats.items()}
        gen_before = self.engine.stats["generated_tokens"]
        done = self.rollout.collect(batch_size)
        errors = [(r.seq.seq_id, r.error) for r in done if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(done)} sequences failed: "
                               + "; ".join(f"sequence {s}: {e}" for s, e in errors[:5]))
        stats = {k: float(v) - before.get(k, 0.0) for k, v in self.rollout.stats.items()}
        stats["generated_tokens"] = self.engine.stats["generated_tokens"] - gen_before
        stats["deferred"] = self.num_in_flight
        return self._experiences(done, stats)

    def _experiences(self, done: list[ScoredSequence], stats: dict) -> Experiences:
        B = len(done)
        P = max(len(r.seq.prompt_ids) for r in done)
        T = max(len(r.seq.output_ids) for r in done)
        pad = self.pad_token_id
        prompt_ids = torch.full((B, P), pad, dtype=torch.long)
        response_ids = torch.full((B, T), pad, dtype=torch.long)
        prompt_mask = torch.zeros(B, P, dtype=torch.bool)
        response_mask = torch.zeros(B, T, dtype=torch.bool)
        logprobs = torch.zeros(B, T)
        versions = torch.full((B, T), -1, dtype=torch.long)
        has = {s.kind for s in self.scorers}
        ref = torch.zeros(B, T) if "reference" in has else None
        values = torch.zeros(B, T) if "critic" in has else None
        final_values = torch.zeros(B) if self.critic_final_value else None
        parts: dict[str, torch.Tensor] = {}
        for b, r in enumerate(done):
            s = r.seq
            p, t = len(s.prompt_ids), len(s.output_ids)
            prompt_ids[b, P - p:] = torch.tensor(s.prompt_ids)
            prompt_mask[b, P - p:] = True
            response_ids[b, :t] = torch.tensor(s.output_ids)
            response_mask[b, :t] = True
            logprobs[b, :t] = torch.tensor(s.logprobs)
            versions[b, :t] = torch.tensor(s.versions)
            if ref is not None:
                ref[b, :t] = torch.tensor(r.ref_logprobs)
            if values is not None:
                assert len(r.values) == t + self.critic_final_value, (len(r.values), t)
                values[b, :t] = torch.tensor(r.values[:t])
                if final_values is not None:
                    final_values[b] = r.values[t]
            for name, v in r.scores.items():
                parts.setdefault(name, torch.zeros(B))[b] = v
        scores = sum(parts.values()) if parts else None
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(r.seq.output_ids, skip_special_tokens=True) for r in done]
        return Experiences(prompt_ids, prompt_mask, response_ids, response_mask, logprobs, versions, ref, values,
                           final_values, scores, parts, [r.seq.meta["uid"] for r in done],
                           [r.seq.finish_reason for r in done], texts, pad, stats)

    # ------------------------------------------------------------------ weights
    def update_weights(self, version: int | None = None, state_dict: dict | None = None,
                       critic_state_dict: dict | None = None) -> None:
        """Tell the engine the policy changed (call after each optimizer step).

        ``state_dict=None``: the engine already shares the trained parameters (a transformers
        model or our module was given), nothing is copied. Otherwise the tensors are copied in
        place (transformers' names). ``version`` defaults to the previous one + 1. In-flight
        (deferred) sequences: their actor KV is recomputed under the new weights unless
        ``recompute_deferred_kv=False``, and their critic values are recomputed from their tokens.
        """
        self.version = self.version + 1 if version is None else int(version)
        if state_dict is not None:
            _copy_into(self.actor_model, state_dict, "actor")
        self.engine.update_weights(self.version)
        critic = next((s for s in self.scorers if s.kind == "critic"), None)
        if critic_state_dict is not None:
            if critic is None:
                raise ValueError("critic_state_dict given but this rollout has no critic")
            _copy_into(critic.model, critic_state_dict, "critic")
        if critic is not None:
            critic.follow_weights()     # a shared critic was changed in place by the caller's optimizer
        if self.recompute_deferred_kv:
            for seq in list(self.engine.scheduler.running):
                self.engine.scheduler.preempt(seq)
        if critic is not None:
            for seq in self.rollout.in_flight.values():
                if seq.seq_id in critic.states:
                    critic.release(seq.seq_id)
                    if seq.num_emitted:
                        final = seq.is_finished and seq.num_emitted == len(seq.output_ids)
                        critic.submit([Chunk(seq, 0, seq.num_emitted, final)])

    @property
    def stats(self) -> dict:
        out = {**self.rollout.stats, **self.engine.stats, "pool_pages": self.pool.num_pages,
               "pool_free": self.pool.num_free}
        if self.scorer_pool is not self.pool:
            out.update(scorer_pool_pages=self.scorer_pool.num_pages, scorer_pool_free=self.scorer_pool.num_free)
        return out
