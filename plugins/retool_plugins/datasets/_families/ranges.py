"""The range families: counting and summing the integers of a range that meet divisibility or digit conditions."""

from __future__ import annotations

import math
import random
from itertools import combinations
from typing import Any

from retool_plugins.datasets._families.common import Family, Solution
from retool_plugins.datasets._generated import Question

_RANGE_END = {1: 200, 2: 20_000, 3: 500_000}  # the largest range end of the range families, by level


def _range(rng: random.Random, level: int) -> tuple[int, int]:
    hi = rng.randint(_RANGE_END[level] // 5, _RANGE_END[level])
    return rng.randint(1, hi // 2), hi


def _spread(rng: random.Random, count: int, top: int) -> list[int]:
    """``count`` distinct numbers in [2, top], none dividing another, so that no condition is redundant."""
    chosen: list[int] = []
    while len(chosen) < count:
        n = rng.randint(2, top)
        if all(n % c and c % n for c in chosen):
            chosen.append(n)
    return chosen


def _terms(included: list[int], excluded: list[int]) -> list[tuple[int, tuple[int, ...]]]:
    """Inclusion-exclusion for "divisible by one of ``included`` and by none of ``excluded``": the signed sets
    of divisors whose common multiples are counted (or summed)."""
    terms = []
    for i in range(1, len(included) + 1):
        for inc in combinations(included, i):
            for j in range(len(excluded) + 1):
                for exc in combinations(excluded, j):
                    terms.append((-1 if (i + j) % 2 == 0 else 1, (*inc, *exc)))
    return terms


def _label(numbers: tuple[int, ...]) -> str:
    step = math.lcm(*numbers)
    return str(step) if len(numbers) == 1 else f"lcm({', '.join(map(str, numbers))}) = {step}"


def _signed(values: list[tuple[int, int]]) -> str:
    text = str(values[0][1])
    for sign, value in values[1:]:
        text += f" {'+' if sign > 0 else '-'} {value}"
    return text


def _condition(included: list[int], excluded: list[int]) -> str:
    text = f"divisible by {' or '.join(map(str, included))}"
    if len(excluded) == 1:
        text += f" but not by {excluded[0]}"
    elif excluded:
        text += f" but by neither {excluded[0]} nor {excluded[1]}"
    return text


def _code_condition(included: list[int], excluded: list[int]) -> str:
    any_of = " or ".join(f"n % {k} == 0" for k in included)
    if excluded and len(included) > 1:
        any_of = f"({any_of})"
    return " and ".join([any_of, *(f"n % {m} != 0" for m in excluded)])


# --- range_count ------------------------------------------------------------------------------------------


def _without_digit(n: int, digit: int) -> int:
    """How many integers in [0, n] do not contain ``digit`` (1-9) in their decimal digits."""
    if n < 0:
        return 0
    count, text = 0, str(n)
    for i, c in enumerate(text):
        count += sum(1 for d in range(int(c)) if d != digit) * 9 ** (len(text) - i - 1)
        if int(c) == digit:
            return count
    return count + 1


def _range_count(rng: random.Random, level: int) -> Question:
    lo, hi = _range(rng, level)
    if rng.random() < 0.5:
        digit = rng.randint(1, 9)
        answer = hi - lo + 1 - (_without_digit(hi, digit) - _without_digit(lo - 1, digit))
        prompt = f"How many integers from {lo} to {hi} (inclusive) contain the digit {digit}?"
        return Question(prompt, answer, {"kind": "digit", "lo": lo, "hi": hi, "digit": digit})
    divisor, *excluded = _spread(rng, level, {1: 12, 2: 30, 3: 40}[level])
    steps = [(sign, math.lcm(*numbers)) for sign, numbers in _terms([divisor], excluded)]
    answer = sum(sign * (hi // step - (lo - 1) // step) for sign, step in steps)
    prompt = f"How many integers from {lo} to {hi} are {_condition([divisor], excluded)}?"
    return Question(
        prompt, answer, {"kind": "divisible", "lo": lo, "hi": hi, "included": [divisor], "excluded": excluded}
    )


def _range_count_solution(meta: dict[str, Any], answer: int) -> Solution:
    lo, hi = meta["lo"], meta["hi"]
    if meta["kind"] == "digit":
        digit, total = meta["digit"], hi - lo + 1
        test = f'"{digit}" in str(n)'
        text = (
            f"Of the {total} integers from {lo} to {hi}, {total - answer} have no digit {digit}, "
            f"so {total} - {total - answer} = {answer} contain it."
        )
    else:
        test = _code_condition(meta["included"], meta["excluded"])
        lines, values = [], []
        for sign, numbers in _terms(meta["included"], meta["excluded"]):
            step = math.lcm(*numbers)
            count = hi // step - (lo - 1) // step
            lines.append(
                f"Multiples of {_label(numbers)} from {lo} to {hi}: {hi} // {step} - {lo - 1} // {step} = {count}."
            )
            values.append((sign, count))
        if len(values) > 1:
            lines.append(f"By inclusion-exclusion: {_signed(values)} = {answer}.")
        text = "\n".join(lines)
    code = f"count = sum(1 for n in range({lo}, {hi} + 1) if {test})\nprint(count)"
    reasons = (
        "Checking every integer of the range by hand is slow and error-prone, so I will count them with a loop.",
        "I will loop over the range in Python and count the integers that meet the condition.",
    )
    return Solution(reasons, code, text)


# --- range_sum --------------------------------------------------------------------------------------------


def _sum_of_multiples(lo: int, hi: int, step: int) -> tuple[int, int, int, int]:
    """(terms, first, last, sum) of the multiples of ``step`` in [lo, hi]."""
    first, last = step * ((lo - 1) // step + 1), step * (hi // step)
    terms = max(0, (last - first) // step + 1)
    return terms, first, last, terms * (first + last) // 2


def _odd_square_sum(root: int) -> int:
    """The sum of the squares of the odd numbers 1, 3, ..., up to ``root``."""
    m = (root + 1) // 2
    return m * (2 * m - 1) * (2 * m + 1) // 3


def _range_sum(rng: random.Random, level: int) -> Question:
    lo, hi = _range(rng, level)
    if rng.random() < 0.5:
        answer = _odd_square_sum(math.isqrt(hi)) - _odd_square_sum(math.isqrt(lo - 1))
        prompt = f"What is the sum of all odd perfect squares from {lo} to {hi}?"
        return Question(prompt, answer, {"kind": "odd_squares", "lo": lo, "hi": hi})
    numbers = _spread(rng, level, {1: 12, 2: 15, 3: 15}[level])
    included, excluded = (numbers[:2], numbers[2:]) if level > 1 else (numbers, [])
    answer = sum(sign * _sum_of_multiples(lo, hi, math.lcm(*nums))[3] for sign, nums in _terms(included, excluded))
    if level == 1:
        prompt = f"What is the sum of all multiples of {included[0]} from {lo} to {hi}?"
    else:
        prompt = f"What is the sum of all integers from {lo} to {hi} that are {_condition(included, excluded)}?"
    return Question(
        prompt, answer, {"kind": "divisible", "lo": lo, "hi": hi, "included": included, "excluded": excluded}
    )


def _range_sum_solution(meta: dict[str, Any], answer: int) -> Solution:
    lo, hi = meta["lo"], meta["hi"]
    if meta["kind"] == "odd_squares":
        code = (
            f"import math\n\ntotal = sum(n for n in range({lo}, {hi} + 1) if n % 2 == 1 and math.isqrt(n) ** 2 == n)"
            "\nprint(total)"
        )
        top, below = math.isqrt(hi), math.isqrt(lo - 1)
        text = (
            f"The odd perfect squares from {lo} to {hi} are the squares of the odd numbers from {below + 1} to {top}. "
            "The squares of 1, 3, ..., 2m - 1 add up to m(2m - 1)(2m + 1)/3.\n"
            + "".join(
                f"Odd numbers up to {r}: m = {m}, and {m} * {2 * m - 1} * {2 * m + 1} / 3 = {_odd_square_sum(r)}.\n"
                for r, m in ((top, (top + 1) // 2), (below, (below + 1) // 2))
            )
            + f"So the sum is {_odd_square_sum(top)} - {_odd_square_sum(below)} = {answer}."
        )
    else:
        code = f"total = sum(n for n in range({lo}, {hi} + 1) if {_code_condition(meta['included'], meta['excluded'])})"
        code += "\nprint(total)"
        lines, values = [], []
        for sign, numbers in _terms(meta["included"], meta["excluded"]):
            terms, first, last, total = _sum_of_multiples(lo, hi, math.lcm(*numbers))
            lines.append(
                f"Multiples of {_label(numbers)}: {terms} terms, sum {terms} * ({first} + {last}) / 2 = {total}."
            )
            values.append((sign, total))
        if len(values) > 1:
            lines.append(f"By inclusion-exclusion: {_signed(values)} = {answer}.")
        text = "\n".join(lines)
    reasons = (
        "I will add up the qualifying integers with a loop over the range.",
        "Summing these by hand invites mistakes; a short loop in Python gives the exact sum.",
    )
    return Solution(reasons, code, text)


FAMILIES = {
    "range_count": Family(_range_count, _range_count_solution),
    "range_sum": Family(_range_sum, _range_sum_solution),
}
