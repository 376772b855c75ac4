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
    * ``tools/last_cell_ok``: among trajectories with a cell, share whose last cell ran cleanly (the paper
      finds the last cell's pass rate rising during RL: the model learns to end on working code).
    * ``tools/timeouts``: share of cells stopped by the time limit.
    * ``tools/code_ratio``: share of trajectories with at least one cell (the paper's "code ratio").
    * ``tools/code_lines``: among trajectories with a cell, non-blank lines of code per response (the
      paper's "code lines").
    * ``tools/first_cell_pos``: among trajectories with a cell, where the first cell's code begins, as a
      share of the model-written text (0 = at the start of the response, 1 = at its end; the paper's "code
      invocation timing": RL moves it earlier).
    * ``finish/<reason>``: share of trajectories that ended for each reason.
    """
    n = max(len(trajectories), 1)
    cells = [call for t in trajectories for call in t.tool_calls]
    with_cells = [t for t in trajectories if t.tool_calls]
    metrics = {
        "response/model_tokens": sum(t.num_model_tokens for t in trajectories) / n,
        "response/length": sum(t.response_len for t in trajectories) / n,
        "tools/calls": len(cells) / n,
        "tools/cell_ok": _share(call.result.ok for call in cells),
        "tools/last_cell_ok": _share(t.tool_calls[-1].result.ok for t in with_cells),
        "tools/timeouts": _share(call.result.timed_out for call in cells),
        "tools/code_ratio": len(with_cells) / n,
        "tools/code_lines": (
            sum(_lines(call.code) for t in with_cells for call in t.tool_calls) / len(with_cells) if with_cells else 0.0
        ),
        "tools/first_cell_pos": (
            sum(_first_cell_position(t) for t in with_cells) / len(with_cells) if with_cells else float("nan")
        ),
    }
    for reason in ("eos", "length", "max_tool_calls", "stop"):
        metrics[f"finish/{reason}"] = sum(t.finish_reason == reason for t in trajectories) / n
    return metrics


def _share(flags: Sequence[bool] | object) -> float:
    values = list(flags)  # type: ignore[call-overload]
    return sum(values) / len(values) if values else 0.0


def _lines(code: str) -> int:
    return sum(1 for line in code.splitlines() if line.strip())


def _first_cell_position(trajectory: Trajectory) -> float:
    """Where the first cell's code starts in the model-written text, as a share of that text's length."""
    text = trajectory.model_text
    where = text.find(trajectory.tool_calls[0].code) if trajectory.tool_calls[0].code else -1
    if where < 0:  # code the format normalized: fall back to the model tokens written before its reply
        before = sum(trajectory.loss_mask[trajectory.prompt_len : trajectory.tool_calls[0].token_start])
        return before / max(trajectory.num_model_tokens, 1)
    return where / max(len(text), 1)
