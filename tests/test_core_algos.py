"""PPO pure functions against values computed by hand (the arithmetic is in the comments)."""
import math

import pytest
import torch

from oppo_runtime.ppo.core_algos import (
    agg_loss, check_finite, compute_gae, entropy_loss, explained_variance, kl_estimate, kl_loss,
    masked_mean, masked_var, masked_whiten, policy_loss, token_level_rewards,
    truncated_importance_weights, value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------- masked statistics

def test_masked_mean_ignores_padding():
    close(masked_mean(t([1, 2, 3, 100]), t([1, 1, 1, 0])), 2.0)


def test_masked_mean_per_row_with_bool_mask():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(masked_mean(t([2, 4, 9], [7, 9, 9]), mask, dim=1), [3.0, 7.0])


def test_masked_mean_of_empty_mask_is_zero():
    close(masked_mean(t([1, 2]), t([0, 0])), 0.0)


def test_masked_var_is_unbiased_by_default():
    # mean 2, squared deviations 1 + 0 + 1 = 2, / (3 - 1) = 1
    close(masked_var(t([1, 2, 3, 100]), t([1, 1, 1, 0])), 1.0)
    close(masked_var(t([1, 2, 3, 100]), t([1, 1, 1, 0]), unbiased=False), 2 / 3)


def test_masked_var_of_single_entry_is_zero():
    close(masked_var(t([5, 100]), t([1, 0])), 0.0)


def test_whiten_gives_zero_mean_unit_variance_and_zero_padding():
    out = masked_whiten(t([1, 2, 3, 100]), t([1, 1, 1, 0]))   # mean 2, var 1
    close(out, [[-1, 0, 1, 0]], tol=1e-7)


def test_whiten_without_shift_keeps_the_mean():
    out = masked_whiten(t([1, 2, 3, 100]), t([1, 1, 1, 0]), shift_mean=False)
    close(out, [[1, 2, 3, 0]], tol=1e-7)


# ---------------------------------------------------------------- KL and rewards

@pytest.mark.parametrize("kind, d_pos, d_neg", [
    ("k1", 1.0, -1.0),
    ("k2", 0.5, 0.5),
    ("k3", math.exp(-1.0), math.e - 2.0),   # exp(ref - logp) - (ref - logp) - 1 at d = +-1
    ("abs", 1.0, 1.0),
])
def test_kl_estimators(kind, d_pos, d_neg):
    logp, ref = t(-1.0, -2.0), t(-2.0, -1.0)   # logp - ref = +1, -1
    close(kl_estimate(logp, ref, kind), [d_pos, d_neg], tol=1e-12)


def test_kl_accepts_verl_names():
    logp, ref = t(-1.0), t(-2.0)
    close(kl_estimate(logp, ref, "low_var_kl"), kl_estimate(logp, ref, "k3"))


def test_kl_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(t(0.0), t(0.0), "k4")


def test_kl_loss_aggregates_the_estimator():
    # k1 over two response tokens: (1 + -1) / 2 = 0; padding ignored
    close(kl_loss(t([-1, -2, 0]), t([-2, -1, 50]), t([1, 1, 0]), kind="k1"), 0.0)


def test_token_level_rewards_put_score_on_last_response_token():
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    out = token_level_rewards(t(1.0, 2.0), kl, mask, kl_coef=0.5)
    close(out, [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]])


def test_token_level_rewards_reject_an_empty_response():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_level_rewards(t(1.0, 2.0), t([0, 0], [0, 0]), t([1, 0], [0, 0]), kl_coef=0.1)


# ---------------------------------------------------------------- GAE

def test_gae_on_three_tokens_by_hand():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72); V after the last token is 0
    # t=2: delta = 1 + 0 - 0.7 = 0.3                      A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03               A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04               A0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = compute_gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_with_gamma_lam_one_returns_reward_to_go():
    _, ret = compute_gae(t([0.5, 0, 1]), t([3, -2, 7]), t([1, 1, 1]), gamma=1.0, lam=1.0)
    close(ret, [[1.5, 1.0, 1.0]])


def test_gae_ragged_rows_equal_their_unpadded_selves():
    rewards = t([0, 0, 1], [0, 1, 0])
    values = t([0.5, 0.6, 0.7], [0.2, 0.4, 5.0])   # 5.0 is padding and must not leak
    adv, ret = compute_gae(rewards, values, t([1, 1, 1], [1, 1, 0]), gamma=0.9, lam=0.8)
    adv_short, ret_short = compute_gae(t([0, 1]), t([0.2, 0.4]), t([1, 1]), gamma=0.9, lam=0.8)
    close(adv[1, :2], adv_short[0])
    close(ret[1, :2], ret_short[0])
    close(adv[1, 2], 0.0)
    close(ret[1, 2], 0.0)


def test_gae_passes_through_holes_in_the_mask():
    # token 1 is masked out (e.g. tool output): the recursion skips it
    # t=2: A2 = 1 - 0.7 = 0.3;  t=0: delta = 0.9*0.7 - 0.5 = 0.13, A0 = 0.13 + 0.72*0.3 = 0.346
    adv, _ = compute_gae(t([0, 0, 1]), t([0.5, 9.0, 0.7]), t([1, 0, 1]), gamma=0.9, lam=0.8)
    close(adv, [[0.346, 0.0, 0.3]])


@pytest.mark.parametrize("T", [1, 7, 64, 65, 300, 4200])     # 4200: blocks of blocks (> 64 x 64)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_vectorised_gae_equals_the_per_token_recursion(T, gamma, lam):
    """Ragged rows, holes in the mask, garbage at masked positions (rewards, values, even NaN-free
    huge numbers), float64 and float32: the blockwise scan equals the recursion."""
    from oppo_runtime.ppo.core_algos import compute_gae_loop
    g = torch.Generator().manual_seed(T)
    B = 5
    mask = (torch.rand(B, T, generator=g) > 0.15).double()
    lens = torch.randint(0, T + 1, (B,), generator=g)
    mask *= (torch.arange(T)[None, :] < lens[:, None]).double()
    mask[0] = 0.0                                   # a row with no token at all
    if T > 3:
        mask[1, :] = 1.0                            # a full row
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.where(mask > 0, values, torch.full_like(values, 1e6))    # padding must not leak
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        got = compute_gae(rewards.to(dtype), values.to(dtype), mask, gamma=gamma, lam=lam)
        want = compute_gae_loop(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
        for a, b in zip(got, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))
    nan_pad = torch.where(mask > 0, values, torch.full_like(values, float("nan")))
    adv, ret = compute_gae(rewards, nan_pad, mask, gamma=gamma, lam=lam)    # NaN padding stays out
    clean = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert torch.equal(adv, clean[0]) and torch.equal(ret, clean[1])


# ---------------------------------------------------------------- policy loss

def _one_token_policy_loss(ratio, adv, **kw):
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    return policy_loss(logp, torch.zeros_like(logp), t([adv]), t([1.0]), **kw)


def test_policy_loss_inside_clip_range_is_unclipped():
    loss, stats = _one_token_policy_loss(1.1, 1.0, clip_ratio_low=0.2)
    close(loss, -1.1)
    close(stats["clipfrac"], 0.0)


def test_policy_loss_clips_ratio_above_range_for_positive_advantage():
    loss, stats = _one_token_policy_loss(1.5, 1.0, clip_ratio_low=0.2)
    close(loss, -1.2)
    close(stats["clipfrac"], 1.0)


def test_policy_loss_clips_ratio_below_range_for_negative_advantage():
    loss, stats = _one_token_policy_loss(0.5, -1.0, clip_ratio_low=0.2)   # max(0.5, 0.8)
    close(loss, 0.8)
    close(stats["clipfrac"], 1.0)


def test_policy_loss_keeps_the_pessimistic_unclipped_term():
    loss, stats = _one_token_policy_loss(1.5, -1.0, clip_ratio_low=0.2)   # max(1.5, 1.2)
    close(loss, 1.5)
    close(stats["clipfrac"], 0.0)


def test_policy_loss_asymmetric_clip_uses_clip_ratio_high():
    loss, _ = _one_token_policy_loss(1.5, 1.0, clip_ratio_low=0.2, clip_ratio_high=0.28)
    close(loss, -1.28)


def test_dual_clip_bounds_the_loss_for_negative_advantage():
    loss, stats = _one_token_policy_loss(5.0, -1.0, clip_ratio_low=0.2, dual_clip_c=3.0)
    close(loss, 3.0)                      # standard PPO would give 5
    close(stats["dual_clipfrac"], 1.0)


def test_dual_clip_leaves_loss_below_the_bound_alone():
    loss, stats = _one_token_policy_loss(2.0, -1.0, clip_ratio_low=0.2, dual_clip_c=3.0)
    close(loss, 2.0)
    close(stats["dual_clipfrac"], 0.0)


def test_dual_clip_ignores_positive_advantages():
    loss, stats = _one_token_policy_loss(5.0, 1.0, clip_ratio_low=0.2, dual_clip_c=3.0)
    close(loss, -1.2)
    close(stats["dual_clipfrac"], 0.0)


def test_dual_clip_c_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip_c"):
        _one_token_policy_loss(1.0, 1.0, dual_clip_c=0.9)


def test_policy_loss_stats_on_a_padded_batch():
    # two response tokens with ratios 1.5 and 1.0, one padding token with a wild ratio
    logp = t([math.log(1.5), 0.0, 30.0])
    loss, stats = policy_loss(logp, torch.zeros_like(logp), t([1.0, 2.0, 1.0]), t([1, 1, 0]))
    close(loss, (-1.2 - 2.0) / 2)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.25)
    close(stats["approx_kl"], 0.5 * (math.log(1.5) ** 2 + 0.0) / 2)   # TRL's 0.5 mean(logratio^2)


def test_clipped_tokens_get_no_gradient():
    logp = torch.tensor([math.log(1.5), math.log(1.1)], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(2, dtype=torch.float64), t([1.0, 1.0]), t([1, 1]))
    loss.backward()
    close(logp.grad, [0.0, -1.1 / 2])     # d(-r)/dlogp = -r, token-mean over 2


def test_importance_weights_scale_the_per_token_loss():
    logp = t([[math.log(1.1), math.log(1.1)]])
    kw = dict(old_logprob=torch.zeros_like(logp), advantages=t([[1.0, 1.0]]), mask=t([[1, 1]]))
    loss, _ = policy_loss(logp, importance_weights=t([[0.5, 1.0]]), **kw)
    close(loss, (-0.55 - 1.1) / 2)


def test_truncated_importance_weights_cap_and_carry_no_gradient():
    prox = torch.tensor([math.log(0.5), math.log(0.3), -1.0], dtype=torch.float64, requires_grad=True)
    behav = torch.tensor([math.log(0.25), math.log(0.6), -1.0], dtype=torch.float64)
    w = truncated_importance_weights(prox, behav, cap=1.5)
    close(w, [1.5, 0.5, 1.0])             # 2 capped to 1.5, 0.5, 1
    assert not w.requires_grad


# ---------------------------------------------------------------- value loss, aggregation, EV

@pytest.mark.parametrize("v, old, ret, loss, clipfrac", [
    (1.1, 1.0, 2.0, 0.5 * 0.81, 0.0),     # inside the clip range: 0.5 (1.1 - 2)^2
    (1.5, 1.0, 2.0, 0.5 * 0.64, 1.0),     # clipped to 1.2: max(0.25, 0.64)
    (0.5, 1.0, 0.0, 0.5 * 0.64, 1.0),     # clipped to 0.8: max(0.25, 0.64)
    (0.5, 1.0, 2.0, 0.5 * 2.25, 0.0),     # clipped 0.8 is closer: max(2.25, 1.44)
])
def test_value_loss_takes_the_larger_of_clipped_and_unclipped(v, old, ret, loss, clipfrac):
    got, stats = value_loss(t([v]), t([old]), t([ret]), t([1.0]), cliprange_value=0.2)
    close(got, loss)
    close(stats["vf_clipfrac"], clipfrac)


def test_value_loss_without_clipping():
    got, stats = value_loss(t([1.5, 9.0]), t([1.0, 0.0]), t([2.0, 0.0]), t([1, 0]), cliprange_value=None)
    close(got, 0.5 * 0.25)
    close(stats["vf_clipfrac"], 0.0)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 10 / 4),                # all 4 tokens
    ("seq-mean-token-sum", (6 + 4) / 2),   # per-row sums 6 and 4
    ("seq-mean-token-mean", (2 + 4) / 2),  # per-row means 2 and 4
])
def test_agg_loss_modes(mode, expected):
    close(agg_loss(t([1, 2, 3], [4, 50, 50]), t([1, 1, 1], [1, 0, 0]), mode), expected)


def test_agg_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="token-sum"):
        agg_loss(t([1.0]), t([1.0]), "token-sum")


def test_entropy_loss_is_the_aggregated_entropy():
    close(entropy_loss(t([1, 3, 99]), t([1, 1, 0])), 2.0)


@pytest.mark.parametrize("values, expected", [
    ([1, 2, 3], 1.0),          # perfect critic
    ([2, 2, 2], 0.0),          # constant at the mean
    ([1, 2, 2], 2 / 3),        # residual [0, 0, 1]: var 2/9 over var(R) 2/3
])
def test_explained_variance(values, expected):
    close(explained_variance(t(values + [7]), t([1, 2, 3, 0]), t([1, 1, 1, 0])), expected, tol=1e-7)


def test_explained_variance_of_constant_returns_is_finite():
    close(explained_variance(t([1, 1]), t([1, 1]), t([1, 1])), 1.0)
    close(explained_variance(t([0, 2]), t([1, 1]), t([1, 1])), 0.0)


# ---------------------------------------------------------------- NaN / inf guard

def test_check_finite_names_the_tensor_and_counts_bad_entries():
    x = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    with pytest.raises(FloatingPointError, match=r"scores: 2 non-finite entries \(1 NaN, 1 inf\)"):
        check_finite("scores", x)


def test_check_finite_ignores_masked_out_entries_and_returns_the_tensor():
    x = torch.tensor([1.0, float("inf")])
    assert check_finite("logprob", x, mask=torch.tensor([1, 0])) is x
