"""GRPO: group-relative advantages and a clipped surrogate, no critic."""

from __future__ import annotations

from typing import Any

import torch

from retool.algorithm import PolicyBatch, PolicyGradient


class GRPO(PolicyGradient):
    """Group Relative Policy Optimization.

    Each problem is rolled out ``group_size`` times; a trajectory's advantage is its reward minus its group's
    mean (divided by the group's std unless ``scale_by_std`` is off, as Dr. GRPO recommends), applied to every
    token the model wrote. The loss is the clipped surrogate of :class:`~retool.PolicyGradient` with separate
    lower and upper clip ranges (DAPO's clip-higher), averaged over all model-written tokens of the
    mini-batch, plus an optional KL penalty to the frozen initial policy (the k3 estimator). Interpreter
    tokens never enter any term.

    Args:
        group_size: Trajectories rolled out per problem (at least 2: advantages are relative to the group).
        scale_by_std: Divide advantages by the group's reward std.
        std_eps: Added to the std before dividing.
        **kwargs: The options of every RL algorithm (``clip_low``, ``clip_high``, ``kl_coef``, ``lr``,
            ``epochs``, ``mini_batch_size``, ``eval_every``, ...).
    """

    def __init__(self, group_size: int = 4, scale_by_std: bool = True, std_eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(group_size=group_size, **kwargs)
        if group_size < 2:
            raise ValueError(f"{type(self).__name__} needs group_size >= 2: advantages are relative to the group")
        self.scale_by_std = scale_by_std
        self.std_eps = std_eps

    def advantages(self, batch: PolicyBatch) -> torch.Tensor:
        return (
            group_advantages(batch.rewards, self.group_size, self.scale_by_std, self.std_eps)[:, None]
            * batch.response_mask
        )


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
