"""What the generated datasets (``ArithmeticProblems``, ``MathFamilies``) share: a question record, families that
take turns, distinct draws per family, and the train/val split of one seeded stream.

A family's problems depend only on the seed, the family's name and the difficulty range, never on which other
families are drawn; so adding a family to a recipe never changes the problems of another.
"""

from __future__ import annotations

import difflib
import random
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from retool.data import ProblemDataModule
from retool.types import Problem


@dataclass(frozen=True)
class Question:
    """One generated question.

    Args:
        prompt: The question text.
        answer: Its exact integer answer.
        metadata: Its kind and the numbers it was drawn from (what a reference solution needs).
    """

    prompt: str
    answer: int
    metadata: dict[str, Any] = field(default_factory=dict)


def take_turns(families: Sequence[str], total: int, draw: Callable[[str, int], list[Problem]]) -> list[Problem]:
    """``total`` problems, the families taking turns; ``draw(family, count)`` gives one family's stream."""
    counts = {f: len(range(i, total, len(families))) for i, f in enumerate(families)}
    streams = {f: iter(draw(f, counts[f])) for f in families}
    return [next(streams[families[i % len(families)]]) for i in range(total)]


def draw_distinct(family: str, count: int, draw: Callable[[], Question], too_few: str) -> list[Problem]:
    """``count`` problems with distinct prompts from ``draw()``, with ids ``family-i``.

    A repeated prompt is drawn again (it could land in both train and val); ``too_few`` is the error raised
    when the draws keep repeating (the knobs allow too few distinct questions).
    """
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(too_few)
        question = draw()
        if question.prompt in seen:
            continue
        seen.add(question.prompt)
        problem_id = f"{family}-{len(problems)}"
        problems.append(Problem(problem_id, question.prompt, str(question.answer), question.metadata))
    return problems


def check_names(names: Sequence[str], known: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming the nearest known family for each of ``names`` that is not in ``known``."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown {what} entry {name!r}; {hint}available: {sorted(known)}")
    if not names:
        raise ValueError(f"{what} is empty; name some of {sorted(known)}, or None for all")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} lists a family twice: {list(names)}; name each once")


class GeneratedProblems(ProblemDataModule):
    """Base of the seeded generators: ``num_train + num_val`` problems, families taking turns, split in order.

    A subclass sets ``families``, ``low`` and ``high`` (its difficulty range) and implements :meth:`question`.

    Args:
        num_train: Number of training problems.
        num_val: Number of validation problems (0 for none).
        **kwargs: The options of every dataset (``batch_size``, ``seed``, ``shuffle``).
    """

    stream_name = "generated"
    """Part of every family's seed string: two generators with the same seed draw different streams."""
    level_name = "level"
    """The metadata key of a problem's difficulty (``digits`` for arithmetic, ``level`` for the families)."""

    def __init__(self, num_train: int = 256, num_val: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_train < 0 or num_val < 0:
            raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
        self.num_train = num_train
        self.num_val = num_val
        self.families: list[str] = []
        self.low = self.high = 1

    @abstractmethod
    def question(self, family: str, rng: random.Random, level: int) -> Question:
        """Draw one question of ``family`` at difficulty ``level`` from ``rng``."""

    def too_few(self, family: str, count: int) -> str:
        """The error when ``family`` cannot give ``count`` distinct questions in the difficulty range."""
        return f"could not draw {count} distinct {family!r} problems; lower num_train/num_val"

    def load_problems(self, split: str) -> list[Problem]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        problems = take_turns(self.families, self.num_train + self.num_val, self._family)
        return problems[: self.num_train] if split == "train" else problems[self.num_train :]

    def _family(self, family: str, count: int) -> list[Problem]:
        # A string seed: the stream of one family depends on nothing but the seed and the difficulty range.
        rng = random.Random(f"retool-{self.stream_name}:{self.seed}:{family}:{self.low}-{self.high}")

        def draw() -> Question:
            level = rng.randint(self.low, self.high)
            question = self.question(family, rng, level)
            metadata = {"family": family, self.level_name: level, **question.metadata}
            return Question(question.prompt, question.answer, metadata)

        return draw_distinct(family, count, draw, self.too_few(family, count))
