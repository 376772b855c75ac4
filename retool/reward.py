"""The reward contract: how a trajectory is scored against its problem."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from retool.types import Problem, RewardOutput, Trajectory


class Reward(ABC):
    """Scores trajectories.

    A reward reads ``Trajectory.model_text`` (what the model wrote, interpreter output removed) so that text
    the sandbox printed can never earn a reward. It must not raise on garbage text: a malformed or empty
    generation simply scores as incorrect.
    """

    @abstractmethod
    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        """Score ``trajectories[i]`` against ``problems[i]`` (the two sequences have equal length)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most rewards hold nothing
        """Free what the reward holds (worker processes, clients); the trainer calls it when a run ends."""
