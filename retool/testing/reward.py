"""The reward contract as a test suite: what every :class:`~retool.Reward` must do, checked from outside.

Subclass :class:`RewardContract` and set ``factory``; set ``problem``, ``correct`` and ``wrong`` (the model text
of a right and of a wrong answer to ``problem``) to also check that the reward tells them apart::

    class TestMyReward(RewardContract):
        factory = staticmethod(lambda: MyReward())
        problem = Problem(id="p", prompt="What is 6 * 7?", answer="42")
        correct, wrong = "<answer>\\\\boxed{42}</answer>", "<answer>\\\\boxed{41}</answer>"

``reward_contract(factory, problem=..., correct=..., wrong=...)`` runs every rule at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from retool.reward import Reward
from retool.testing.executor import run_rules
from retool.types import ExecutionResult, Problem, RewardOutput, ToolCall, Trajectory

GARBAGE = ["", " ", "\\boxed{", "}" * 50, "\\boxed{\\boxed{", "<answer></answer>", "\x00\ufffd😀", "{" * 10_000]
"""Model texts a reward must score without raising: empty, unbalanced, binary-looking, long."""


def trajectory(model_text: str, interpreter: str = "", problem_id: str = "p", group: int = 0) -> Trajectory:
    """A trajectory whose model wrote ``model_text``, followed by an interpreter block holding ``interpreter``."""
    block = f"<interpreter>\n{interpreter}\n</interpreter>\n" if interpreter else ""
    calls = [ToolCall("print(1)", ExecutionResult(stdout=interpreter), block, 0, 0)] if interpreter else []
    return Trajectory(
        problem_id=problem_id, group=group, token_ids=[], loss_mask=[], prompt_len=0, prompt_text="",
        response_text=block + model_text, model_text=model_text, tool_calls=calls,
    )  # fmt: skip


class RewardContract:
    """The rules of the reward contract, one ``test_*`` method each (see the module docstring)."""

    factory: ClassVar[Callable[[], Reward]]
    problem: ClassVar[Problem] = Problem(id="p", prompt="What is 6 * 7?", answer="42")
    correct: ClassVar[str | None] = None
    wrong: ClassVar[str | None] = None

    def score(self, texts: list[str], interpreter: str = "") -> RewardOutput:
        reward = type(self).factory()
        try:
            trajectories = [trajectory(t, interpreter, group=i) for i, t in enumerate(texts)]
            return reward(trajectories, [self.problem] * len(texts))
        finally:
            reward.close()

    def _texts(self) -> list[str]:
        return [t for t in (self.correct, self.wrong) if t is not None] + ["no answer here"]

    def test_one_score_per_trajectory(self) -> None:
        texts = self._texts()
        out = self.score(texts)
        assert isinstance(out, RewardOutput), type(out)
        assert len(out.rewards) == len(texts), out
        assert all(isinstance(r, (int, float)) for r in out.rewards), out

    def test_garbage_scores_without_raising(self) -> None:
        out = self.score(GARBAGE)
        assert len(out.rewards) == len(GARBAGE), out

    def test_scores_follow_the_order_of_the_trajectories(self) -> None:
        texts = self._texts()
        forward, backward = self.score(texts), self.score(texts[::-1])
        assert forward.rewards == backward.rewards[::-1], (forward, backward)

    def test_the_same_trajectories_score_the_same(self) -> None:
        texts = self._texts()
        assert self.score(texts).rewards == self.score(texts).rewards

    def test_interpreter_output_never_counts(self) -> None:
        """Text the sandbox printed (here, the right answer in every form) does not change a score."""
        texts = self._texts()
        gold = self.problem.answer
        planted = f"{gold}\n\\boxed{{{gold}}}\n<answer>\\boxed{{{gold}}}</answer>"
        assert self.score(texts, interpreter=planted).rewards == self.score(texts).rewards

    def test_a_right_answer_scores_above_a_wrong_one(self) -> None:
        if self.correct is None or self.wrong is None:
            return  # nothing to compare: the suite was given no right and wrong answer
        right, wrong = self.score([self.correct, self.wrong]).rewards
        assert right > wrong, (right, wrong)

    def test_close_twice_is_safe(self) -> None:
        reward = type(self).factory()
        reward([trajectory("x")], [self.problem])
        reward.close()
        reward.close()


def reward_contract(
    factory: Callable[[], Reward], problem: Problem | None = None, correct: str | None = None, wrong: str | None = None
) -> None:
    """Check every rule of :class:`RewardContract` against rewards made by ``factory``.

    Raises:
        AssertionError: listing each rule that failed and why.
    """
    attrs: dict[str, Any] = {"factory": staticmethod(factory), "correct": correct, "wrong": wrong}
    if problem is not None:
        attrs["problem"] = problem
    run_rules(type("RewardUnderTest", (RewardContract,), attrs)())
