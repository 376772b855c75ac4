"""Plain dataclasses that cross the boundaries between the core and the plugins.

Everything a plugin receives or returns is one of these: they hold data, not behaviour, so a plugin written
against them does not depend on how the core happens to be organized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StopReason = Literal["timeout", "memory", "output_limit", "crash"]
"""Why an executor stopped a cell before it finished on its own."""

FinishReason = Literal["eos", "length", "max_tool_calls", "stop"]
"""Why a trajectory ended: the model closed its turn, a token budget ran out, the tool-call budget ran out,
or the backend stopped for another reason."""


@dataclass(frozen=True)
class Problem:
    """One task: a prompt for the model and the ground truth the reward checks against.

    Args:
        id: Stable identifier, unique within its dataset (used to group trajectories and in logs).
        prompt: The question as a user would ask it; the rollout format wraps it in tool instructions.
        answer: The ground-truth final answer, as text (e.g. ``"7006652"`` or ``"\\frac{1}{3}"``).
        metadata: Free-form facts about the problem (family, difficulty, source); logged, never used to score.
    """

    id: str
    prompt: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Trace:
    """A worked solution to learn from: one example of supervised (cold-start) fine-tuning data.

    The response is the assistant's whole turn as text, in the rollout's format: for the ReTool format the
    reasoning, ``<code>`` cells, the ``<interpreter>`` blocks that answered them, and
    ``<answer>\\boxed{...}</answer>``. Training renders the prompt exactly as a rollout would (the same
    format, the same chat template) and learns only the tokens the assistant wrote: interpreter blocks, like
    the prompt, are masked.

    Args:
        problem: The problem this trace solves (its prompt is rendered by the rollout format).
        response: The assistant's turn, interpreter blocks included.
        metadata: Free-form facts (source, family, style ``code``/``text``); logged, never trained on.
    """

    problem: Problem
    response: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutionResult:
    """What running one code cell produced.

    Args:
        stdout: Captured standard output (possibly cut, see ``truncated``).
        stderr: Captured standard error (possibly cut).
        error: The last line of the traceback (``"NameError: name 'x' is not defined"``) or ``None``.
        timed_out: The cell ran past the wall-clock limit and was killed.
        wall_s: Wall time of the cell as seen by the executor, in seconds.
        truncated: Output was longer than the cap; its head and tail were kept.
        session_restarted: The session's earlier state (variables, imports) was lost before this cell ran,
            because a previous cell crashed, timed out or hit a limit.
        stop_reason: Why the cell was stopped from outside (``timeout``, ``memory``, ``output_limit``,
            ``crash``), or ``None`` when it ran to its end (with or without an exception).
    """

    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    timed_out: bool = False
    wall_s: float = 0.0
    truncated: bool = False
    session_restarted: bool = False
    stop_reason: StopReason | None = None

    @property
    def ok(self) -> bool:
        """The cell ran to its end without an exception, a timeout or a limit."""
        return self.error is None and not self.timed_out and self.stop_reason is None

    @property
    def executor_failed(self) -> bool:
        """The executor itself failed (a sandbox that cannot start, a lost connection, a plugin that raised),
        not the code: by the contract an error starting with one of :data:`EXECUTOR_ERRORS`, with
        ``stop_reason="crash"``. A cell's own exception never has that stop reason."""
        return self.stop_reason == "crash" and (self.error or "").startswith(EXECUTOR_ERRORS)


EXECUTOR_ERRORS = ("SandboxError:", "SandboxUnavailable:", "ExecutorError:")
"""Prefixes of :attr:`ExecutionResult.error` that say the executor failed, not the code (see the Executor
contract): ``SandboxError`` from an executor about itself, ``SandboxUnavailable`` from a sandbox that refuses
to run (``strict``), ``ExecutorError`` from the rollout loop when ``execute`` raised."""


@dataclass(frozen=True)
class CheckResult:
    """One isolation layer of an executor, as its self-check found it (see ``retool sandbox check``).

    Args:
        name: The layer, e.g. ``network``, ``filesystem``, ``seccomp``.
        active: The layer is in force on this machine.
        passed: Whether the layer's self-test (an attack on it from a cell) was held off; ``None`` when it was
            not tested (an inactive layer, or one without a test).
        detail: How the layer is enforced, why it is missing, or what the test saw.
    """

    name: str
    active: bool
    passed: bool | None
    detail: str


@dataclass(frozen=True)
class ToolCall:
    """One code cell of a trajectory and what the executor answered.

    Args:
        code: The Python source the model wrote (fences and tags stripped).
        result: The executor's answer.
        feedback: The exact text appended to the context (the interpreter block).
        token_start: Index in ``Trajectory.token_ids`` where the interpreter block's tokens start.
        token_end: Index one past the interpreter block's last token.
    """

    code: str
    result: ExecutionResult
    feedback: str
    token_start: int
    token_end: int


@dataclass
class Trajectory:
    """One rollout: the prompt, everything that followed it as token ids, and which tokens the model wrote.

    The sequence is assembled from token ids exactly as they were generated or appended, never by
    re-tokenizing text, so ``token_ids[i]`` is the token the model saw at position ``i`` during the rollout.

    Args:
        problem_id: ``Problem.id`` of the problem this trajectory answers.
        group: Index of the trajectory within its problem's group (0..group_size-1).
        token_ids: Prompt tokens followed by response tokens (model-written and interpreter tokens).
        loss_mask: Same length as ``token_ids``: 1 where the model wrote the token, 0 for the prompt and for
            interpreter output. Every token-level training term uses it.
        prompt_len: Number of prompt tokens at the start of ``token_ids``.
        prompt_text: The prompt as text (the rendered chat template).
        response_text: Everything after the prompt as text, interpreter blocks included.
        model_text: Only the text the model wrote (interpreter blocks removed); rewards read this.
        tool_calls: The cells, in order.
        finish_reason: Why the trajectory ended.
        logprobs: Log-probabilities the sampler assigned to each token (0.0 where the model did not write it),
            when the backend reports them; same length as ``token_ids``.
    """

    problem_id: str
    group: int
    token_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    prompt_text: str
    response_text: str
    model_text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "eos"
    logprobs: list[float] | None = None

    @property
    def num_model_tokens(self) -> int:
        """Tokens the model wrote (the ones that receive gradient)."""
        return sum(self.loss_mask)

    @property
    def response_len(self) -> int:
        """Tokens after the prompt, interpreter tokens included."""
        return len(self.token_ids) - self.prompt_len


@dataclass(frozen=True)
class RewardOutput:
    """Scores for a batch of trajectories.

    Args:
        rewards: One scalar per trajectory, in the order the trajectories were given.
        components: Named per-trajectory parts of the reward (e.g. ``correct``, ``has_answer``), each a list
            as long as ``rewards``; logged as means.
    """

    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.components.items():
            if len(values) != len(self.rewards):
                raise ValueError(
                    f"reward component {name!r} has {len(values)} values for {len(self.rewards)} trajectories"
                )


@dataclass(frozen=True)
class StepRecord:
    """What one training step reports, for the console's step table and the run directory.

    Args:
        step: ``trainer.global_step`` after the step (the first step is 1).
        metrics: Every number the step logged (``reward/mean``, ``train/loss``, ``time/step_s``, ...).
        samples: Rows for ``trajectories.jsonl``: a few of the step's trajectories, readable (prompt, response
            with its interpreter blocks, reward).
    """

    step: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation on held-out problems.

    Args:
        step: ``trainer.global_step`` when it ran (0 before training).
        metrics: The ``eval/*`` numbers (accuracy, avg@k and pass@k when sampled, the paper's code metrics).
        samples: Rows for ``eval_trajectories.jsonl``: every greedy answer, with whether it was correct.
    """

    step: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        """The line of ``evaluation.jsonl``: ``{"step": step, **metrics}``."""
        return {"step": self.step, **self.metrics}
