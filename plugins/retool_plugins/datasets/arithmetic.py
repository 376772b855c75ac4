"""Generated arithmetic problems that a small model gets wrong in its head and right with a few lines of code."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from retool_plugins.datasets._generated import GeneratedProblems, Question, check_names


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _product(rng: random.Random, digits: int) -> Question:
    a, b = _number(rng, digits), _number(rng, digits)
    return Question(f"What is {a} * {b}?", a * b, {"kind": "product"})


def _modular(rng: random.Random, digits: int) -> Question:
    modulus = _number(rng, max(2, digits - 1))
    if rng.random() < 0.5:
        base, exponent = rng.randint(2, 99), _number(rng, digits)
        return Question(f"What is {base}^{exponent} mod {modulus}?", pow(base, exponent, modulus), {"kind": "power"})
    n = _number(rng, 3 * digits)
    return Question(f"What is {n} mod {modulus}?", n % modulus, {"kind": "remainder"})


def _series(rng: random.Random, digits: int) -> Question:
    kind = rng.choice(["squares", "cubes", "progression"])
    n = _number(rng, digits)
    if kind == "progression":
        first, step = rng.randint(1, 999), rng.randint(2, 99)
        terms = f"{first}, {first + step}, {first + 2 * step}, ..."
        answer = n * first + step * n * (n - 1) // 2
        prompt = f"What is the sum of the first {n} terms of the arithmetic progression {terms}?"
        return Question(prompt, answer, {"kind": kind})
    if kind == "squares":
        prompt = f"What is the sum of the squares of the integers from 1 to {n}?"
        return Question(prompt, n * (n + 1) * (2 * n + 1) // 6, {"kind": kind})
    prompt = f"What is the sum of the cubes of the integers from 1 to {n}?"
    return Question(prompt, (n * (n + 1) // 2) ** 2, {"kind": kind})


FAMILIES: dict[str, Callable[[random.Random, int], Question]] = {
    "product": _product,
    "modular": _modular,
    "series": _series,
}
"""The problem families by name; each draws one question with a given number of digits."""


class ArithmeticProblems(GeneratedProblems):
    """Seeded arithmetic problems where running code helps: big products, modular powers, sums of series.

    Problems cycle through ``families``; the i-th problem of a family has id ``"{family}-{i}"``. Train and
    val are drawn from one stream per family without repeats, so no prompt is in both. The same seed gives
    the same problems, and a family's problems do not change when other families are added or removed.

    Args:
        num_val: Number of validation problems (0 for none).
        families: Which families to draw from (``product``, ``modular``, ``series``); ``None`` for all.
        min_digits: Fewest digits of a question's main numbers (the factors, the exponent, the number of
            terms; a dividend has three times as many); recorded as ``metadata["digits"]``.
        max_digits: Most digits of a question's main numbers; each question draws its size in between.
        **kwargs: The options of every dataset (``batch_size``, ``seed``, ``shuffle``, ``num_train``).
    """

    stream_name = "arithmetic"
    level_name = "digits"

    def __init__(
        self,
        num_val: int = 32,
        families: list[str] | None = None,
        min_digits: int = 3,
        max_digits: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_val=num_val, **kwargs)
        self.families = list(FAMILIES) if families is None else list(families)
        check_names(self.families, list(FAMILIES), "ArithmeticProblems families")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}"
            )
        self.min_digits = self.low = min_digits
        self.max_digits = self.high = max_digits

    def question(self, family: str, rng: random.Random, level: int) -> Question:
        return FAMILIES[family](rng, level)

    def too_few(self, family: str, count: int) -> str:  # a small digit range has few distinct questions
        return (
            f"could not draw {count} distinct {family!r} problems with {self.min_digits}-{self.max_digits} "
            "digits; raise max_digits or lower num_train/num_val"
        )
