"""GRPO: group-relative advantages and a clipped surrogate, no critic."""

from __future__ import annotations

from typing import Any

import torch

from retool.algorithm import PolicyBatch, PolicyGradient


class GRPO(PolicyGradient):
    """Group Relative Policy Optimization.

    Each problem is rolled out ``group_size`` times; a trajectory's advantage is its reward minus its group's
    mean (divided by the group's std unless ``scale_by_std`` is off, as Dr. GRPO recommends), applied to every
    token the model wrote. The loss is the PPO clipped surrogate with separate lower and upper clip ranges
    (DAPO's clip-higher), averaged over all model-written tokens of the mini-batch, plus an optional KL
    penalty to the frozen initial policy (the k3 estimator). Interpreter tokens never enter any term.

    Args:
        group_size: Trajectories rolled out per problem.
        clip_low: Lower clip range: the ratio is kept above ``1 - clip_low``.
        clip_high: Upper clip range: the ratio is kept below ``1 + clip_high``.
        kl_coef: Weight of the KL penalty to the reference policy (0 = none, and no reference is kept).
        scale_by_std: Divide advantages by the group's reward std.
        entropy_coef: Weight of an entropy bonus (0 = none; entropy is logged either way).
        std_eps: Added to the std before dividing.
        **kwargs: The options of every RL algorithm (``lr``, ``epochs``, ``mini_batch_size``, ``eval_every``, ...).
    """

    def __init__(
        self,
        group_size: int = 4,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        kl_coef: float = 0.0,
        scale_by_std: bool = True,
        entropy_coef: float = 0.0,
        std_eps: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(group_size=group_size, **kwargs)
        if group_size < 2:
            raise ValueError("GRPO needs group_size >= 2: advantages are relative to the group")
        if clip_low < 0 or clip_high < 0 or kl_coef < 0:
            raise ValueError("clip_low, clip_high and kl_coef must be >= 0")
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.kl_coef = kl_coef
        self.scale_by_std = scale_by_std
        self.entropy_coef = entropy_coef
        self.std_eps = std_eps

    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef != 0

    def has_signal(self, batch: PolicyBatch) -> bool:
        # The KL and entropy terms have gradients even when every advantage is zero.
        return super().has_signal(batch) or self.kl_coef > 0 or self.entropy_coef != 0

    def advantages(self, batch: PolicyBatch) -> torch.Tensor:
        return (
            group_advantages(batch.rewards, self.group_size, self.scale_by_std, self.std_eps)[:, None]
            * batch.response_mask
        )

    def loss(
        self, batch: PolicyBatch, logprobs: torch.Tensor, entropy: torch.Tensor, token_count: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch.response_mask.to(logprobs.device)
        advantages = batch.advantages.to(logprobs.device)
        old = batch.old_logprobs.to(logprobs.device) if batch.old_logprobs is not None else logprobs.detach()
        ratio = torch.exp(logprobs - old)
        unclipped = ratio * advantages
        clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high) * advantages
        per_token = -torch.minimum(unclipped, clipped)
        is_clipped = (clipped < unclipped).float()
        drift = (logprobs.detach() - old).float()  # log(new/old); the tokens were sampled from old
        stats: dict[str, torch.Tensor] = {
            "train/policy_loss": (per_token.detach() * mask).sum(),
            "train/clip_frac": (is_clipped * mask).sum(),
            # k3 KL from the policy that sampled the batch to the one being updated: how far the epochs and
            # mini-batches of this step have moved it (0 for a single on-policy pass); logged with or without
            # a reference model.
            "train/ppo_kl": ((torch.exp(drift) - drift - 1) * mask).sum(),
            "train/entropy": (entropy.detach() * mask).sum(),
            "train/ratio": (ratio.detach() * mask).sum(),
        }
        if self.entropy_coef:
            per_token = per_token - self.entropy_coef * entropy
        if self.ref_model is not None and batch.ref_logprobs is not None:
            delta = batch.ref_logprobs.to(logprobs.device) - logprobs
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
            per_token = per_token + self.kl_coef * kl
            stats["train/kl"] = (kl.detach() * mask).sum()
        loss = (per_token * mask).sum() / token_count
        return loss, stats


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """(N,) advantages of rewards laid out group by group: reward minus group mean, over group std if asked.

    A group whose rewards are all equal gets zero advantages (it carries no learning signal).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).float()
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)
