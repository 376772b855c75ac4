"""Trajectories as the tensors an update trains on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from retool.types import Trajectory


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
        values: (N, R) a critic's value estimates before each response token, or ``None`` without a critic.
        returns: (N, R) the targets the critic is trained towards, or ``None``.
        extra: Further per-row tensors an estimator needs (first dimension N); sliced with the rest.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> PolicyBatch:
        """The rows ``index``: every tensor field, and every tensor of ``extra``, sliced the same way."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra"}
        rows = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
        return PolicyBatch(**rows, extra={k: v[index] for k, v in self.extra.items()})

    @staticmethod
    def concat(parts: Sequence[PolicyBatch], pad_id: int) -> PolicyBatch:
        """The rows of ``parts`` in order, as one batch: each part is re-padded to the widest prompt and the widest
        response (prompt columns on the left, response columns on the right), so every row keeps its tokens,
        masks and per-token numbers in the columns the layout gives them. A field is kept only if every part
        has it."""
        prompt_w = max(p.input_ids.shape[1] - p.response_width for p in parts)
        resp_w = max(p.response_width for p in parts)

        def widen(tensor: torch.Tensor, part: PolicyBatch, fill: float) -> torch.Tensor:
            if tensor.dim() == 1:
                return tensor
            left = right = 0
            if tensor.shape[1] == part.response_width:  # response columns
                right = resp_w - part.response_width
            elif tensor.shape[1] == part.input_ids.shape[1]:  # prompt + response columns
                left = prompt_w - (part.input_ids.shape[1] - part.response_width)
                right = resp_w - part.response_width
            else:
                raise ValueError(
                    f"a per-row tensor of width {tensor.shape[1]} is neither the prompt plus the "
                    f"response ({part.input_ids.shape[1]}) nor the response ({part.response_width})"
                )
            return torch.nn.functional.pad(tensor, (left, right), value=fill)

        fields: dict[str, torch.Tensor | None] = {}
        for name in PolicyBatch.__dataclass_fields__:
            if name == "extra":
                continue
            values = [getattr(p, name) for p in parts]
            fill = pad_id if name == "input_ids" else 0
            fields[name] = (
                torch.cat([widen(v, p, fill) for v, p in zip(values, parts)])
                if all(v is not None for v in values)
                else None
            )
        names = set.intersection(*(set(p.extra) for p in parts))
        extra = {k: torch.cat([widen(p.extra[k], p, 0) for p in parts]) for k in sorted(names)}
        return PolicyBatch(**fields, extra=extra)  # type: ignore[arg-type]

    @staticmethod
    def placeholder(pad_id: int) -> PolicyBatch:
        """One row of two pad tokens with nothing to learn from (an empty loss mask): a pass that keeps a rank
        in step with the others when the model is sharded and it has run out of rows of its own."""
        return PolicyBatch(
            input_ids=torch.full((1, 2), pad_id, dtype=torch.long),
            attention_mask=torch.ones((1, 2), dtype=torch.long),
            response_mask=torch.zeros((1, 1), dtype=torch.float32),
            rewards=torch.zeros(1),
            advantages=torch.zeros((1, 1), dtype=torch.float32),
        )

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
