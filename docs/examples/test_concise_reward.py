"""Testing a reward plugin through the real tool loop, with a scripted model and a fake interpreter."""

from __future__ import annotations

import pytest
import torch
from concise_reward import ConciseMathReward

from retool import Policy, Problem
from retool.testing import EchoExecutor, ScriptedRollout

PROBLEM = Problem(id="q0", prompt="What is 6 * 7?", answer="42")
RIGHT = "<code>\n```python\nprint(6 * 7)\n```\n</code>\n<answer>\\boxed{42}</answer>"
WRONG = "<code>\n```python\nprint(6 * 7)\n```\n</code>\n<answer>\\boxed{41}</answer>"
# The model never writes a box itself (chr(92) is a backslash); only the interpreter's output has one.
PRINTED_BOX = "```python\nprint(chr(92) + 'boxed{42}')\n```\nSee above."


@pytest.fixture(scope="module")
def tokenizer():
    # Any Hugging Face tokenizer with a chat template works; this is the built-in model's.
    return Policy("smollm2-135m-instruct").load_tokenizer()


def roll_out(tokenizer, scripts: list[str], stdout: str = "42\n"):
    """One group of trajectories for PROBLEM: trajectory i "generates" scripts[i]."""
    backend = ScriptedRollout(scripts, max_new_tokens=200)
    backend.bind(torch.nn.Linear(1, 1), tokenizer)  # a placeholder model: the script does the generating
    executor = EchoExecutor(lambda code: stdout)  # answers every cell with `stdout`; runs nothing
    result = backend.rollout([PROBLEM], group_size=len(scripts), executor=executor)
    return result.trajectories, executor


def test_right_and_wrong_answers_in_one_group(tokenizer) -> None:
    trajectories, executor = roll_out(tokenizer, [RIGHT, WRONG])
    assert [code for _, code in executor.calls] == ["print(6 * 7)", "print(6 * 7)"]
    assert all("<interpreter>\n42\n</interpreter>" in t.response_text for t in trajectories)

    scores = ConciseMathReward(token_budget=200)(trajectories, [PROBLEM, PROBLEM])
    assert scores.rewards == [1.0, -1.0]
    assert scores.components["correct"] == [1.0, 0.0]


def test_long_correct_answers_pay_per_token_over_budget(tokenizer) -> None:
    (trajectory,), _ = roll_out(tokenizer, [RIGHT])
    budget = trajectory.num_model_tokens - 10  # 10 model-written tokens over
    scores = ConciseMathReward(token_budget=budget, penalty=0.01)([trajectory], [PROBLEM])
    assert scores.rewards == [pytest.approx(0.9)]
    assert scores.components["over_budget"] == [10.0]


def test_a_box_printed_by_the_interpreter_earns_nothing(tokenizer) -> None:
    (trajectory,), _ = roll_out(tokenizer, [PRINTED_BOX], stdout="\\boxed{42}\n")
    assert "\\boxed{42}" in trajectory.response_text  # the interpreter's reply is in the context...
    assert "<interpreter>" not in trajectory.model_text  # ...but not in what the model wrote
    scores = ConciseMathReward()([trajectory], [PROBLEM])
    assert scores.rewards == [-1.0]
    assert scores.components["has_answer"] == [0.0]
