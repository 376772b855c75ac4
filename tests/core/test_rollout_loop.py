"""The tool loop assembles trajectories token-exact, with interpreter tokens masked out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from retool import ExecutionResult, Problem
from retool.metrics import rollout_metrics
from retool.rollout.failures import ExecutorFailing
from retool.testing import EchoExecutor, ScriptedRollout

SCRIPT = (
    "I will compute it.\n<code>\n```python\nx = 1234 * 5678\nprint(x)\n```\n</code>\n"
    "Check with a second cell:\n```python\nprint(x + 1)\n```\n"
    "So <answer>\\boxed{7006652}</answer>"
)


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _backend(tokenizer, script=SCRIPT, **kwargs) -> ScriptedRollout:
    backend = ScriptedRollout(lambda prompt: script, **kwargs)
    backend.bind(torch.nn.Linear(1, 1), tokenizer)
    return backend


def test_masked_spans_are_exactly_the_prompt_and_the_interpreter_blocks(tokenizer) -> None:
    outputs = iter(["7006652\n", "7006653\n"])
    executor = EchoExecutor(lambda code: next(outputs))
    backend = _backend(tokenizer, max_new_tokens=400)
    result = backend.rollout([Problem("p0", "What is 1234 * 5678?", "7006652")], 1, executor)
    (traj,) = result.trajectories
    assert traj.finish_reason == "eos"
    assert [c.code for c in traj.tool_calls] == ["x = 1234 * 5678\nprint(x)", "print(x + 1)"]

    # Walk the mask: maximal runs of 0 are the prompt, then exactly one run per interpreter block.
    runs, start = [], 0
    for i in range(1, len(traj.token_ids) + 1):
        if i == len(traj.token_ids) or traj.loss_mask[i] != traj.loss_mask[start]:
            runs.append((traj.loss_mask[start], start, i))
            start = i
    masked = [tokenizer.decode(traj.token_ids[a:b]) for m, a, b in runs if m == 0]
    assert masked[0] == traj.prompt_text and masked[0].rstrip().endswith("assistant")
    assert masked[1:] == ["\n<interpreter>\n7006652\n</interpreter>\n", "\n<interpreter>\n7006653\n</interpreter>\n"]
    assert [(c.token_start, c.token_end) for c in traj.tool_calls] == [(a, b) for m, a, b in runs if m == 0][1:]

    # The model-written spans decode to the script (plus EOS), and model_text excludes interpreter output.
    written = "".join(tokenizer.decode(traj.token_ids[a:b]) for m, a, b in runs if m == 1)
    assert written == SCRIPT + tokenizer.eos_token
    assert traj.model_text == SCRIPT
    assert "<interpreter>" not in traj.model_text and "<interpreter>" in traj.response_text
    assert traj.num_model_tokens == sum(b - a for m, a, b in runs if m == 1)
    assert len(traj.logprobs) == len(traj.token_ids)


def test_interpreter_tokens_are_the_tokenization_of_the_feedback(tokenizer) -> None:
    executor = EchoExecutor(lambda code: "3\n")
    backend = _backend(tokenizer, max_new_tokens=400)
    (traj,) = backend.rollout([Problem("p0", "q", "1")], 1, executor).trajectories
    call = traj.tool_calls[0]
    assert traj.token_ids[call.token_start : call.token_end] == tokenizer.encode(
        call.feedback, add_special_tokens=False
    )
    # The next generation request continued from the exact token list, interpreter tokens included.
    second = backend.calls[1]
    assert second.token_ids == traj.token_ids[: len(second.token_ids)]
    assert len(second.token_ids) == call.token_end


def test_budgets_end_the_trajectory(tokenizer) -> None:
    executor = EchoExecutor(lambda code: "1\n")
    backend = _backend(tokenizer, max_new_tokens=400, max_tool_calls=1)
    (traj,) = backend.rollout([Problem("p0", "q", "1")], 1, executor).trajectories
    assert traj.finish_reason == "max_tool_calls" and len(traj.tool_calls) == 1

    backend = _backend(tokenizer, max_new_tokens=5)
    (traj,) = backend.rollout([Problem("p0", "q", "1")], 1, executor).trajectories
    assert traj.finish_reason == "length" and traj.num_model_tokens == 5 and not traj.tool_calls


def test_each_trajectory_has_its_own_session_and_sessions_are_closed(tokenizer) -> None:
    executor = EchoExecutor(lambda code: "1\n")
    backend = _backend(tokenizer, max_new_tokens=400)
    problems = [Problem("a", "q1", "1"), Problem("b", "q2", "1")]
    result = backend.rollout(problems, 3, executor)
    assert [(t.problem_id, t.group) for t in result.trajectories] == [(p, g) for p in "ab" for g in range(3)]
    sessions = {s for s, _ in executor.calls}
    assert len(sessions) == 6
    assert sorted(executor.closed) == sorted(sessions)


def test_tools_off_never_stops_for_code(tokenizer) -> None:
    executor = EchoExecutor()
    backend = _backend(tokenizer, max_new_tokens=400, tools=False)
    (traj,) = backend.rollout([Problem("p0", "q", "1")], 1, executor).trajectories
    assert not traj.tool_calls and not executor.calls
    assert "<code>" not in traj.prompt_text  # the text-only prompt: no tool instructions
    assert traj.model_text == SCRIPT and sum(traj.loss_mask) == len(traj.token_ids) - traj.prompt_len


def test_an_executor_that_raises_becomes_a_recorded_error(tokenizer) -> None:
    class Broken(EchoExecutor):
        async def execute(self, code: str, session: str):
            raise ConnectionError("sandbox went away")

    backend = _backend(tokenizer, max_new_tokens=400)
    (traj,) = backend.rollout([Problem("p0", "q", "1")], 1, Broken()).trajectories
    assert traj.tool_calls and "sandbox went away" in traj.tool_calls[0].result.error
    assert traj.finish_reason == "eos"


def test_executor_failures_are_logged_once_per_kind_and_counted(tokenizer, caplog) -> None:
    class Broken(EchoExecutor):
        async def execute(self, code: str, session: str):
            raise ConnectionError("sandbox went away")

    backend = _backend(tokenizer, max_new_tokens=400)
    with caplog.at_level(logging.ERROR, logger="retool.rollout"):
        result = backend.rollout([Problem("p0", "q", "1"), Problem("p1", "q", "1")], 2, Broken())
    assert rollout_metrics(result.trajectories)["tools/executor_errors"] == 8.0  # 4 trajectories, 2 cells each
    (record,) = caplog.records  # eight failures of one kind: one line, with the plugin's traceback
    assert "ExecutorError: ConnectionError: sandbox went away" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ConnectionError
    assert backend.executor_failures.in_a_row == 8


def test_a_cell_the_executor_runs_ends_a_streak_and_the_codes_own_errors_never_count(tokenizer) -> None:
    outcomes = iter(
        [
            ExecutionResult(error="SandboxError: the worker failed to start", stop_reason="crash"),
            ExecutionResult(error="ZeroDivisionError: division by zero"),  # the code's failure: the executor ran
            # A cell can raise an exception of any name: without stop_reason="crash" it is the code's.
            ExecutionResult(error="SandboxError: raised by the cell itself"),
            ExecutionResult(error="InterpreterCrash: the Python interpreter crashed", stop_reason="crash"),
        ]
    )

    class Scripted(EchoExecutor):
        async def execute(self, code: str, session: str):
            return next(outcomes)

    backend = _backend(tokenizer, max_new_tokens=400, max_executor_failures=2)
    executor = Scripted()
    first = backend.rollout([Problem("p0", "q", "1")], 1, executor).trajectories
    second = backend.rollout([Problem("p0", "q", "1")], 1, executor).trajectories
    assert [rollout_metrics(t)["tools/executor_errors"] for t in (first, second)] == [1.0, 0.0]
    assert backend.executor_failures.in_a_row == 0


def test_consecutive_executor_failures_stop_the_run_with_a_clear_error(tokenizer) -> None:
    class Dead(EchoExecutor):
        async def execute(self, code: str, session: str):
            return ExecutionResult(error="SandboxError: could not start a worker: [Errno 24]", stop_reason="crash")

    backend = _backend(tokenizer, max_new_tokens=400, max_executor_failures=5)
    executor = Dead()
    with pytest.raises(ExecutorFailing, match=r"failed on 5 cells in a row .*rollout\.max_executor_failures"):
        backend.rollout([Problem(f"p{i}", "q", "1") for i in range(4)], 2, executor)
    assert len(set(executor.closed)) == 8  # every trajectory's session was closed

    never = _backend(tokenizer, max_new_tokens=400, max_executor_failures=0)
    result = never.rollout([Problem(f"p{i}", "q", "1") for i in range(4)], 2, Dead())
    assert rollout_metrics(result.trajectories)["tools/executor_errors"] == 16.0
    with pytest.raises(ValueError, match="max_executor_failures must be >= 0"):
        _backend(tokenizer, max_executor_failures=-1)
