"""A minimal PPO loop in plain PyTorch whose rollout stage is ``oppo_runtime.OPPORollout``.

Task: the embedded "case game" (answer in the case of the prompt's first letter; reward = the
fraction of response letters in that case). Runs on the CPU in about a minute:

    python examples/plain_pytorch_ppo.py --steps 60

Everything but the rollout is ordinary PPO: GAE, whitened advantages, clipped policy and value
losses (``oppo_runtime.ppo.core_algos``). With ``--overcommit`` > 0, sequences started under an
older policy finish in a later step; their tokens carry the version and behaviour log-prob they
were sampled with, and the loss reweights them (decoupled PPO, truncated importance weights).
"""
from __future__ import annotations

import argparse
import copy

import torch

from oppo_runtime import OPPORollout, SamplingParams
from oppo_runtime.models import DenseContext, load_model
from oppo_runtime.ppo import core_algos as algos
from oppo_runtime.ppo.default_task import case_reward, default_prompts, ensure_default_models


def response_outputs(model, exp, head: str, temperature: float = 1.0) -> torch.Tensor:
    """One packed forward over prompt+response rows -> [B, T]: log-probs ("logprobs") of the
    response tokens or values ("values") before each of them; 0 on padding."""
    seqs = [p + r for p, r in zip(exp.prompts, exp.responses)]
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(n) for n in lens.tolist()])
    hidden = model(ids, pos, DenseContext(cu, int(lens.max())))
    mask = exp.response_mask
    B, T = mask.shape
    plen = exp.prompt_mask.sum(-1)
    cols = torch.arange(T).expand(B, T)
    rows = (cu[:-1, None] + plen[:, None] - 1 + cols)[mask]      # hidden state before response token j
    if head == "logprobs":
        vals = model.compute_logprobs(hidden[rows], exp.response_ids[mask], temperature)
    else:
        vals = model.compute_scores(hidden[rows])
    return torch.zeros(B, T, dtype=vals.dtype).masked_scatter(mask, vals)


def train(steps: int = 60, batch_size: int = 16, overcommit: int = 4, lr: float = 3e-3, ppo_epochs: int = 2,
          kl_coef: float = 0.01, max_new_tokens: int = 16, cache_dir: str = "~/.cache/oppo_runtime",
          seed: int = 0, log_every: int = 10) -> list[float]:
    """Run PPO on the default task; returns the mean reward of each step's batch."""
    torch.manual_seed(seed)
    paths = ensure_default_models(__import__("os").path.expanduser(cache_dir))
    actor = load_model(paths["actor"])                       # trained in place; the engine shares it
    critic = load_model(paths["critic"], kind="score")
    reference = copy.deepcopy(actor).requires_grad_(False)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)
    rollout = OPPORollout(actor, critic=critic, reference=reference, rule_reward=case_reward,
                          sampling=sampling, chunk_size=8, overcommit=overcommit, seed=seed)
    opt = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=lr)
    prompt_stream = iter(p["prompt_ids"] for p in default_prompts(10**6, seed=seed))
    history = []
    for step in range(steps):
        # ---- rollout: generate + score, overlapped (this is the whole integration)
        new = [next(prompt_stream) for _ in range(rollout.prompts_needed(batch_size))]
        exp = rollout.generate_and_score(new, batch_size=batch_size)
        mask = exp.response_mask
        # ---- advantages
        with torch.no_grad():
            prox = response_outputs(actor, exp, "logprobs")         # the policy at the start of this update
            weights = algos.truncated_importance_weights(prox, exp.logprobs, cap=2.0)
            kl = algos.kl_estimate(exp.logprobs, exp.ref_logprobs, "k1")
            rewards = algos.token_level_rewards(exp.scores, kl, mask, kl_coef)
            adv, returns = algos.compute_gae(rewards, exp.values, mask, gamma=1.0, lam=0.95)
            adv = algos.masked_whiten(adv, mask)
        # ---- PPO update of actor and critic
        for _ in range(ppo_epochs):
            logp = response_outputs(actor, exp, "logprobs")
            values = response_outputs(critic, exp, "values")
            pg_loss, pg_stats = algos.policy_loss(logp, prox, adv, mask, importance_weights=weights)
            vf_loss, _ = algos.value_loss(values, exp.values, returns, mask, cliprange_value=0.2)
            opt.zero_grad()
            (pg_loss + 0.5 * vf_loss).backward()
            torch.nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], 1.0)
            opt.step()
        rollout.update_weights()                                   # shared parameters: no copy
        history.append(float(exp.scores.mean()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            stale = float((exp.versions[mask] < rollout.version - 1).float().mean())
            print(f"step {step:4d}  reward {history[-1]:.3f}  kl {float(algos.masked_mean(kl, mask)):+.4f}  "
                  f"clipfrac {float(pg_stats['clipfrac']):.3f}  stale_tokens {stale:.2f}  "
                  f"deferred {exp.stats['deferred']}")
    return history


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--overcommit", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hist = train(args.steps, args.batch_size, args.overcommit, args.lr)
    k = max(1, len(hist) // 5)
    print(f"mean reward: first {k} steps {sum(hist[:k]) / k:.3f} -> last {k} steps {sum(hist[-k:]) / k:.3f}")


if __name__ == "__main__":
    main()
