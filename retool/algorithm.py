"""The algorithm base: a LightningModule whose ``training_step`` is one RL step.

rollout -> reward -> advantages -> epochs of clipped updates over mini-batches, through Lightning's manual
optimization. A subclass (GRPO, PPO) supplies :meth:`Algorithm.advantages` and :meth:`Algorithm.loss`;
everything else (loading the policy, batching trajectories into tensors, log-probabilities, micro-batching,
gradient clipping, metrics, export) lives here so every algorithm does it the same way.

One ``training_step`` is one RL step, and ``trainer.global_step`` counts RL steps (as in verl): the inner
mini-batch updates step the optimizer through the strategy without advancing Lightning's step counter, so
``trainer.max_steps`` is the number of RL steps whatever ``epochs`` and ``mini_batch_size`` are.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from retool._async import run_sync
from retool.callbacks import COLUMNS
from retool.executor import Executor
from retool.metrics import rollout_metrics
from retool.policy import Policy
from retool.reward import Reward
from retool.rollout.backend import RolloutBackend
from retool.types import Problem, RewardOutput, Trajectory


@dataclass
class PolicyBatch:
    """Trajectories as tensors, aligned so that every prompt ends at the same column.

    Prompts are left-padded and responses right-padded: the response tokens of every row sit in the last
    ``R`` columns, so one forward pass that keeps only the last ``R + 1`` logits covers every response.

    Args:
        input_ids: (N, P + R) token ids.
        attention_mask: (N, P + R) 1 for real tokens.
        response_mask: (N, R) the loss mask of the response columns (1 = the model wrote it).
        rewards: (N,) scalar reward per trajectory.
        advantages: (N, R) per-token advantages (filled by the algorithm).
        old_logprobs: (N, R) log-probs under the policy that sampled, or ``None`` when on-policy.
        ref_logprobs: (N, R) log-probs under the frozen reference, or ``None`` without KL.
        sampler_logprobs: (N, R) log-probs the rollout backend reported, or ``None``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> PolicyBatch:
        """The rows ``index`` (every tensor field sliced the same way)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return PolicyBatch(**{k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in fields.items()})

    @staticmethod
    def from_trajectories(trajectories: Sequence[Trajectory], rewards: Sequence[float], pad_id: int) -> PolicyBatch:
        n = len(trajectories)
        prompt_w = max(t.prompt_len for t in trajectories)
        resp_w = max(max(t.response_len for t in trajectories), 1)
        input_ids = torch.full((n, prompt_w + resp_w), pad_id, dtype=torch.long)
        attention = torch.zeros((n, prompt_w + resp_w), dtype=torch.long)
        response_mask = torch.zeros((n, resp_w), dtype=torch.float32)
        sampler = torch.zeros((n, resp_w), dtype=torch.float32)
        has_sampler = all(t.logprobs is not None for t in trajectories)
        for i, t in enumerate(trajectories):
            p, r = t.prompt_len, t.response_len
            input_ids[i, prompt_w - p : prompt_w + r] = torch.tensor(t.token_ids)
            attention[i, prompt_w - p : prompt_w + r] = 1
            response_mask[i, :r] = torch.tensor(t.loss_mask[p:], dtype=torch.float32)
            if has_sampler and t.logprobs is not None:
                sampler[i, :r] = torch.tensor(t.logprobs[p:], dtype=torch.float32)
        return PolicyBatch(
            input_ids=input_ids,
            attention_mask=attention,
            response_mask=response_mask,
            rewards=torch.tensor(list(rewards), dtype=torch.float32),
            sampler_logprobs=sampler if has_sampler else None,
        )


class Algorithm(L.LightningModule, ABC):
    """Base class of training algorithms (for RL ones, one training_step is one RL step).

    The policy, rollout backend, executor and reward are injected from the recipe's other sections; the
    arguments below are this section's own.

    Args:
        group_size: Trajectories rolled out per problem.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: Clip the global gradient norm to this (0 = no clipping; the norm is logged either way).
        epochs: Passes over each rollout batch.
        mini_batch_size: Trajectories per optimizer step (default: the whole rollout batch, one step per epoch).
        micro_batch_size: Trajectories per forward/backward pass (gradient accumulation inside a mini-batch);
            lower it to save memory.
        log_samples: Trajectories per step written to the run's ``trajectories.jsonl``.
        eval_every: Evaluate on the dataset's ``val`` problems every this many steps. A run that evaluates at
            all (``eval_every > 0`` or ``eval_at_start``) also evaluates at its end; with both off, only
            ``retool validate`` does. See :meth:`validation_step`.
        eval_samples: Besides the greedy pass, sample this many answers per problem at the rollout's
            temperature and report avg@k (mean accuracy) and pass@k (any correct); 0 = greedy only.
        eval_at_start: Evaluate once before the first step (the "before" row of a before/after table).
        eval_batch_size: Problems per evaluation batch (default: the data's ``batch_size``).
        policy: Injected from the recipe's ``policy`` section.
        rollout: Injected from the recipe's ``rollout`` section.
        executor: Injected from the recipe's ``executor`` section.
        reward: Injected from the recipe's ``reward`` section.
    """

    def __init__(
        self,
        group_size: int = 4,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 4,
        log_samples: int = 4,
        eval_every: int = 0,
        eval_samples: int = 0,
        eval_at_start: bool = False,
        eval_batch_size: int | None = None,
        policy: Policy | None = None,
        rollout: RolloutBackend | None = None,
        executor: Executor | None = None,
        reward: Reward | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("group_size", group_size), ("epochs", epochs), ("micro_batch_size", micro_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1 or null, got {mini_batch_size}")
        if eval_every < 0 or eval_samples < 0:
            raise ValueError(f"eval_every and eval_samples must be >= 0, got {eval_every} and {eval_samples}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null, got {eval_batch_size}")
        self.automatic_optimization = False
        self.group_size = group_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.max_grad_norm = max_grad_norm
        self.epochs = epochs
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.log_samples = log_samples
        self.eval_every = eval_every
        self.eval_samples = eval_samples
        self.eval_at_start = eval_at_start
        self.eval_batch_size = eval_batch_size
        self.keep_resources_open = False  # set by a caller that runs several stages (validate, fit, validate)
        self.last_evaluation: dict[str, Any] | None = None
        self.last_eval_samples: list[dict[str, Any]] = []
        self._eval: dict[str, list[Any]] = {}
        self.policy = policy if policy is not None else Policy()
        self.rollout = rollout
        self.executor = executor
        self.reward = reward
        self.model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._shuffle = torch.Generator().manual_seed(0)

    train_on = "problems"
    """What the training batches hold: ``"problems"`` (RL rolls them out) or ``"traces"`` (supervised)."""

    table_columns: tuple[tuple[str, str, str], ...] = tuple(COLUMNS)
    """(header, metric key, format) of the row the console prints after each step."""

    # ---- what a subclass supplies -------------------------------------------------------------------------

    @abstractmethod
    def advantages(self, batch: PolicyBatch) -> torch.Tensor:
        """(N, R) per-token advantages for ``batch`` (rewards are in ``batch.rewards``, grouped by problem)."""

    @abstractmethod
    def loss(
        self, batch: PolicyBatch, logprobs: torch.Tensor, entropy: torch.Tensor, token_count: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a micro-batch and its statistics.

        ``logprobs`` and ``entropy`` are (n, R) under the current policy. Token-level terms are summed over
        ``batch.response_mask`` and divided by ``token_count``, the masked tokens of the whole mini-batch, so
        that the micro-batches' losses add up to a token-level mean. Statistics are sums over masked tokens
        (divided by the same count by the caller).
        """

    def has_signal(self, batch: PolicyBatch) -> bool:
        """Whether an update on ``batch`` can change the policy; ``False`` skips the update's passes."""
        assert batch.advantages is not None
        return bool(batch.advantages.abs().sum() > 0)

    def needs_reference(self) -> bool:
        """Whether a frozen copy of the initial policy is kept (for a KL term)."""
        return False

    def needs_entropy_grad(self) -> bool:
        """Whether :meth:`loss` puts the entropy in the loss, so it must carry a gradient (an entropy
        bonus). ``False`` (the default) computes it without one: it is only logged, and the graph of a
        softmax over the whole vocabulary at every position costs memory."""
        return False

    # ---- Lightning hooks ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Runs before configure_model: a recipe that lacks a section fails here, before any weights load.
        self.check_components()

    def check_components(self) -> None:
        """Raise ``ValueError`` (naming the fix) unless every component this algorithm needs was given."""
        if self.rollout is None or self.reward is None:
            missing = [name for name in ("rollout", "reward") if getattr(self, name) is None]
            raise ValueError(f"{type(self).__name__} needs the recipe section(s) {', '.join(missing)}")
        if self.eval_samples and self.rollout.temperature == 0:
            raise ValueError(
                "eval_samples > 0 samples several answers per problem, but the rollout's temperature is 0 (greedy), "
                "so they would all be the same; set rollout.init_args.temperature > 0 or eval_samples: 0"
            )
        if self.rollout.tools and self.executor is None:
            raise ValueError(
                "the rollout runs code (tools: true) but the recipe has no executor section; add one "
                "(e.g. executor: {class_path: LocalSandbox}) or set rollout.init_args.tools: false"
            )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.tokenizer = self.policy.load_tokenizer()
        self.model = self.policy.load_model()
        self.model.train()  # from_pretrained returns eval mode; dropout (if any) follows Lightning's mode
        if self.needs_reference():
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.rollout is not None:
            self.rollout.bind(self.model, self.tokenizer)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def training_step(self, problems: list[Problem], batch_idx: int) -> dict[str, Any]:
        if self.rollout is None or self.reward is None:
            raise RuntimeError(f"{type(self).__name__} needs a rollout and a reward section in the recipe")
        step_start = time.perf_counter()
        rollout = self.rollout.rollout(
            problems, self.group_size, self.executor, session_prefix=f"r{self.global_rank}s{self.global_step}"
        )
        expanded = [p for p in problems for _ in range(self.group_size)]
        scores = self.reward(rollout.trajectories, expanded)
        update_start = time.perf_counter()
        stats = self.update(rollout.trajectories, scores)
        update_s = time.perf_counter() - update_start
        sync_start = time.perf_counter()
        if self.rollout.needs_weight_sync and not stats["train/skipped"]:  # a skipped update left them as they were
            assert self.model is not None
            self.rollout.load_weights(self.model.state_dict())
        sync_s = time.perf_counter() - sync_start
        metrics = {
            **rollout_metrics(rollout.trajectories),
            **{f"reward/{k}": _mean(v) for k, v in scores.components.items()},
            "reward/mean": _mean(scores.rewards),
            "reward/std": float(torch.tensor(scores.rewards).std()) if len(scores.rewards) > 1 else 0.0,
            **stats,
            "time/generate_s": rollout.generate_s,
            "time/tool_wait_s": rollout.tool_wait_s,
            "time/update_s": update_s,
            "time/weight_sync_s": sync_s,
            "time/step_s": time.perf_counter() - step_start,
            "perf/generate_tokens_per_s": (
                rollout.generated_tokens / rollout.generate_s if rollout.generate_s > 1e-6 else float("nan")
            ),
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(problems))
        return {"metrics": metrics, "samples": self._samples(rollout.trajectories, expanded, scores)}

    def teardown(self, stage: str) -> None:
        # Executors hold processes or remote sandboxes, rewards may hold worker processes: free them however
        # the run ends (an in-process caller, a notebook or a test, lives on after fit and must not inherit them).
        # A caller that chains stages on one module (the CLI: validate, fit, validate) closes them itself at the
        # end, so that a backend with its own engine is not restarted from stale weights in between.
        if not self.keep_resources_open:
            self.close_resources()

    def close_resources(self) -> None:
        """Close the reward's, the executor's and the rollout backend's resources."""
        if self.reward is not None:
            self.reward.close()
        if self.executor is not None:
            run_sync(self.executor.aclose())
        if self.rollout is not None:
            run_sync(self.rollout.aclose())

    # ---- evaluation ---------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._eval = {"correct": [], "sampled": [], "trajectories": [], "samples": []}

    def validation_step(self, problems: list[Problem], batch_idx: int) -> None:
        """Roll out held-out problems once greedily (and ``eval_samples`` times by sampling) and score them.

        The rollout is the training one (same format, budgets, executor), so evaluation measures the policy
        as RL sees it. Accuracy is the reward's ``correct`` component where it has one, else ``reward > 0``.
        """
        if self.rollout is None or self.reward is None:
            raise RuntimeError(f"evaluation needs a rollout and a reward section in the recipe ({type(self).__name__})")
        if not self._eval:
            self.on_validation_epoch_start()
        prefix = f"e{self.global_rank}s{self.global_step}b{batch_idx}"
        with self.rollout.sampling(0.0):
            greedy = self.rollout.rollout(problems, 1, self.executor, session_prefix=f"{prefix}g")
        scores = self.reward(greedy.trajectories, problems)
        correct = _correct(scores)
        self._eval["correct"] += correct
        self._eval["trajectories"] += greedy.trajectories
        for problem, trajectory, reward, ok in zip(problems, greedy.trajectories, scores.rewards, correct):
            self._eval["samples"].append(
                {
                    "step": int(self.global_step),
                    "problem_id": problem.id,
                    "prompt": problem.prompt,
                    "answer": problem.answer,
                    "response": trajectory.response_text,
                    "reward": reward,
                    "correct": ok,
                    "finish_reason": trajectory.finish_reason,
                    "tool_calls": len(trajectory.tool_calls),
                }
            )
        k = self.eval_samples
        if k:
            sampled = self.rollout.rollout(problems, k, self.executor, session_prefix=f"{prefix}k")
            flags = _correct(self.reward(sampled.trajectories, [p for p in problems for _ in range(k)]))
            self._eval["sampled"] += [flags[i * k : (i + 1) * k] for i in range(len(problems))]

    def on_validation_epoch_end(self) -> None:
        correct = self._eval.get("correct", [])
        if not correct:
            return
        paper = rollout_metrics(self._eval["trajectories"])
        metrics: dict[str, float] = {
            "eval/accuracy": _mean([float(c) for c in correct]),
            "eval/problems": float(len(correct)),
            "eval/code_ratio": paper["tools/code_ratio"],
            "eval/calls": paper["tools/calls"],
            "eval/code_lines": paper["tools/code_lines"],
            "eval/cell_ok": paper["tools/cell_ok"],
            "eval/last_cell_ok": paper["tools/last_cell_ok"],
            "eval/first_cell_pos": paper["tools/first_cell_pos"],
            "eval/response_length": paper["response/length"],
            "eval/model_tokens": paper["response/model_tokens"],
        }
        if self._eval["sampled"]:
            k = self.eval_samples
            rows = self._eval["sampled"]
            metrics[f"eval/avg@{k}"] = _mean([float(sum(r)) / k for r in rows])
            metrics[f"eval/pass@{k}"] = _mean([float(any(r)) for r in rows])
            metrics["eval/k"] = float(k)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=len(correct))
        self.last_evaluation = {"step": int(self.global_step), **metrics}
        self.last_eval_samples = list(self._eval["samples"])
        self._eval = {}

    # ---- the update ---------------------------------------------------------------------------------------

    def update(self, trajectories: Sequence[Trajectory], scores: RewardOutput) -> dict[str, float]:
        """Epochs of clipped updates over mini-batches of the rollout batch; returns the step's statistics."""
        assert self.model is not None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = PolicyBatch.from_trajectories(trajectories, scores.rewards, pad)
        batch = batch.select(torch.arange(batch.size))  # a copy we may fill in
        batch.advantages = self.advantages(batch)
        optimizer = self.optimizers()
        if not self.has_signal(batch):
            # Every advantage is zero (e.g. all answers wrong): the gradient would be zero. Skip the passes and
            # step with no gradients (AdamW leaves a parameter without .grad untouched, so momentum cannot
            # move the weights), which still counts the RL step.
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            return {
                "train/skipped": 1.0,
                "train/optimizer_steps": 0.0,
                "train/lr": float(optimizer.param_groups[0]["lr"]),
            }
        n = batch.size
        mini = min(self.mini_batch_size or n, n)
        on_policy = self.epochs == 1 and mini == n
        if not on_policy:
            batch.old_logprobs = self._logprobs_no_grad(self.model, batch)
        if self.ref_model is not None:
            batch.ref_logprobs = self._logprobs_no_grad(self.ref_model, batch)

        sums: dict[str, float] = {}
        tokens_seen = 0.0
        grad_norms: list[float] = []
        updates = [(e, s) for e in range(self.epochs) for s in range(0, n, mini)]
        self.model.train()
        for k, (_, start) in enumerate(updates):
            if start == 0:
                order = torch.randperm(n, generator=self._shuffle) if n > mini else torch.arange(n)
            index = order[start : start + mini]
            token_count = batch.response_mask[index].sum().clamp(min=1.0)
            for micro in index.split(self.micro_batch_size):
                part = batch.select(micro)
                logprobs, entropy = self.sequence_logprobs(
                    self.model, part, with_entropy=True, entropy_grad=self.needs_entropy_grad()
                )
                if on_policy and part.sampler_logprobs is not None:  # the trainer's view before any update
                    gap = (logprobs.detach().float().cpu() - part.sampler_logprobs).abs() * part.response_mask
                    sums["train/sampler_logprob_diff"] = sums.get("train/sampler_logprob_diff", 0.0) + float(gap.sum())
                loss, stats = self.loss(part, logprobs, entropy, token_count)
                self.manual_backward(loss)
                for name, value in stats.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
            tokens_seen += float(token_count)
            grad_norms.append(self._clip_gradients())
            self._optimizer_step(optimizer, last=k == len(updates) - 1)
            optimizer.zero_grad(set_to_none=True)
        stats = {name: value / max(tokens_seen, 1.0) for name, value in sums.items()}
        stats["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        stats["train/optimizer_steps"] = float(len(updates))
        stats["train/lr"] = float(optimizer.param_groups[0]["lr"])
        stats["train/skipped"] = 0.0
        if batch.sampler_logprobs is not None and not on_policy:  # measured against the recomputed old log-probs
            assert batch.old_logprobs is not None
            diff = (batch.old_logprobs - batch.sampler_logprobs).abs() * batch.response_mask
            stats["train/sampler_logprob_diff"] = float(diff.sum() / batch.response_mask.sum().clamp(min=1))
        return stats

    def sequence_logprobs(
        self,
        model: torch.nn.Module,
        batch: PolicyBatch,
        with_entropy: bool = False,
        temperature: float | None = None,
        entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, R) log-probs of the response tokens (and entropies, zeros unless asked) under ``model``.

        Logits are divided by ``temperature``, by default the rollout's, so the trainer scores the
        distribution that sampled (supervised training passes 1).
        """
        width = batch.response_width
        device = self.device
        input_ids = batch.input_ids.to(device)
        attention = batch.attention_mask.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=width + 1)
        logits = out.logits[:, :-1, :].float()
        if temperature is None:
            temperature = self.rollout.temperature if self.rollout is not None else 1.0
        if temperature > 0:
            logits = logits / temperature
        targets = input_ids[:, -width:]
        log_norm = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - log_norm
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                probs = torch.softmax(logits, dim=-1)
                entropy = log_norm - (probs * logits).sum(-1)
        else:
            entropy = torch.zeros_like(logprobs)
        return logprobs, entropy

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, batch: PolicyBatch) -> torch.Tensor:
        parts = [
            self.sequence_logprobs(model, batch.select(i))[0].float().cpu()
            for i in torch.arange(batch.size).split(self.micro_batch_size)
        ]
        return torch.cat(parts)

    def _clip_gradients(self) -> float:
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        limit = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    def _optimizer_step(self, optimizer: Any, last: bool) -> None:
        if last:
            optimizer.step()  # through Lightning: advances global_step once per RL step
        else:
            # Same path as LightningOptimizer.step (strategy -> precision -> optimizer) minus the step count.
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    # ---- output ---------------------------------------------------------------------------------------

    def _samples(
        self, trajectories: Sequence[Trajectory], problems: Sequence[Problem], scores: RewardOutput
    ) -> list[dict[str, Any]]:
        picked = list(range(0, len(trajectories), self.group_size))[: self.log_samples]
        picked += [i for i in range(len(trajectories)) if i not in picked][: self.log_samples - len(picked)]
        return [
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
            }
            for i in sorted(picked)
        ]

    def export(self, path: str | Path) -> Path:
        """Save the policy in Hugging Face format (loadable with ``AutoModelForCausalLM.from_pretrained``)."""
        assert self.model is not None
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path


def _correct(scores: RewardOutput) -> list[bool]:
    """Per trajectory, whether its answer was right: the reward's ``correct`` component, else reward > 0."""
    if "correct" in scores.components:
        return [value > 0 for value in scores.components["correct"]]
    return [value > 0 for value in scores.rewards]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
