"""The RL step of policy-gradient algorithms: rollout -> reward -> advantages -> clipped updates.

One ``training_step`` is one RL step, and ``trainer.global_step`` counts RL steps (as in verl): the inner
mini-batch updates step the optimizer through the strategy without advancing Lightning's step counter, so
``trainer.max_steps`` is the number of RL steps whatever ``epochs`` and ``mini_batch_size`` are.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from retool import distributed
from retool.algorithm.base import Algorithm
from retool.algorithm.batch import PolicyBatch
from retool.algorithm.evaluation import mean
from retool.algorithm.processes import share_by_tokens
from retool.metrics import TrajectoryStats, summarize
from retool.types import Problem, RewardOutput, Trajectory


class PolicyGradient(Algorithm, ABC):
    """Base class of RL algorithms whose step is rollout, reward, advantages, then epochs of clipped updates.

    An estimator (``GRPO``, ``RLOO``, ``PPO``) supplies :meth:`advantages`; rolling out, scoring, batching into
    tensors, old and reference log-probabilities, the clipped surrogate loss with its KL and entropy terms,
    mini- and micro-batching, gradient clipping, metrics and weight sync are done here, the same way for
    every estimator. Every token-level term is weighted by the response's loss mask: interpreter tokens never
    enter a loss.

    Args:
        group_size: Trajectories rolled out per problem.
        epochs: Passes over each rollout batch.
        mini_batch_size: Trajectories per optimizer step, over all processes (default: the whole rollout batch,
            one step per epoch).
        log_samples: Trajectories per step written to the run's ``trajectories.jsonl``.
        clip_low: Lower clip range of the probability ratio: it is kept above ``1 - clip_low``.
        clip_high: Upper clip range: the ratio is kept below ``1 + clip_high`` (DAPO's clip-higher when larger).
        kl_coef: Weight of a KL penalty to the frozen initial policy (the k3 estimator, in the loss); 0 keeps
            no reference model.
        entropy_coef: Weight of an entropy bonus (0 = none; the entropy is logged either way).
        balance_ranks: With several processes, share each mini-batch's trajectories among the ranks by tokens
            (longest first, each to the rank with the fewest tokens so far) for the update's passes, rather than
            each rank updating on the trajectories it rolled out: ranks whose rollouts ran long no longer hold
            the others up at every gradient average. Every rank's trajectories are gathered once a step (token
            ids and per-token numbers). The step is the same either way (the loss is a mean over every rank's
            tokens); with it, mini-batches are drawn from the global batch as on one process.
        **kwargs: The options of every algorithm (``lr``, ``micro_batch_size``, ``eval_every``, ...).
    """

    def __init__(
        self,
        group_size: int = 4,
        epochs: int = 1,
        mini_batch_size: int | None = None,
        log_samples: int = 4,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        balance_ranks: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("group_size", group_size), ("epochs", epochs)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1 or null, got {mini_batch_size}")
        if clip_low < 0 or clip_high < 0 or kl_coef < 0:
            raise ValueError("clip_low, clip_high and kl_coef must be >= 0")
        self.group_size = group_size
        self.epochs = epochs
        self.mini_batch_size = mini_batch_size
        self.log_samples = log_samples
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.kl_coef = kl_coef
        self.entropy_coef = entropy_coef
        self.balance_ranks = balance_ranks
        self.ref_model: torch.nn.Module | None = None
        self._shuffle = torch.Generator().manual_seed(0)

    # ---- what a subclass supplies -------------------------------------------------------------------------

    @abstractmethod
    def advantages(self, batch: PolicyBatch) -> torch.Tensor:
        """(N, R) per-token advantages for ``batch`` (rewards are in ``batch.rewards``, grouped by problem).

        Called after :meth:`estimate`, so that ``batch.old_logprobs``, ``batch.ref_logprobs`` and
        ``batch.values`` are there when this algorithm asked for them. It may also fill ``batch.returns`` and
        ``batch.extra`` (both are sliced with the batch for every mini- and micro-batch).
        """

    def loss(
        self, batch: PolicyBatch, logprobs: torch.Tensor, entropy: torch.Tensor, token_count: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy loss of a micro-batch and its statistics: the clipped surrogate, plus the KL penalty
        (``kl_coef``) and the entropy bonus (``entropy_coef``).

        ``logprobs`` and ``entropy`` are (n, R) under the current policy. Token-level terms are summed over
        ``batch.response_mask`` and divided by ``token_count``, the masked tokens of the whole mini-batch, so
        that the micro-batches' losses add up to a token-level mean. Statistics are sums over masked tokens
        (divided by the same count by the caller).
        """
        assert batch.advantages is not None
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
        if self.ref_model is not None and batch.ref_logprobs is not None and self.kl_in_loss():
            delta = batch.ref_logprobs.to(logprobs.device) - logprobs
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
            per_token = per_token + self.kl_coef * kl
            stats["train/kl"] = (kl.detach() * mask).sum()
        loss = (per_token * mask).sum() / token_count
        return loss, stats

    def has_signal(self, batch: PolicyBatch) -> bool:
        """Whether an update on ``batch`` can change the policy; ``False`` skips the update's passes.

        Zero advantages everywhere (a group whose answers all scored the same) give no gradient, unless a
        KL or entropy term has one.
        """
        assert batch.advantages is not None
        return bool(batch.advantages.abs().sum() > 0) or self.kl_coef > 0 or self.entropy_coef != 0

    def kl_in_loss(self) -> bool:
        """Whether the KL penalty is a term of the loss (``True``) or shapes the rewards (PPO's other choice)."""
        return True

    def needs_reference(self) -> bool:
        """Whether a frozen copy of the initial policy is kept (for a KL term)."""
        return self.kl_coef > 0

    def needs_entropy_grad(self) -> bool:
        """Whether :meth:`loss` puts the entropy in the loss, so it must carry a gradient (an entropy
        bonus). ``False`` computes it without one: it is only logged, and the graph of a softmax over the
        whole vocabulary at every position costs memory."""
        return self.entropy_coef != 0

    def advantage_stats(self, batch: PolicyBatch) -> dict[str, float]:
        """Numbers about the step's advantages (and, in a subclass, returns and values), logged each step.

        Over every rank's model-written tokens: build them from :meth:`moments_across`.
        """
        assert batch.advantages is not None
        (advantages,) = self.moments_across(batch, {"advantage": batch.advantages})
        if not advantages.count:
            return {}
        return {"train/advantage_mean": advantages.mean, "train/advantage_std": math.sqrt(advantages.var)}

    def moments_across(self, batch: PolicyBatch, tensors: dict[str, torch.Tensor]) -> list[distributed.Moments]:
        """Count, sum and sum of squares of each (N, R) tensor over the model-written tokens of every rank's
        batch (one collective for all of them), in the order given."""
        mask = batch.response_mask > 0
        local: dict[str, float] = {}
        for name, tensor in tensors.items():
            local.update(distributed.Moments.of(tensor[mask]).as_dict(name))
        total = distributed.sum_across(local)
        return [distributed.Moments.from_dict(total, name) for name in tensors]

    def backward_other_modules(self, batch: PolicyBatch, token_count: torch.Tensor) -> dict[str, float]:
        """Backward passes of the modules other than the policy on one mini-batch (PPO's critic, in micro-batches
        of its own size), before the optimizers step; returns statistics summed over masked tokens."""
        return {}

    def needs_old_logprobs(self) -> bool:
        """Whether :meth:`advantages` or :meth:`loss` need ``batch.old_logprobs`` even when the update is a
        single on-policy pass (where they equal the current log-probs, and are otherwise skipped)."""
        return False

    def estimate(self, batch: PolicyBatch, on_policy: bool) -> None:
        """Fill what the estimator may need, before :meth:`advantages`: the sampling policy's log-probs (unless
        the update is one on-policy pass and :meth:`needs_old_logprobs` is false) and the reference's (when
        :meth:`needs_reference`). A subclass with a critic adds its values here."""
        assert self.model is not None
        if not on_policy or self.needs_old_logprobs():
            batch.old_logprobs = self._logprobs_no_grad(self.model, batch)
        if self.ref_model is not None:
            batch.ref_logprobs = self._logprobs_no_grad(self.ref_model, batch)

    def updates_policy(self) -> bool:
        """Whether this step's update trains the policy (``False``: only the other modules, e.g. a critic's
        warm-up); the policy's forward passes then run without a graph."""
        return True

    # ---- Lightning hooks ----------------------------------------------------------------------------------

    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("ref_model.",)  # the initial policy: rebuilt from the recipe's policy on resume

    def extra_state(self) -> dict[str, Any]:
        return {"shuffle": self._shuffle.get_state()}  # the mini-batch order of every later step

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "shuffle" in state:
            self._shuffle.set_state(state["shuffle"])

    def sharded_modules(self) -> list[torch.nn.Module]:
        return super().sharded_modules() + ([self.ref_model] if self.ref_model is not None else [])

    def on_policy_loaded(self) -> None:
        if self.needs_reference():
            import copy

            assert self.model is not None
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def training_step(self, problems: list[Problem], batch_idx: int) -> None:
        if self.rollout is None or self.reward is None:
            raise RuntimeError(f"{type(self).__name__} needs a rollout and a reward section in the recipe")
        step_start = time.perf_counter()
        # Sessions, and the sampler's per-trajectory seeds, are named by the step and the problem's place in the
        # global batch (ranks take equal, contiguous shares), not by the rank: a run on several processes samples
        # what one process would. ("r0" is what the name was when it held the rank; kept, so seeds stay as they were.)
        with self.full_weights():  # a sharded policy decodes whole (nothing to do on one process or DDP)
            rollout = self.rollout.rollout(
                problems,
                self.group_size,
                self.executor,
                session_prefix=f"r0s{self.global_step}",
                first_index=self.global_rank * len(problems),
            )
        expanded = [p for p in problems for _ in range(self.group_size)]
        scores = self.reward(rollout.trajectories, expanded)
        update_start = time.perf_counter()
        stats = self.update(rollout.trajectories, scores)
        update_s = time.perf_counter() - update_start
        sync_start = time.perf_counter()
        if self.rollout.needs_weight_sync and not stats["train/skipped"]:  # a skipped update left them as they were
            assert self.model is not None
            self.rollout.load_weights(self.full_state_dict())
        sync_s = time.perf_counter() - sync_start
        # Every rank's trajectories count: one gather of small per-trajectory records (never the token ids).
        names = list(scores.components)
        records = distributed.gather(
            list(zip([TrajectoryStats.of(t) for t in rollout.trajectories], scores.rewards,
                     *(scores.components[name] for name in names)))
        )  # fmt: skip
        trajectory_stats = [r[0] for r in records]
        rewards = [r[1] for r in records]
        components = {name: [r[2 + i] for r in records] for i, name in enumerate(names)}
        times = distributed.max_across(  # the step waits for its slowest rank
            {
                "time/generate_s": rollout.generate_s,
                "time/tool_wait_s": rollout.tool_wait_s,
                "time/update_s": update_s,
                "time/weight_sync_s": sync_s,
                "time/step_s": time.perf_counter() - step_start,
            }
        )
        tokens = distributed.sum_across({"tokens": float(rollout.generated_tokens)})["tokens"]
        metrics = {
            **summarize(trajectory_stats),
            **{f"reward/{k}": mean(v) for k, v in components.items()},
            "reward/mean": mean(rewards),
            "reward/std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
            **stats,
            **times,
            "perf/generate_tokens_per_s": (
                tokens / times["time/generate_s"] if times["time/generate_s"] > 1e-6 else float("nan")
            ),
        }
        samples = self._samples(rollout.trajectories, expanded, scores)
        self.record_step(metrics, samples, batch_size=len(problems))

    # ---- the update ---------------------------------------------------------------------------------------

    def update(self, trajectories: Sequence[Trajectory], scores: RewardOutput) -> dict[str, float]:
        """Epochs of clipped updates over mini-batches of the rollout batch; returns the step's statistics.

        With several processes each rank updates on its own trajectories; the decision to skip, the token
        count every loss is divided by, the gradients and the statistics are the same on every rank, and are
        those one process would have over all the trajectories.
        """
        assert self.model is not None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = PolicyBatch.from_trajectories(trajectories, scores.rewards, pad)
        n = batch.size
        mini = min(self.mini_batch_size_per_rank(n), n)
        on_policy = self.epochs == 1 and mini == n
        self.model.eval()  # the estimates are of the policy as it sampled, without dropout
        self.estimate(batch, on_policy)
        batch.advantages = self.advantages(batch)
        estimates = self.advantage_stats(batch)
        optimizers = self.optimizer_list()
        modules = self.trainable_modules()
        if not distributed.any_rank(self.has_signal(batch)):
            # Every advantage is zero (e.g. all answers wrong) on every rank: the gradient would be zero. Skip
            # the passes and step with no gradients (AdamW leaves a parameter without .grad untouched, so
            # momentum cannot move the weights), which still counts the RL step. A rank with nothing to learn
            # while another has signal runs its passes (zero gradients), so that every rank steps alike.
            with self.without_update():
                for i, optimizer in enumerate(optimizers):
                    optimizer.zero_grad(set_to_none=True)
                    self.step_optimizer(optimizer, last=i == len(optimizers) - 1)
            lr = float(optimizers[0].param_groups[0]["lr"])
            return {**estimates, "train/skipped": 1.0, "train/optimizer_steps": 0.0, "train/lr": lr}

        trains_policy = self.updates_policy()
        sums: dict[str, float] = {}
        tokens_seen = pass_tokens = 0.0
        norms: dict[str, list[float]] = {name: [] for name in modules}
        world = distributed.world_size()
        shared = self.balance_ranks and world > 1
        # Balanced, every rank holds every rank's rows, and mini-batches are drawn from the global batch (as on
        # one process) then shared out by tokens; otherwise each rank draws from its own rows.
        pool = PolicyBatch.concat(distributed.gather([batch]), pad) if shared else batch
        size = pool.size
        step_rows = min(self.mini_batch_size or size, size) if shared else mini
        lengths = pool.attention_mask.sum(1)
        updates = [(e, s) for e in range(self.epochs) for s in range(0, size, step_rows)]
        self.model.train()
        for k, (_, start) in enumerate(updates):
            if start == 0:
                order = torch.randperm(size, generator=self._shuffle) if size > step_rows else torch.arange(size)
            index = order[start : start + step_rows]
            if shared:
                share = share_by_tokens(lengths[index].tolist(), world)[self.global_rank]
                index = index[torch.tensor(share, dtype=torch.long)]
            local_tokens = pool.response_mask[index].sum()
            token_count = self.token_normalizer(local_tokens)
            micros = self.passes(pool, index)
            for m, (_, part) in enumerate(micros):
                with torch.set_grad_enabled(trains_policy):
                    logprobs, entropy = self.sequence_logprobs(
                        self.model, part, with_entropy=True, entropy_grad=self.needs_entropy_grad()
                    )
                if on_policy and part.sampler_logprobs is not None:  # the trainer's view before any update
                    gap = (logprobs.detach().float().cpu() - part.sampler_logprobs).abs() * part.response_mask
                    sums["train/sampler_logprob_diff"] = sums.get("train/sampler_logprob_diff", 0.0) + float(gap.sum())
                loss, stats = self.loss(part, logprobs, entropy, token_count)
                if loss.requires_grad:
                    with self.gradient_sync(self.model, enabled=m == len(micros) - 1):
                        self.manual_backward(loss)
                for name, value in stats.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
            for name, value in self.backward_other_modules(pool.select(index), token_count).items():
                sums[name] = sums.get(name, 0.0) + float(value)
            tokens_seen += float(local_tokens)
            pass_tokens += float(lengths[index].sum())
            for i, (name, module) in enumerate(modules.items()):
                self.sync_gradients(module)
                last = k == len(updates) - 1 and i == len(modules) - 1
                norms[name].append(self.clip_and_step(module, optimizers[i], last=last))
                optimizers[i].zero_grad(set_to_none=True)
        if batch.sampler_logprobs is not None and batch.old_logprobs is not None:  # measured against the recomputed
            diff = (batch.old_logprobs - batch.sampler_logprobs).abs() * batch.response_mask  # old log-probs
            sums["train/sampler_logprob_diff"] = float(diff.sum()) * self.epochs  # tokens_seen counts each epoch
        totals = distributed.sum_across({**sums, "tokens": tokens_seen, "pass_tokens": pass_tokens})
        tokens = max(totals.pop("tokens"), 1.0)
        all_pass_tokens = totals.pop("pass_tokens")
        stats = {**estimates, **{name: value / tokens for name, value in totals.items()}}
        if world > 1:  # the busiest rank's tokens (prompt and response) in the passes, over the mean rank's
            most = distributed.max_across({"pass_tokens": pass_tokens})["pass_tokens"]
            stats["perf/update_rank_imbalance"] = most * world / max(all_pass_tokens, 1.0)
        for name, values in norms.items():
            key = "train/grad_norm" if name == "policy" else f"train/{name}_grad_norm"
            stats[key] = sum(values) / len(values)
        stats["train/optimizer_steps"] = float(len(updates))
        stats["train/lr"] = float(optimizers[0].param_groups[0]["lr"])
        stats["train/skipped"] = 0.0
        stats["train/policy_updated"] = float(trains_policy)
        return stats

    def mini_batch_size_per_rank(self, local_size: int) -> int:
        """Trajectories per optimizer step on this rank: ``mini_batch_size`` (over all ranks) shared among them,
        or the whole of this rank's batch."""
        if self.mini_batch_size is None:
            return local_size
        world = distributed.world_size()
        if self.mini_batch_size % world:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) counts trajectories over all {world} processes and must "
                "be a multiple of their number"
            )
        return self.mini_batch_size // world

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, batch: PolicyBatch) -> torch.Tensor:
        out = torch.zeros(batch.response_mask.shape)
        for rows, part in self.passes(batch):
            logprobs = self.sequence_logprobs(model, part)[0].float().cpu()
            if rows is not None:
                out[rows] = logprobs
        return out

    # ---- output ---------------------------------------------------------------------------------------

    def _samples(
        self, trajectories: Sequence[Trajectory], problems: Sequence[Problem], scores: RewardOutput
    ) -> list[dict[str, Any]]:
        """``log_samples`` rows for ``trajectories.jsonl``: the first trajectory of each group first, in the order
        of the global batch (every rank offers its own best candidates; all ranks pick the same rows)."""
        offset = self.global_rank * len(trajectories)
        ranked = sorted(range(len(trajectories)), key=lambda i: (i % self.group_size != 0, i))[: self.log_samples]
        candidates = [
            (
                (i % self.group_size != 0, offset + i),
                {
                    "step": int(self.global_step),
                    "problem_id": trajectories[i].problem_id,
                    "group": trajectories[i].group,
                    "prompt": problems[i].prompt,
                    "answer": problems[i].answer,
                    "response": trajectories[i].response_text,
                    "reward": scores.rewards[i],
                    "finish_reason": trajectories[i].finish_reason,
                    "tool_calls": len(trajectories[i].tool_calls),
                },
            )
            for i in ranked
        ]
        picked = sorted(distributed.gather(candidates), key=lambda c: c[0])[: self.log_samples]
        return [row for _, row in sorted(picked, key=lambda c: c[0][1])]
