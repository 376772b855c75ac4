"""PPO: the ReTool paper's algorithm, a clipped policy update with a learned critic and GAE.

The parts: this file (the plugin: options, the critic's place in the RL step, metrics, export), ``_gae.py``
(GAE over the model's own tokens and the critic's loss, pure functions) and ``_critic.py`` (the value model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch

from retool import distributed
from retool.algorithm import PolicyBatch, PolicyGradient
from retool.tables import STEP_COLUMNS
from retool_plugins.algorithms.ppo._critic import ValueModel
from retool_plugins.algorithms.ppo._gae import (
    explained_variance,
    masked_gae,
    masked_whiten,
    outcome_rewards,
    value_loss,
)

__all__ = ["PPO", "ValueModel"]


class PPO(PolicyGradient):
    """Proximal Policy Optimization with a critic and GAE over the tokens the model wrote (the paper's choice).

    Each step rolls out ``group_size`` trajectories per problem (1 is usual for PPO: the critic, not the group,
    is the baseline). A critic, a value head on a copy of the policy's backbone (or on ``critic_name_or_path``),
    estimates the return before each model-written token; GAE turns the outcome reward, placed on the last
    token the model wrote, into per-token advantages. Interpreter tokens are not actions: they get no reward, no
    value and no TD error, and the advantage carries across an interpreter block as if the model's tokens on
    either side were consecutive. The end of a trajectory is terminal, also at a length cut (its outcome reward
    is then whatever the reward gives a cut answer, usually -1). The policy loss is the clipped surrogate of
    :class:`~retool.PolicyGradient`; the critic is trained on the same mini-batches with a clipped value loss,
    with an optimizer, learning rate, gradient clipping and micro-batch size of its own. For the first
    ``critic_warmup`` steps only the critic trains (verl's ``critic_warmup``), so the policy is not pushed by a
    critic that has not yet learned anything.

    The critic is saved with the policy in checkpoints and exported beside it (``critic/`` next to
    ``policy/``), from where ``critic_name_or_path`` can load it again.

    Args:
        group_size: Trajectories rolled out per problem.
        gamma: Discount per model-written token (1.0: the paper's recipe; the reward is at the end).
        lam: GAE's lambda: 1.0 gives Monte Carlo returns minus the critic's value, lower trusts the critic more.
        value_clip: Keep a value prediction within this of the critic's value at sampling time in the loss (PPO's
            value clipping); 0 for none.
        critic_lr: The critic's AdamW learning rate.
        critic_warmup: Steps at the start of a run during which only the critic trains.
        critic_name_or_path: Where the critic comes from: ``None`` copies the policy's backbone (and adds a
            fresh head); a folder that ``retool fit`` exported as ``critic/`` restores backbone and head; any other
            causal LM (a name, folder or hub id, as for the policy) gives its backbone and a fresh head.
        critic_micro_batch_size: Sequences per critic forward/backward pass (default: ``micro_batch_size``).
        kl_penalty: Where the KL penalty to the initial policy goes, when ``kl_coef > 0``: ``"loss"`` (the k3
            term of the policy loss) or ``"reward"`` (``-kl_coef * log(pi_old / pi_ref)`` added to the reward of
            each model-written token, so it flows through GAE; interpreter tokens get none).
        normalize_advantages: Whiten the advantages over the batch's model-written tokens (as verl does for GAE).
        **kwargs: The options of every RL algorithm (``lr``: the policy's, ``clip_low``, ``clip_high``,
            ``kl_coef``, ``entropy_coef``, ``epochs``, ``mini_batch_size``, ``micro_batch_size``, ...).
    """

    table_columns = (
        *STEP_COLUMNS[:5],
        ("v loss", "train/value_loss", "{:.3f}"),
        ("ev", "train/explained_variance", "{:+.2f}"),
        *STEP_COLUMNS[5:],
    )

    def __init__(
        self,
        group_size: int = 1,
        gamma: float = 1.0,
        lam: float = 1.0,
        value_clip: float = 0.5,
        critic_lr: float = 2e-6,
        critic_warmup: int = 20,
        critic_name_or_path: str | None = None,
        critic_micro_batch_size: int | None = None,
        kl_penalty: Literal["loss", "reward"] = "loss",
        normalize_advantages: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(group_size=group_size, **kwargs)
        if not (0 <= gamma <= 1 and 0 <= lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
        if value_clip < 0 or critic_lr <= 0 or critic_warmup < 0:
            raise ValueError("value_clip and critic_warmup must be >= 0 and critic_lr > 0")
        if critic_micro_batch_size is not None and critic_micro_batch_size < 1:
            raise ValueError(f"critic_micro_batch_size must be >= 1 or null, got {critic_micro_batch_size}")
        if kl_penalty not in ("loss", "reward"):
            raise ValueError(f"kl_penalty must be 'loss' or 'reward', got {kl_penalty!r}")
        self.gamma = gamma
        self.lam = lam
        self.value_clip = value_clip
        self.critic_lr = critic_lr
        self.critic_warmup = critic_warmup
        self.critic_name_or_path = critic_name_or_path
        self.critic_micro_batch_size = critic_micro_batch_size
        self.kl_penalty = kl_penalty
        self.normalize_advantages = normalize_advantages
        self.critic: ValueModel | None = None

    # ---- the critic's place ------------------------------------------------------------------------------------

    def on_policy_loaded(self) -> None:
        super().on_policy_loaded()
        if self.critic is None:
            assert self.model is not None
            if self.critic_name_or_path is None:
                self.critic = ValueModel.from_policy(self.model)
            else:
                self.critic = ValueModel.load(self.critic_name_or_path, dtype=self.policy.dtype)
            self.critic.train()

    trained_modules = ("policy", "critic")

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        assert self.critic is not None, "the critic is built when the policy loads (configure_model)"
        return {**super().trainable_modules(), "critic": self.critic}

    def learning_rate(self, name: str) -> float:
        return self.critic_lr if name == "critic" else self.lr

    def updates_policy(self) -> bool:
        return self.global_step >= self.critic_warmup

    def has_signal(self, batch: PolicyBatch) -> bool:
        return True  # the critic learns from every batch, whatever the advantages

    def kl_in_loss(self) -> bool:
        return self.kl_penalty == "loss"

    def needs_old_logprobs(self) -> bool:
        return self.kl_penalty == "reward" and self.kl_coef > 0

    def critic_values(self, batch: PolicyBatch) -> torch.Tensor:
        """(n, R) the critic's values before each response token of ``batch`` (with a graph if grad is on)."""
        assert self.critic is not None
        device = self.device
        return self.critic(batch.input_ids.to(device), batch.attention_mask.to(device), batch.response_width)

    def estimate(self, batch: PolicyBatch, on_policy: bool) -> None:
        super().estimate(batch, on_policy)
        assert self.critic is not None
        self.critic.eval()
        with torch.no_grad():
            size = self.critic_micro_batch_size or self.micro_batch_size
            parts = [self.critic_values(batch.select(i)).cpu() for i in torch.arange(batch.size).split(size)]
        self.critic.train()
        batch.values = torch.cat(parts) * batch.response_mask

    def advantages(self, batch: PolicyBatch) -> torch.Tensor:
        assert batch.values is not None
        mask = batch.response_mask
        rewards = outcome_rewards(batch.rewards, mask)
        if self.kl_penalty == "reward" and self.kl_coef > 0 and batch.ref_logprobs is not None:
            assert batch.old_logprobs is not None
            rewards = rewards - self.kl_coef * (batch.old_logprobs - batch.ref_logprobs) * mask
        advantages, batch.returns = masked_gae(rewards, batch.values, mask, self.gamma, self.lam)
        batch.extra["raw_advantages"] = advantages
        if not self.normalize_advantages:
            return advantages
        if distributed.world_size() == 1:  # torch's own mean and std: one process whitens as it always has
            return masked_whiten(advantages, mask)
        (moments,) = self.moments_across(batch, {"advantage": advantages})  # over every rank's tokens
        return masked_whiten(advantages, mask, mean=moments.mean, std=math.sqrt(moments.var))

    def advantage_stats(self, batch: PolicyBatch) -> dict[str, float]:
        assert batch.values is not None and batch.returns is not None
        raw, returns, values, errors = self.moments_across(
            batch,
            {
                "advantage": batch.extra["raw_advantages"],
                "return": batch.returns,
                "value": batch.values,
                "error": batch.returns - batch.values,
            },
        )
        if not raw.count:
            return {}
        return {
            "train/advantage_mean": raw.mean,
            "train/advantage_std": math.sqrt(raw.var),
            "train/return_mean": returns.mean,
            "train/return_std": math.sqrt(returns.var),
            "train/value_mean": values.mean,
            "train/explained_variance": explained_variance(errors.var, returns.var),
        }

    def backward_other_modules(self, batch: PolicyBatch, token_count: torch.Tensor) -> dict[str, float]:
        """The critic's passes on one mini-batch: the clipped value loss, in micro-batches of its own size."""
        assert batch.values is not None and batch.returns is not None
        sums = {"train/value_loss": 0.0, "train/value_clip_frac": 0.0, "train/vpred_mean": 0.0}
        size = self.critic_micro_batch_size or self.micro_batch_size
        parts = [batch.select(rows) for rows in torch.arange(batch.size).split(size)]
        if self.lockstep_passes:  # sharded critic: every rank runs as many passes (ranks' shares may differ in size)
            most = int(distributed.max_across({"passes": float(len(parts))})["passes"])
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            for _ in range(most - len(parts)):
                placeholder = PolicyBatch.placeholder(pad)
                placeholder.values = placeholder.returns = torch.zeros((1, 1))
                parts.append(placeholder)
        for m, part in enumerate(parts):
            predicted = self.critic_values(part)
            device = predicted.device
            mask = part.response_mask.to(device)
            loss, clipped = value_loss(
                predicted, part.values.to(device), part.returns.to(device), mask, self.value_clip or None
            )
            with self.gradient_sync(self.critic, enabled=m == len(parts) - 1):
                self.manual_backward(loss / token_count.to(device))
            sums["train/value_loss"] += float(loss.detach())
            sums["train/value_clip_frac"] += float(clipped)
            sums["train/vpred_mean"] += float((predicted.detach() * mask).sum())
        return sums

    # ---- output ------------------------------------------------------------------------------------------------

    def export(self, path: str | Path) -> Path:
        """Save the policy in Hugging Face format at ``path`` and the critic beside it (``policy`` ->
        ``critic``, ``policy-interrupted`` -> ``critic-interrupted``)."""
        path = super().export(path)
        if self.critic is not None:
            name = path.name.replace("policy", "critic") if "policy" in path.name else f"{path.name}-critic"
            state = self.full_state_dict(self.critic, rank_zero_only=True)  # every rank gathers, rank 0 writes
            if self.global_rank == 0:
                self.critic.save(path.parent / name, state_dict=state)
        return path
