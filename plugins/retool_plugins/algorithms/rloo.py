"""RLOO: REINFORCE leave-one-out, each trajectory's baseline the mean reward of the rest of its group."""

from __future__ import annotations

from typing import Any

import torch

from retool.algorithm import PolicyBatch, PolicyGradient


class RLOO(PolicyGradient):
    """REINFORCE Leave-One-Out (Ahmadian et al., 2024).

    A trajectory's advantage is its reward minus the mean reward of the other ``group_size - 1`` trajectories
    of its problem, applied to every token the model wrote: a baseline that needs no critic and, unlike GRPO's,
    no division by the group's std, so its advantages are unbiased. The loss is the clipped surrogate of
    :class:`~retool.PolicyGradient`, as GRPO's.

    Args:
        group_size: Trajectories rolled out per problem (at least 2: each needs others for its baseline).
        **kwargs: The options of every RL algorithm (``clip_low``, ``clip_high``, ``kl_coef``, ``lr``, ...).
    """

    def __init__(self, group_size: int = 4, **kwargs: Any) -> None:
        super().__init__(group_size=group_size, **kwargs)
        if group_size < 2:
            raise ValueError("RLOO needs group_size >= 2: a trajectory's baseline is the rest of its group")

    def advantages(self, batch: PolicyBatch) -> torch.Tensor:
        return leave_one_out(batch.rewards, self.group_size)[:, None] * batch.response_mask


def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards laid out group by group, each minus the mean of the other rewards of its group.

    Equal to ``group_size / (group_size - 1)`` times the reward minus its group's mean.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (at least 2)")
    grouped = rewards.view(-1, group_size).float()
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)
