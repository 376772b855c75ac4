"""A custom reward: the paper's correctness check, minus a small penalty for long correct answers."""

from __future__ import annotations

from collections.abc import Sequence

from retool import Problem, Reward, RewardOutput, Trajectory
from retool.answer import final_boxes
from retool_plugins.rewards.math_answer import answer_checks, answer_verdict, check_equivalent


class ConciseMathReward(Reward):
    """+1 for a correct final ``\\boxed{}`` answer, less a penalty per token over a budget; -1 otherwise.

    Only tokens the model wrote count (``Trajectory.num_model_tokens``): interpreter output does not make
    an answer "long". The penalty applies to correct answers only and never takes their reward below 0,
    so a long correct answer still beats any wrong one.

    Args:
        token_budget: Model-written tokens a trajectory may use before the penalty starts.
        penalty: Reward taken off a correct answer per model-written token above ``token_budget``.
    """

    def __init__(self, token_budget: int = 200, penalty: float = 0.001) -> None:
        if token_budget < 0:
            raise ValueError(f"token_budget must be >= 0, got {token_budget}")
        if penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {penalty}")
        self.token_budget = token_budget
        self.penalty = penalty

    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        rewards: list[float] = []
        correct: list[float] = []
        has_answer: list[float] = []
        over_budget: list[float] = []
        for trajectory, problem in zip(trajectories, problems, strict=True):
            boxes = final_boxes(trajectory.model_text)  # [] when there is no closed \boxed{}
            # Several boxes are one answer (a list of solutions); a hedge between values scores wrong.
            ok = answer_verdict([check_equivalent(problem.answer, c) for c in answer_checks(boxes)])
            excess = max(0, trajectory.num_model_tokens - self.token_budget)
            rewards.append(max(0.0, 1.0 - self.penalty * excess) if ok else -1.0)
            correct.append(float(ok))
            has_answer.append(float(bool(boxes)))
            over_budget.append(float(excess))
        # Each component is logged as its mean: reward/correct (the "acc" column), reward/over_budget, ...
        return RewardOutput(
            rewards=rewards,
            components={"correct": correct, "has_answer": has_answer, "over_budget": over_budget},
        )
