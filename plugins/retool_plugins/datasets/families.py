"""Generated math problems in eight families, with reference solutions to fine-tune on before RL.

Each family draws questions with exact integer answers at a difficulty level from 1 to 3: higher levels have
bigger numbers or more conditions, where running code helps most. Every problem also has a worked solution,
written as a :class:`~retool.Trace`: one code cell with its interpreter output in the ReTool format, or a
short text derivation.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from retool.rollout.format import ReToolFormat
from retool.types import ExecutionResult, Problem, Trace
from retool_plugins.datasets._families import FAMILIES
from retool_plugins.datasets._generated import GeneratedProblems, Question, check_names

_FORMAT = ReToolFormat()


class MathFamilies(GeneratedProblems):
    """Seeded math problems in eight families, with worked solutions for cold-start fine-tuning.

    The families (see ``FAMILIES``): ``range_count`` and ``range_sum`` (integers of a range that meet
    divisibility or digit conditions), ``modpow``, ``gcd_lcm``, ``digit_sum`` (of a power or a factorial),
    ``divisors`` (their number or sum), ``combinatorics`` (choices, arrangements, committees) and
    ``linear_system`` (2x2 or 3x3, integer solution). Every answer is an exact integer. A problem's level, 1 to
    3, sets its size: bigger numbers and more conditions, where code helps more. Problems cycle through
    ``families``; the i-th problem of a family has id ``"{family}-{i}"``, and ``metadata`` holds its
    ``family``, ``level``, ``kind`` and the numbers it was drawn from. Train and val are drawn from one stream
    per family without repeats, so no prompt is in both. The same seed gives the same problems, and a
    family's problems do not change when other families are added or removed, nor with the trace options.

    :meth:`load_traces` writes a reference solution for each eligible problem: with ``trace_style="code"``
    the response a ReTool rollout would hold had the model solved it with one cell (a sentence, a complete
    script that prints the answer, the interpreter's reply, the boxed answer); with ``"text"`` a short
    derivation and the boxed answer. ``trace_families`` and ``trace_max_level`` exist so that the traces of
    cold-start SFT can cover only some families or levels: RL then has room to show whether the tool use it
    learned generalizes to the rest.

    Args:
        num_val: Number of validation problems (0 for none).
        families: Which families to draw from; ``None`` for all eight.
        min_level: Lowest difficulty level (1 to 3); recorded as ``metadata["level"]``.
        max_level: Highest difficulty level; each problem draws its level uniformly in between.
        trace_families: Which families get traces; ``None`` for all of ``families``. Must be a subset of
            ``families``.
        trace_max_level: Only problems of at most this level get traces; ``None`` for no limit.
        trace_style: ``"code"`` (one interpreter cell, for the ReTool format) or ``"text"`` (reasoning only,
            for the text-only baseline).
        num_traces: At most this many training traces (the first eligible problems, so families stay
            balanced); ``None`` for all eligible. Validation traces are not limited.
        **kwargs: The options of every dataset (``batch_size``: problems, or traces for SFT, per step;
            ``seed``; ``shuffle``; ``num_train``).
    """

    stream_name = "families"
    level_name = "level"

    def __init__(
        self,
        num_val: int = 64,
        families: list[str] | None = None,
        min_level: int = 1,
        max_level: int = 3,
        trace_families: list[str] | None = None,
        trace_max_level: int | None = None,
        trace_style: Literal["code", "text"] = "code",
        num_traces: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_val=num_val, **kwargs)
        self.families = list(FAMILIES) if families is None else list(families)
        check_names(self.families, list(FAMILIES), "MathFamilies families")
        if not 1 <= min_level <= max_level <= 3:
            raise ValueError(f"need 1 <= min_level <= max_level <= 3, got min_level={min_level}, max_level={max_level}")
        self.trace_families = list(self.families) if trace_families is None else list(trace_families)
        check_names(self.trace_families, list(FAMILIES), "MathFamilies trace_families")
        outside = [f for f in self.trace_families if f not in self.families]
        if outside:
            raise ValueError(
                f"trace_families {outside} are not among families {self.families}; add them to families or "
                "drop them from trace_families"
            )
        if trace_max_level is not None and trace_max_level < min_level:
            raise ValueError(
                f"trace_max_level={trace_max_level} is below min_level={min_level}, so no problem would get a "
                "trace; raise trace_max_level, or set it to None for no limit"
            )
        if trace_style not in ("code", "text"):
            raise ValueError(f"unknown trace_style {trace_style!r}; use 'code' or 'text'")
        if num_traces is not None and num_traces < 0:
            raise ValueError(f"num_traces must be >= 0, or None for all eligible problems; got {num_traces}")
        self.min_level = self.low = min_level
        self.max_level = self.high = max_level
        self.trace_max_level = trace_max_level
        self.trace_style = trace_style
        self.num_traces = num_traces

    def question(self, family: str, rng: random.Random, level: int) -> Question:
        return FAMILIES[family].draw(rng, level)

    def too_few(self, family: str, count: int) -> str:  # level 1 alone has a few hundred distinct questions a family
        return (
            f"could not draw {count} distinct {family!r} problems at levels {self.min_level}-{self.max_level}; "
            "raise max_level or lower num_train/num_val"
        )

    def load_traces(self, split: str) -> list[Trace]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        eligible = [
            p
            for p in self.problems(split)
            if p.metadata["family"] in self.trace_families
            and (self.trace_max_level is None or p.metadata["level"] <= self.trace_max_level)
        ]
        if split == "train" and self.num_traces is not None:
            eligible = eligible[: self.num_traces]
        return [self._trace(problem, i) for i, problem in enumerate(eligible)]

    def _trace(self, problem: Problem, index: int) -> Trace:
        family, level = problem.metadata["family"], problem.metadata["level"]
        solution = FAMILIES[family].solve(problem.metadata, int(problem.answer))
        boxed = f"<answer>\\boxed{{{problem.answer}}}</answer>"
        if self.trace_style == "code":
            reason = solution.reasons[index % len(solution.reasons)]
            reply = _FORMAT.feedback(ExecutionResult(stdout=f"{problem.answer}\n"))  # every script prints the answer
            response = f"{reason}\n<code>\n```python\n{solution.code}\n```\n</code>{reply}{boxed}"
        else:
            response = f"{solution.text}\n{boxed}"
        return Trace(
            problem=problem, response=response, metadata={"family": family, "level": level, "style": self.trace_style}
        )
