"""SFT: supervised fine-tuning on worked solutions (the ReTool cold start), with the RL runs' tooling."""

from __future__ import annotations

import time
from typing import Any

import torch

from retool.algorithm import Algorithm, PolicyBatch
from retool.executor import Executor
from retool.policy import Policy
from retool.reward import Reward
from retool.rollout.backend import RolloutBackend
from retool.rollout.loop import trace_trajectory
from retool.types import Trace


class SFT(Algorithm):
    """Next-token loss on the tokens the assistant wrote, over a dataset's traces.

    Each :class:`~retool.Trace` is rendered with the recipe's rollout format and the model's chat template,
    exactly as a rollout renders its prompt (see :func:`retool.rollout.trace_trajectory`), so the policy
    learns the very token layout that RL will sample in. The loss is the mean negative log-likelihood over
    the response tokens the model wrote, the end-of-turn token included; the prompt and every
    ``<interpreter>`` block are masked, as in RL. One training step is one optimizer step over
    ``data.batch_size`` traces; ``trainer.max_epochs`` sets the passes over the data (the paper: 2).

    The ``rollout`` section is required: it fixes the format (``tools: false`` for text-only traces) and
    drives evaluation on the dataset's ``val`` problems (``eval_every``, ``eval_at_start``), for which the
    ``reward`` (and, with tools on, the ``executor``) sections are needed too. The run directory, logs and
    Hugging Face export are those of an RL run; a GRPO recipe whose ``policy.name_or_path`` is this run's
    ``policy/`` folder continues from it (the paper's two stages).

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: Clip the global gradient norm to this (0 = no clipping).
        micro_batch_size: Traces per forward/backward pass (gradient accumulation within a step).
        max_length: Cut each rendered trace to this many tokens (prompt included); ``None`` for no limit.
        warmup_steps: Linear learning-rate warm-up over this many steps (0 = none).
        log_samples: Kept for the common interface; SFT writes no trajectory samples.
        eval_every: Evaluate every this many steps; a run that evaluates at all also does at its end.
        eval_samples: Sampled answers per problem for avg@k / pass@k (0 = greedy only).
        eval_at_start: Evaluate once before the first step.
        eval_batch_size: Problems per evaluation batch.
        policy: Injected from the recipe's ``policy`` section.
        rollout: Injected from the recipe's ``rollout`` section.
        executor: Injected from the recipe's ``executor`` section.
        reward: Injected from the recipe's ``reward`` section.
    """

    train_on = "traces"
    table_columns = (
        ("loss", "train/loss", "{:.3f}"),
        ("tokens", "train/tokens", "{:.0f}"),
        ("grad", "train/grad_norm", "{:.2f}"),
        ("lr", "train/lr", "{:.1e}"),
        ("step s", "time/step_s", "{:.1f}"),
        ("tok/s", "perf/train_tokens_per_s", "{:.0f}"),
    )

    def __init__(
        self,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 4,
        max_length: int | None = 1024,
        warmup_steps: int = 0,
        log_samples: int = 0,
        eval_every: int = 0,
        eval_samples: int = 0,
        eval_at_start: bool = False,
        eval_batch_size: int | None = None,
        policy: Policy | None = None,
        rollout: RolloutBackend | None = None,
        executor: Executor | None = None,
        reward: Reward | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 or null, got {max_length}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        super().__init__(
            group_size=1,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            max_grad_norm=max_grad_norm,
            micro_batch_size=micro_batch_size,
            log_samples=log_samples,
            eval_every=eval_every,
            eval_samples=eval_samples,
            eval_at_start=eval_at_start,
            eval_batch_size=eval_batch_size,
            policy=policy,
            rollout=rollout,
            executor=executor,
            reward=reward,
        )
        self.max_length = max_length
        self.warmup_steps = warmup_steps

    # The base class's RL hooks: SFT has no advantages and no clipped loss.
    def advantages(self, batch: PolicyBatch) -> torch.Tensor:
        raise NotImplementedError("SFT has no advantages")

    def loss(self, batch: PolicyBatch, logprobs: torch.Tensor, entropy: torch.Tensor, token_count: torch.Tensor):  # type: ignore[override]
        raise NotImplementedError("SFT computes its loss in training_step")

    def check_components(self) -> None:
        if self.rollout is None:
            raise ValueError(
                "SFT needs the recipe's rollout section: it renders traces in the rollout's format and chat "
                "template (add rollout: {class_path: HFRollout}, with tools: false for text-only traces)"
            )
        evaluates = self.eval_every > 0 or self.eval_at_start
        if evaluates and self.reward is None:
            raise ValueError("SFT evaluates (eval_every / eval_at_start) but the recipe has no reward section")
        if evaluates:
            super().check_components()

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if not self.warmup_steps:
            return optimizer
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, traces: list[Trace], batch_idx: int) -> dict[str, Any]:
        assert self.model is not None and self.rollout is not None
        start = time.perf_counter()
        rendered = [trace_trajectory(self.rollout, trace, self.max_length) for trace in traces]
        usable = [t for t in rendered if t.num_model_tokens > 0]  # a prompt longer than max_length teaches nothing
        optimizer = self.optimizers()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        loss_sum, tokens = 0.0, 0.0
        grad_norm = 0.0
        if usable:
            batch = PolicyBatch.from_trajectories(usable, [0.0] * len(usable), pad)
            token_count = batch.response_mask.sum().clamp(min=1.0)
            self.model.train()
            for micro in torch.arange(batch.size).split(self.micro_batch_size):
                part = batch.select(micro)
                logprobs, _ = self.sequence_logprobs(self.model, part, temperature=1.0)
                nll = -(logprobs * part.response_mask.to(logprobs.device)).sum()
                self.manual_backward(nll / token_count.to(nll.device))
                loss_sum += float(nll.detach())
            tokens = float(token_count)
            grad_norm = self._clip_gradients()
        optimizer.step()  # no gradients (nothing usable) leaves the weights as they were, and still counts the step
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        elapsed = time.perf_counter() - start
        metrics = {
            "train/loss": loss_sum / tokens if tokens else float("nan"),
            "train/tokens": tokens,
            "train/grad_norm": grad_norm,
            "train/lr": float(optimizer.param_groups[0]["lr"]),
            "train/truncated": sum(t.finish_reason == "length" for t in rendered) / len(rendered),
            "train/skipped": float(len(rendered) - len(usable)),
            "time/step_s": elapsed,
            "perf/train_tokens_per_s": sum(len(t.token_ids) for t in usable) / elapsed if elapsed > 0 else 0.0,
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(traces))
        return {"metrics": metrics, "samples": []}
