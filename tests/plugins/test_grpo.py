"""GRPO's advantages and loss: group normalization, clipping, KL, and that masked tokens get no gradient."""

from __future__ import annotations

import math

import pytest
import torch

from retool import PolicyBatch
from retool_plugins.algorithms.grpo import GRPO, group_advantages


def test_group_advantages_normalize_within_each_group() -> None:
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4, scale_by_std=True)
    first = adv[:4]
    assert first[0] > 0 and torch.all(first[1:] < 0)
    assert first.mean().abs() < 1e-6 and (first.std() - 1).abs() < 1e-4
    assert torch.all(adv[4:] == 0)  # equal rewards: no signal
    raw = group_advantages(rewards, 4, scale_by_std=False)
    assert torch.allclose(raw[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3, scale_by_std=True)


def _batch(mask: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor | None = None) -> PolicyBatch:
    n, r = mask.shape
    return PolicyBatch(
        input_ids=torch.zeros((n, r + 1), dtype=torch.long),
        attention_mask=torch.ones((n, r + 1), dtype=torch.long),
        response_mask=mask,
        rewards=torch.zeros(n),
        advantages=advantages,
        old_logprobs=old,
    )


def test_masked_tokens_get_no_gradient_and_loss_is_token_mean() -> None:
    algo = GRPO(group_size=2)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([[2.0] * 5, [-1.0] * 5]) * mask
    logprobs = torch.full((2, 5), -1.0, requires_grad=True)
    loss, stats = algo.loss(_batch(mask, adv), logprobs, torch.zeros(2, 5), mask.sum())
    loss.backward()
    grad = logprobs.grad
    assert torch.all(grad[mask == 0] == 0)
    # On-policy (ratio 1): d loss / d logprob = -A / tokens on every model-written token.
    assert torch.allclose(grad[mask == 1], -adv[mask == 1] / mask.sum())
    assert torch.isclose(loss, -(adv * mask).sum() / mask.sum())
    assert stats["train/clip_frac"] == 0


def test_clipping_stops_the_gradient_beyond_the_range() -> None:
    algo = GRPO(group_size=2, clip_low=0.2, clip_high=0.28)
    mask = torch.ones(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    # ratios 1.5 (A>0: clipped), 1.1 (not), 0.5 (A<0: clipped), 0.9 (not)
    ratios = torch.tensor([[1.5, 1.1, 0.5, 0.9]])
    old = torch.zeros(1, 4)
    logprobs = ratios.log().clone().requires_grad_(True)
    loss, stats = algo.loss(_batch(mask, adv, old), logprobs, torch.zeros(1, 4), mask.sum())
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 2] == 0
    assert logprobs.grad[0, 1] != 0 and logprobs.grad[0, 3] != 0
    assert stats["train/clip_frac"] == 2
    # ppo_kl (k3 from the sampling policy to this one), summed over tokens: sum(r - 1 - log r) for each ratio r
    expected = float(sum(r - 1 - math.log(r) for r in (1.5, 1.1, 0.5, 0.9)))
    assert float(stats["train/ppo_kl"]) == pytest.approx(expected, rel=1e-5)
    _, on_policy = algo.loss(_batch(mask, adv, old), old.clone(), torch.zeros(1, 4), mask.sum())
    assert float(on_policy["train/ppo_kl"]) == 0.0


def test_kl_penalty_uses_the_reference_and_is_zero_at_equality() -> None:
    algo = GRPO(group_size=2, kl_coef=0.5)
    algo.ref_model = torch.nn.Identity()  # marks that a reference exists; its log-probs come in the batch
    mask = torch.ones(1, 3)
    batch = _batch(mask, torch.zeros(1, 3))
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    batch.ref_logprobs = logprobs.detach().clone()
    loss, stats = algo.loss(batch, logprobs, torch.zeros(1, 3), mask.sum())
    assert float(stats["train/kl"]) == pytest.approx(0.0, abs=1e-7)
    batch.ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5]])
    loss, stats = algo.loss(batch, logprobs, torch.zeros(1, 3), mask.sum())
    assert float(stats["train/kl"]) > 0 and float(loss.detach()) > 0


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="group_size >= 2"):
        GRPO(group_size=1)
    with pytest.raises(ValueError, match=">= 0"):
        GRPO(clip_low=-0.1)


def test_an_entropy_bonus_trains_even_when_every_advantage_is_zero(tiny_model_dir) -> None:
    from retool.policy import Policy

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 6))
    batch = PolicyBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(2, 4),
        rewards=torch.zeros(2),
        advantages=torch.zeros(2, 4),  # equal rewards: no policy-gradient signal at all
    )
    with_bonus = GRPO(group_size=2, entropy_coef=0.1, policy=Policy(name_or_path=str(tiny_model_dir)))
    with_bonus.configure_model()
    assert with_bonus.has_signal(batch) and with_bonus.needs_entropy_grad()
    logprobs, entropy = with_bonus.sequence_logprobs(
        with_bonus.model, batch, with_entropy=True, entropy_grad=with_bonus.needs_entropy_grad()
    )
    loss, stats = with_bonus.loss(batch, logprobs, entropy, batch.response_mask.sum())
    loss.backward()
    grads = [p.grad for p in with_bonus.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # the bonus reaches the weights
    assert torch.isclose(loss, -0.1 * entropy.detach().mean(), atol=1e-6)
    assert not stats["train/entropy"].requires_grad

    plain = GRPO(group_size=2, policy=Policy(name_or_path=str(tiny_model_dir)))
    plain.configure_model()
    _, entropy = plain.sequence_logprobs(plain.model, batch, with_entropy=True, entropy_grad=plain.needs_entropy_grad())
    assert not plain.needs_entropy_grad() and not entropy.requires_grad  # logged only: no graph kept
