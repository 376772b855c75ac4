"""Generated arithmetic problems that a small model gets wrong in its head and right with a few lines of code."""

from __future__ import annotations

import random
from collections.abc import Callable

from retool.data import ProblemDataModule
from retool.types import Problem

# One question: (prompt, exact integer answer, extra metadata).
_Question = tuple[str, int, dict[str, object]]


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _product(rng: random.Random, digits: int) -> _Question:
    a, b = _number(rng, digits), _number(rng, digits)
    return f"What is {a} * {b}?", a * b, {"kind": "product"}


def _modular(rng: random.Random, digits: int) -> _Question:
    modulus = _number(rng, max(2, digits - 1))
    if rng.random() < 0.5:
        base, exponent = rng.randint(2, 99), _number(rng, digits)
        return f"What is {base}^{exponent} mod {modulus}?", pow(base, exponent, modulus), {"kind": "power"}
    n = _number(rng, 3 * digits)
    return f"What is {n} mod {modulus}?", n % modulus, {"kind": "remainder"}


def _series(rng: random.Random, digits: int) -> _Question:
    kind = rng.choice(["squares", "cubes", "progression"])
    n = _number(rng, digits)
    if kind == "progression":
        first, step = rng.randint(1, 999), rng.randint(2, 99)
        terms = f"{first}, {first + step}, {first + 2 * step}, ..."
        answer = n * first + step * n * (n - 1) // 2
        return f"What is the sum of the first {n} terms of the arithmetic progression {terms}?", answer, {"kind": kind}
    if kind == "squares":
        return (
            f"What is the sum of the squares of the integers from 1 to {n}?",
            n * (n + 1) * (2 * n + 1) // 6,
            {"kind": kind},
        )
    return f"What is the sum of the cubes of the integers from 1 to {n}?", (n * (n + 1) // 2) ** 2, {"kind": kind}


FAMILIES: dict[str, Callable[[random.Random, int], _Question]] = {
    "product": _product,
    "modular": _modular,
    "series": _series,
}
"""The problem families by name; each draws one question with a given number of digits."""


def take_turns(families: list[str], total: int, draw: Callable[[str, int], list[Problem]]) -> list[Problem]:
    """``total`` problems, the families taking turns; ``draw(family, count)`` gives one family's stream.

    A family's problems depend only on its own stream, so adding a family never changes another's.
    """
    counts = {f: len(range(i, total, len(families))) for i, f in enumerate(families)}
    streams = {f: iter(draw(f, counts[f])) for f in families}
    return [next(streams[families[i % len(families)]]) for i in range(total)]


def draw_distinct(
    family: str, count: int, draw: Callable[[], tuple[str, object, dict[str, object]]], too_few: str
) -> list[Problem]:
    """``count`` problems with distinct prompts from ``draw()`` -> (prompt, answer, metadata), ids ``family-i``.

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
        prompt, answer, metadata = draw()
        if prompt in seen:
            continue
        seen.add(prompt)
        problems.append(Problem(id=f"{family}-{len(problems)}", prompt=prompt, answer=str(answer), metadata=metadata))
    return problems


class ArithmeticProblems(ProblemDataModule):
    """Seeded arithmetic problems where running code helps: big products, modular powers, sums of series.

    Problems cycle through ``families``; the i-th problem of a family has id ``"{family}-{i}"``. Train and
    val are drawn from one stream per family without repeats, so no prompt is in both. The same seed gives
    the same problems, and a family's problems do not change when other families are added or removed.

    Args:
        batch_size: Problems per RL step.
        seed: Seed of the generated problems and of the shuffling order.
        shuffle: Shuffle the training problems each epoch.
        num_train: Number of training problems.
        num_val: Number of validation problems (0 for none).
        families: Which families to draw from (``product``, ``modular``, ``series``); ``None`` for all.
        min_digits: Fewest digits of a question's main numbers (the factors, the exponent, the number of
            terms; a dividend has three times as many); recorded as ``metadata["digits"]``.
        max_digits: Most digits of a question's main numbers; each question draws its size in between.
    """

    def __init__(
        self,
        batch_size: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        num_train: int = 256,
        num_val: int = 32,
        families: list[str] | None = None,
        min_digits: int = 3,
        max_digits: int = 4,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, shuffle=shuffle)
        self.families = list(FAMILIES) if families is None else list(families)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"unknown arithmetic families {unknown or self.families}; available: {sorted(FAMILIES)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}"
            )
        if num_train < 0 or num_val < 0:
            raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
        self.num_train = num_train
        self.num_val = num_val
        self.min_digits = min_digits
        self.max_digits = max_digits

    def load_problems(self, split: str) -> list[Problem]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        problems = self._generate()
        return problems[: self.num_train] if split == "train" else problems[self.num_train :]

    def _generate(self) -> list[Problem]:
        """All ``num_train + num_val`` problems: families take turns, each drawing from its own seeded stream."""
        return take_turns(self.families, self.num_train + self.num_val, self._family)

    def _family(self, family: str, count: int) -> list[Problem]:
        # A string seed: the stream of one family depends on nothing but the seed and the digit range.
        rng = random.Random(f"retool-arithmetic:{self.seed}:{family}:{self.min_digits}-{self.max_digits}")

        def draw() -> tuple[str, int, dict[str, object]]:
            digits = rng.randint(self.min_digits, self.max_digits)
            prompt, answer, extra = FAMILIES[family](rng, digits)
            return prompt, answer, {"family": family, "digits": digits, **extra}

        too_few = (  # a small digit range has few distinct questions
            f"could not draw {count} distinct {family!r} problems with {self.min_digits}-{self.max_digits} "
            "digits; raise max_digits or lower num_train/num_val"
        )
        return draw_distinct(family, count, draw, too_few)
