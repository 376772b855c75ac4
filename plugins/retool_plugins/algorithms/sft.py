"""SFT: supervised fine-tuning on worked solutions (the ReTool cold start), with the RL runs' tooling."""

from __future__ import annotations

import time
from typing import Any

import torch

from retool import distributed
from retool.algorithm import Algorithm, PolicyBatch
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
        max_length: Cut each rendered trace to this many tokens (prompt included); ``None`` for no limit.
        warmup_steps: Linear learning-rate warm-up over this many steps (0 = none).
        **kwargs: The options of every algorithm (``weight_decay``, ``max_grad_norm``, ``micro_batch_size``: traces
            per forward/backward pass, ``eval_every``, ...).
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
        max_length: int | None = 1024,
        warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 or null, got {max_length}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        super().__init__(lr=lr, **kwargs)
        self.max_length = max_length
        self.warmup_steps = warmup_steps

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

    def training_step(self, traces: list[Trace], batch_idx: int) -> None:
        assert self.model is not None and self.rollout is not None
        start = time.perf_counter()
        rendered = [trace_trajectory(self.rollout, trace, self.max_length) for trace in traces]
        usable = [t for t in rendered if t.num_model_tokens > 0]  # a prompt longer than max_length teaches nothing
        optimizer = self.optimizers()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        loss_sum, tokens = 0.0, 0.0
        batch: PolicyBatch | None = None
        if usable:
            batch = PolicyBatch.from_trajectories(usable, [0.0] * len(usable), pad)
            tokens = float(batch.response_mask.sum())
        # The loss is the mean over every rank's tokens, so N processes take the step one process would.
        token_count = self.token_normalizer(tokens)
        # Under FSDP2 and DeepSpeed a rank with fewer usable traces also runs passes that teach nothing.
        parts = [part for _, part in self.passes(batch)]
        if parts:
            self.model.train()
            for k, part in enumerate(parts):
                logprobs, _ = self.sequence_logprobs(self.model, part, temperature=1.0)
                nll = -(logprobs * part.response_mask.to(logprobs.device)).sum()
                with self.gradient_sync(self.model, enabled=k == len(parts) - 1):
                    self.manual_backward(nll / token_count.to(nll.device))
                loss_sum += float(nll.detach())
        self.sync_gradients(self.model)
        if parts:
            grad_norm = self.clip_and_step(self.model, optimizer)
        else:  # nothing usable on any rank: count the step, change nothing
            with self.without_update():
                grad_norm = self.clip_and_step(self.model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        elapsed = distributed.max_across({"time": time.perf_counter() - start})["time"]
        totals = distributed.sum_across(
            {
                "loss": loss_sum,
                "tokens": tokens,
                "traces": float(len(rendered)),
                "truncated": float(sum(t.finish_reason == "length" for t in rendered)),
                "skipped": float(len(rendered) - len(usable)),
                "all_tokens": float(sum(len(t.token_ids) for t in usable)),
            }
        )
        metrics = {
            "train/loss": totals["loss"] / totals["tokens"] if totals["tokens"] else float("nan"),
            "train/tokens": totals["tokens"],
            "train/grad_norm": grad_norm,
            "train/lr": float(optimizer.param_groups[0]["lr"]),
            "train/truncated": totals["truncated"] / totals["traces"],
            "train/skipped": totals["skipped"],
            "time/step_s": elapsed,
            "perf/train_tokens_per_s": totals["all_tokens"] / elapsed if elapsed > 0 else 0.0,
        }
        self.record_step(metrics, batch_size=len(traces))
