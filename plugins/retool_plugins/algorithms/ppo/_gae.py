"""GAE over the tokens the model wrote, and the critic's loss: pure functions of (rows, response columns) tensors.

A trajectory's response interleaves the model's tokens (mask 1) with interpreter tokens (mask 0). Interpreter
tokens are not actions: the environment wrote them. So the recursion runs over the model's tokens alone, as if
they were consecutive steps: a masked token gets no reward, no value and no TD error, the advantage carries
across an interpreter block with one factor of ``gamma * lam`` (not one per interpreter token), and the token
before a block bootstraps from the value of the first model token after it. The outcome reward lands on the
last token the model wrote, wherever the sequence ends (after an interpreter block, or at a length cut), and
the step after it is terminal: its value is 0, also when the trajectory was cut short. Peers shipped each of
these wrong once (verl PR 2337 and issue 7278, slime issue 1370, miles PR 1827); the tests hold them.
"""

from __future__ import annotations

import torch


def outcome_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, R) token rewards: each row's reward on its last masked (model-written) column, 0 elsewhere.

    A row without a model-written token gets nothing (there is no action to credit).
    """
    mask = mask > 0
    n, width = mask.shape
    last = width - 1 - torch.flip(mask, dims=[1]).float().argmax(dim=1)  # last True column of each row
    out = torch.zeros(n, width, dtype=torch.float32)
    has = mask.any(dim=1)
    out[torch.arange(n)[has], last[has]] = rewards.float()[has]
    return out


def masked_gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the masked columns of each row; returns ``(advantages, returns)``, both (N, R), 0 where unmasked.

    With ``m`` the model's tokens of a row in order, ``delta_j = r_j + gamma * V_{j+1} - V_j`` (``V`` after the
    last one is 0) and ``A_j = delta_j + gamma * lam * A_{j+1}``; the return is ``A_j + V_j``. Rewards and
    values at unmasked columns are never read.
    """
    mask = mask > 0
    n, width = mask.shape
    advantages = torch.zeros(n, width, dtype=torch.float32)
    running = torch.zeros(n, dtype=torch.float32)  # A of the next model token
    next_value = torch.zeros(n, dtype=torch.float32)  # V of the next model token (0 past the last: terminal)
    for t in range(width - 1, -1, -1):
        here = mask[:, t]
        delta = token_rewards[:, t].float() + gamma * next_value - values[:, t].float()
        gae = delta + gamma * lam * running
        running = torch.where(here, gae, running)
        next_value = torch.where(here, values[:, t].float(), next_value)
        advantages[:, t] = torch.where(here, gae, torch.zeros_like(gae))
    returns = torch.where(mask, advantages + values.float(), torch.zeros_like(advantages))
    return advantages, returns


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, mean: float | None = None, std: float | None = None
) -> torch.Tensor:
    """``x`` minus its mean over the masked entries, over their std; 0 where unmasked.

    ``mean`` and ``std`` replace the ones of ``x`` (those of every rank's tokens, with several processes).
    """
    mask = mask > 0
    values = x[mask]
    if mean is None or std is None:
        if values.numel() < 2:
            return torch.where(mask, x - (values.mean() if values.numel() else 0.0), torch.zeros_like(x))
        mean, std = float(values.mean()), float(values.std(unbiased=False))
    whitened = (x - mean) / (std + eps)
    return torch.where(mask, whitened, torch.zeros_like(x))


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss summed over masked tokens, and how many of them the clip bound.

    ``0.5 * max((V - R)^2, (V_clipped - R)^2)`` per token, ``V_clipped`` kept within ``clip`` of the value the
    critic predicted when the batch was sampled (PPO's value clipping; ``None`` or 0 turns it off). Unmasked
    tokens contribute nothing, and no gradient reaches the critic through them.
    """
    mask = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip:
        kept = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = (kept - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        bound = (clipped > unclipped).to(values.dtype)
    else:
        per_token = 0.5 * unclipped
        bound = torch.zeros_like(values)
    return (per_token * mask).sum(), (bound.detach() * mask).sum()


def explained_variance(error_var: float, return_var: float) -> float:
    """``1 - Var(R - V) / Var(R)`` from the two variances over the model-written tokens: 1 when the critic
    predicts the returns, 0 when it predicts no better than their mean, negative when worse; NaN when the
    returns (almost) do not vary."""
    # Returns that barely vary (a batch whose answers all scored alike) leave the ratio meaningless, not huge.
    if not return_var >= 1e-8:  # also NaN: no tokens
        return float("nan")
    return 1.0 - error_var / return_var
