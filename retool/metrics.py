"""Rollout metrics: what the model wrote and how its code fared (after the ReTool paper's analysis, §3.3)."""

from __future__ import annotations

from collections.abc import Sequence

from retool.types import Trajectory


def rollout_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Means over one batch of trajectories.

    * ``response/model_tokens``: tokens the model wrote (interpreter tokens excluded: they are not its output).
    * ``response/length``: tokens after the prompt, interpreter tokens included (what fills the context).
    * ``tools/calls``: code cells per trajectory.
    * ``tools/cell_ok``: share of cells that ran to their end without an exception, timeout or limit.
    * ``tools/timeouts``: share of cells stopped by the time limit.
    * ``tools/code_ratio``: share of trajectories with at least one cell (the paper's "code ratio").
    * ``finish/<reason>``: share of trajectories that ended for each reason.
    """
    n = max(len(trajectories), 1)
    cells = [call for t in trajectories for call in t.tool_calls]
    metrics = {
        "response/model_tokens": sum(t.num_model_tokens for t in trajectories) / n,
        "response/length": sum(t.response_len for t in trajectories) / n,
        "tools/calls": len(cells) / n,
        "tools/cell_ok": sum(call.result.ok for call in cells) / len(cells) if cells else 0.0,
        "tools/timeouts": sum(call.result.timed_out for call in cells) / len(cells) if cells else 0.0,
        "tools/code_ratio": sum(bool(t.tool_calls) for t in trajectories) / n,
    }
    for reason in ("eos", "length", "max_tool_calls", "stop"):
        metrics[f"finish/{reason}"] = sum(t.finish_reason == reason for t in trajectories) / n
    return metrics
