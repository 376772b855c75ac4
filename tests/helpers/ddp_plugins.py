"""Plugins for the multi-process tests, loaded by the ``retool fit`` processes they start (``RETOOL_PLUGINS``)."""

from __future__ import annotations

from collections.abc import Sequence

from retool import Problem, ProblemDataModule, Reward, RewardOutput, Trace, Trajectory


class ParityReward(Reward):
    """+1 when the first token the model wrote has an even id, else -1: a reward a random tiny model earns about
    half the time, so most groups have signal and some have none."""

    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        rewards = [1.0 if t.token_ids[t.prompt_len] % 2 == 0 else -1.0 for t in trajectories]
        return RewardOutput(rewards=rewards, components={"correct": [float(r > 0) for r in rewards]})


class HalfSilentReward(ParityReward):
    """:class:`ParityReward` on problems ``p0``, ``p1``, ``p4``, ``p5``, ...; -1 for every trajectory of the others.

    With :class:`CountedProblems` unshuffled, batches of 4 and 2 processes, the second rank's problems are all
    of the second kind: its whole share has zero advantage at every step while the first rank's has signal.
    """

    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        parity = super().__call__(trajectories, problems).rewards
        rewards = [r if int(p.id[1:]) % 4 < 2 else -1.0 for r, p in zip(parity, problems)]
        return RewardOutput(rewards=rewards, components={"correct": [float(r > 0) for r in rewards]})


class CountedProblems(ProblemDataModule):
    """Problems ``p0`` ... ``p15`` (train) and ``v0`` ... ``v3`` (val), each asking for its number doubled."""

    def load_problems(self, split: str) -> list[Problem]:
        prefix, count = ("p", 16) if split == "train" else ("v", 4)
        return [Problem(id=f"{prefix}{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(count)]

    def load_traces(self, split: str) -> list[Trace]:
        return [
            Trace(problem=p, response=f"{p.prompt[8:-1]} is {p.answer}: \\boxed{{{p.answer}}}")
            for p in self.problems(split)
        ]


class SkewedProblems(CountedProblems):
    """:class:`CountedProblems` whose problems ``p2``, ``p3``, ``p6``, ``p7``, ... have prompts several times longer:
    unshuffled, in batches of 4 on 2 processes, the second rank's share of every step is the long one."""

    def load_problems(self, split: str) -> list[Problem]:
        padding = "Take care, and think it over before you answer. " * 12
        return [
            Problem(id=p.id, prompt=padding + p.prompt, answer=p.answer) if int(p.id[1:]) % 4 >= 2 else p
            for p in super().load_problems(split)
        ]
