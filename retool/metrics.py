"""Rollout metrics: what the model wrote and how its code fared (after the ReTool paper's analysis, §3.3).

Each trajectory is first reduced to a few numbers (:class:`TrajectoryStats`), and the metrics are computed from
those: ranks that rolled out different trajectories gather the small records, not the trajectories, and compute
the same metrics a single process would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from retool.types import Trajectory


@dataclass(frozen=True)
class TrajectoryStats:
    """The numbers of one trajectory that the rollout metrics are computed from.

    Args:
        model_tokens: Tokens the model wrote.
        length: Tokens after the prompt, interpreter tokens included.
        cells: Code cells executed.
        cells_ok: Cells that ran to their end without an exception, timeout or limit.
        timeouts: Cells stopped by the time limit.
        executor_errors: Cells the executor itself failed on (``ExecutionResult.executor_failed``).
        code_lines: Non-blank lines of code over all its cells.
        last_cell_ok: Whether its last cell ran cleanly (``None`` without cells).
        first_cell_pos: Where its first cell's code starts in the model-written text, 0 to 1 (``None`` without cells).
        finish_reason: Why it ended.
    """

    model_tokens: int
    length: int
    cells: int
    cells_ok: int
    timeouts: int
    code_lines: int
    executor_errors: int
    last_cell_ok: bool | None
    first_cell_pos: float | None
    finish_reason: str

    @classmethod
    def of(cls, trajectory: Trajectory) -> TrajectoryStats:
        calls = trajectory.tool_calls
        return cls(
            model_tokens=trajectory.num_model_tokens,
            length=trajectory.response_len,
            cells=len(calls),
            cells_ok=sum(call.result.ok for call in calls),
            timeouts=sum(call.result.timed_out for call in calls),
            code_lines=sum(_lines(call.code) for call in calls),
            executor_errors=sum(call.result.executor_failed for call in calls),
            last_cell_ok=calls[-1].result.ok if calls else None,
            first_cell_pos=_first_cell_position(trajectory) if calls else None,
            finish_reason=trajectory.finish_reason,
        )


def rollout_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Means over one batch of trajectories (see :func:`summarize`)."""
    return summarize([TrajectoryStats.of(t) for t in trajectories])


def summarize(stats: Sequence[TrajectoryStats]) -> dict[str, float]:
    """Means over the trajectories that ``stats`` describe.

    * ``response/model_tokens``: tokens the model wrote (interpreter tokens excluded: they are not its output).
    * ``response/length``: tokens after the prompt, interpreter tokens included (what fills the context).
    * ``tools/calls``: code cells per trajectory.
    * ``tools/cell_ok``: share of cells that ran to their end without an exception, timeout or limit.
    * ``tools/last_cell_ok``: among trajectories with a cell, share whose last cell ran cleanly (the paper
      finds the last cell's pass rate rising during RL: the model learns to end on working code).
    * ``tools/timeouts``: share of cells stopped by the time limit.
    * ``tools/executor_errors``: how many cells (a count for the batch, not a mean) the executor itself failed
      on: a sandbox that cannot start, a lost connection, a plugin that raised. Anything above 0 needs a look.
    * ``tools/code_ratio``: share of trajectories with at least one cell (the paper's "code ratio").
    * ``tools/code_lines``: among trajectories with a cell, non-blank lines of code per response (the
      paper's "code lines").
    * ``tools/first_cell_pos``: among trajectories with a cell, where the first cell's code begins, as a
      share of the model-written text (0 = at the start of the response, 1 = at its end; the paper's "code
      invocation timing": RL moves it earlier).
    * ``finish/<reason>``: share of trajectories that ended for each reason.
    """
    n = max(len(stats), 1)
    cells = sum(s.cells for s in stats)
    with_cells = [s for s in stats if s.cells]
    metrics = {
        "response/model_tokens": sum(s.model_tokens for s in stats) / n,
        "response/length": sum(s.length for s in stats) / n,
        "tools/calls": cells / n,
        "tools/cell_ok": sum(s.cells_ok for s in stats) / cells if cells else 0.0,
        "tools/last_cell_ok": sum(bool(s.last_cell_ok) for s in with_cells) / len(with_cells) if with_cells else 0.0,
        "tools/timeouts": sum(s.timeouts for s in stats) / cells if cells else 0.0,
        "tools/executor_errors": float(sum(s.executor_errors for s in stats)),
        "tools/code_ratio": len(with_cells) / n,
        "tools/code_lines": sum(s.code_lines for s in with_cells) / len(with_cells) if with_cells else 0.0,
        "tools/first_cell_pos": (
            sum(float(s.first_cell_pos or 0.0) for s in with_cells) / len(with_cells) if with_cells else float("nan")
        ),
    }
    for reason in ("eos", "length", "max_tool_calls", "stop"):
        metrics[f"finish/{reason}"] = sum(s.finish_reason == reason for s in stats) / n
    return metrics


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
