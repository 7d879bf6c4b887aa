"""TRL's PPOTrainer (``trl.experimental.ppo``, TRL 1.12.0) with its rollout stage run by oppo_runtime.

    from oppo_trl import OPPOPPOTrainer as PPOTrainer     # the one line a TRL script changes

``OPPOPPOTrainer`` takes exactly ``PPOTrainer``'s arguments (plus an optional ``oppo`` dict of
``OPPORollout`` options: chunk_size, pool_pages, ...). TRL's ``train()`` runs unchanged; while it
runs, the few functions its rollout stage calls are answered by one ``OPPORollout``:

  TRL's rollout stage                         answered by
  batch_generation(policy, queries, ...)      generate_and_score(): tokens; the scorers prefill
                                              chunk by chunk while the actor decodes
  selective_log_softmax(gen logits, resp)     the engine's behaviour log-probs
  forward(ref_policy, ...) -> ref log-probs   the reference scorer's log-probs
  get_reward(value_model, ...)                the critic's values (+ V after the last token,
                                              which TRL reads one position past the response)
  get_reward(reward_model, ...)               the reward model's score at the last token

Everything after (KL penalty, GAE, whitening, the clipped losses, the optimizer) is TRL's own
code on the tensors it would have built itself. The engine wraps TRL's policy, value, reward and
reference modules sharing their parameters, so no weights are copied after an update.
Limits: no PEFT reference (ref_model=None), no overcommit (TRL pairs each batch with its queries).
"""
from __future__ import annotations

import contextlib
import os
import types

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import trl.experimental.ppo.ppo_trainer as _trl  # noqa: E402
from trl.experimental.ppo import PPOTrainer  # noqa: E402

from oppo_runtime import OPPORollout, SamplingParams  # noqa: E402

__all__ = ["OPPOPPOTrainer"]


class _Rows:
    """Per-token log-probs standing in for the logits TRL would slice, scale and log-softmax."""

    def __init__(self, logprobs: torch.Tensor):
        self.logprobs = logprobs

    def __getitem__(self, idx):
        return self if isinstance(idx, tuple) else _Rows(self.logprobs[idx])   # [:, a:b] is already applied

    def __itruediv__(self, temperature):   # the engine's log-probs already use the temperature
        return self


class OPPOPPOTrainer(PPOTrainer):
    def __init__(self, *args, oppo: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.ref_model is None:
            raise ValueError("OPPOPPOTrainer needs an explicit ref_model (PEFT adapters as reference are not supported)")
        a, tok = self.args, self.processing_class
        stop = self.stop_token_id
        sampling = SamplingParams(temperature=a.temperature, max_new_tokens=a.response_length, ignore_eos=True,
                                  stop_token_ids=() if stop is None else (stop,))
        wrapper = self.accelerator.unwrap_model(self.model)
        self._policy, self._value_model = wrapper.policy, wrapper.value_model
        self.oppo = OPPORollout(self._policy, tokenizer=tok, reward_model=self.reward_model, critic=self._value_model,
                                reference=self.ref_model, sampling=sampling, critic_final_value=True,
                                pad_token_id=tok.pad_token_id, seed=a.seed, **(oppo or {}))
        self._batch = None
        self._rollouts = 0

    # ------------------------------------------------------------------ the rollout stage
    def _generate_and_score(self, queries: torch.Tensor, pad: int):
        if self._rollouts:
            self.oppo.update_weights()          # shared parameters: TRL's optimizer already changed them
        self._rollouts += 1
        prompts = [row[row != pad].tolist() for row in queries.cpu()]
        exp = self.oppo.generate_and_score(prompts)
        order = sorted(range(len(exp)), key=lambda b: exp.prompt_uids[b])      # back to the queries' order
        B, P = queries.shape
        T = exp.response_ids.shape[1]
        assert exp.prompt_ids.shape[1] <= P, "a prompt came back longer than its padded query"
        qr = torch.full((B, P + T), pad, dtype=torch.long)
        qr[:, P - exp.prompt_ids.shape[1]:P] = exp.prompt_ids[order]
        qr[:, P:] = exp.response_ids[order]
        lens = exp.response_lengths[order]
        full_values = torch.zeros(B, P + T, 1)
        full_values[:, P - 1:P - 1 + T, 0] = exp.values[order]
        for b in range(B):                      # TRL reads V one past the last response token
            if lens[b] < T:
                full_values[b, P - 1 + lens[b], 0] = exp.final_values[order][b]
        dev = queries.device
        self._batch = types.SimpleNamespace(
            query_responses=qr.to(dev), logprobs=exp.logprobs[order].to(dev), ref_logprobs=exp.ref_logprobs[order].to(dev),
            full_values=full_values.to(dev), scores=exp.scores[order].to(dev), stats=exp.stats)
        return self._batch.query_responses, _Rows(self._batch.logprobs)

    def _rows_of(self, query_responses: torch.Tensor) -> torch.Tensor:
        """Which rows of the current batch these (micro-batch) rows are; identical rows are interchangeable."""
        full = self._batch.query_responses
        n = min(full.shape[1], query_responses.shape[1])
        same = (query_responses[:, None, :n] == full[None, :, :n]).all(-1)
        assert bool(same.any(-1).all()), "TRL passed a sequence this rollout did not produce"
        return same.float().argmax(-1)

    @contextlib.contextmanager
    def _oppo_rollout_stage(self):
        orig = {k: getattr(_trl, k) for k in ("batch_generation", "selective_log_softmax", "forward", "get_reward")}
        train_temperature = self.args.temperature + 1e-7

        def batch_generation(model, queries, batch_size, pad_token_id, generation_config):
            if model is not self._policy or abs(generation_config.temperature - train_temperature) > 1e-9:
                self._batch = None                                        # eval sampling stays TRL's
                return orig["batch_generation"](model, queries, batch_size, pad_token_id, generation_config)
            return self._generate_and_score(queries, pad_token_id)

        def selective_log_softmax(logits, index):
            if isinstance(logits, _Rows):
                return logits.logprobs
            return orig["selective_log_softmax"](logits, index)

        def forward(model, query_responses, pad_token_id):
            if model is self.ref_model and self._batch is not None:
                return types.SimpleNamespace(logits=_Rows(self._batch.ref_logprobs[self._rows_of(query_responses)]))
            return orig["forward"](model, query_responses, pad_token_id)

        def get_reward(model, query_responses, pad_token_id, context_length):
            if self._batch is not None and model is self._value_model:
                return self._batch.full_values[self._rows_of(query_responses)], None, None
            if self._batch is not None and model is self.reward_model:
                return None, self._batch.scores[self._rows_of(query_responses)], None
            return orig["get_reward"](model, query_responses, pad_token_id, context_length)

        patched = dict(batch_generation=batch_generation, selective_log_softmax=selective_log_softmax,
                       forward=forward, get_reward=get_reward)
        for k, v in patched.items():
            setattr(_trl, k, v)
        try:
            yield
        finally:
            for k, v in orig.items():
                setattr(_trl, k, v)
            self._batch = None

    def train(self):
        with self._oppo_rollout_stage():
            return super().train()
