"""The test kit fails plugins that break their contract, and names the rule they broke."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from retool import ExecutionResult, Executor, Problem, Reward, RewardOutput, RolloutBackend
from retool.testing import (
    EchoExecutor,
    InMemoryData,
    ScriptedRollout,
    data_contract,
    executor_contract,
    options_contract,
    reward_contract,
    rollout_contract,
)


class SharedState(Executor):
    """A real sandbox whose sessions all share one interpreter: a trajectory sees another's variables."""

    def __init__(self) -> None:
        from retool_plugins.executors.local import LocalSandbox

        self.inner = LocalSandbox(timeout_s=2.0)

    async def execute(self, code: str, session: str) -> ExecutionResult:
        return await self.inner.execute(code, "shared")

    async def close_session(self, session: str) -> None:
        pass  # and forgets to reset anything

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_an_executor_that_leaks_state_between_sessions_is_caught() -> None:
    with pytest.raises(AssertionError) as failed:
        executor_contract(SharedState)
    assert "test_sessions_do_not_see_each_other" in str(failed.value)
    assert "test_close_session_then_reuse_starts_fresh" in str(failed.value)
    assert "test_print_goes_to_stdout" not in str(failed.value)  # the rules it keeps pass


class PeeksAtTheInterpreter(Reward):
    """Rewards an answer that the sandbox printed: reward hacking through the interpreter."""

    def __call__(self, trajectories: Any, problems: Any) -> RewardOutput:
        return RewardOutput([float(p.answer in t.response_text) for t, p in zip(trajectories, problems)])


def test_a_reward_that_reads_interpreter_output_is_caught() -> None:
    with pytest.raises(AssertionError, match="test_interpreter_output_never_counts"):
        reward_contract(PeeksAtTheInterpreter)


def test_a_reward_that_cannot_tell_right_from_wrong_is_caught() -> None:
    class Constant(Reward):
        def __call__(self, trajectories: Any, problems: Any) -> RewardOutput:
            return RewardOutput([0.0] * len(trajectories))

    reward_contract(Constant)  # nothing to compare without answers: it keeps every other rule
    with pytest.raises(AssertionError, match="test_a_right_answer_scores_above_a_wrong_one"):
        reward_contract(Constant, correct="\\boxed{42}", wrong="\\boxed{41}")


def test_a_dataset_whose_val_problems_are_in_train_is_caught() -> None:
    problems = [Problem(f"p{i}", f"question {i}", str(i)) for i in range(4)]
    data_contract(lambda: InMemoryData(train=problems[:3], val=problems[3:]))
    with pytest.raises(AssertionError, match="test_val_problems_are_held_out"):
        data_contract(lambda: InMemoryData(train=problems, val=problems[3:]))


class ForgetsTheBase(RolloutBackend):
    """Takes an option of its own but does not pass the base's on: a recipe cannot set temperature."""

    def __init__(self, beam: int = 1) -> None:
        super().__init__()
        self.beam = beam

    async def generate(self, request: Any) -> Any:
        raise NotImplementedError


class Undocumented(RolloutBackend):
    def __init__(self, beam: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beam = beam

    async def generate(self, request: Any) -> Any:
        raise NotImplementedError


def test_a_plugin_that_hides_its_base_options_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"'temperature' \(declared by RolloutBackend\) cannot be set"):
        options_contract(ForgetsTheBase, RolloutBackend)
    with pytest.raises(AssertionError, match="'beam' has no help text"):
        options_contract(Undocumented, RolloutBackend)


def test_the_fakes_keep_the_contracts_they_stand_in_for() -> None:
    with pytest.raises(AssertionError) as failed:  # EchoExecutor runs nothing: it only keeps the calling shape
        executor_contract(EchoExecutor)
    assert "test_an_exception_is_reported_by_its_last_line" in str(failed.value)


class OverBudget(ScriptedRollout):
    """Writes one token more than each request allows."""

    async def generate(self, request: Any) -> Any:
        out = await super().generate(request)
        ids = [*out.token_ids, out.token_ids[-1] if out.token_ids else 0]
        return type(out)(ids, [0.0] * len(ids), "length")


def test_a_backend_that_overruns_its_budget_is_caught(tiny_model_dir: Path) -> None:
    script = "Let me think about it for a while before I answer. <answer>\\boxed{42}</answer>"
    rollout_contract(lambda: ScriptedRollout(script, max_new_tokens=8), str(tiny_model_dir), logprob_tolerance=None)
    with pytest.raises(AssertionError, match="test_generate_keeps_its_token_budget"):
        rollout_contract(lambda: OverBudget(script, max_new_tokens=8), str(tiny_model_dir), logprob_tolerance=None)
