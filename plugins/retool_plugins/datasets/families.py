"""Generated math problems in eight families, with reference solutions to fine-tune on before RL.

Each family draws questions with exact integer answers at a difficulty level from 1 to 3: higher levels have
bigger numbers or more conditions, where running code helps most. Every problem also has a worked solution,
written as a :class:`~retool.Trace`: one code cell with its interpreter output in the ReTool format, or a
short text derivation.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

from retool.data import ProblemDataModule
from retool.rollout.format import ReToolFormat
from retool.types import ExecutionResult, Problem, Trace
from retool_plugins.datasets.arithmetic import draw_distinct, take_turns

# One question: (prompt, exact integer answer, extra metadata: its kind and the numbers it was drawn from).
_Question = tuple[str, int, dict[str, Any]]

_FORMAT = ReToolFormat()
_RANGE_END = {1: 200, 2: 20_000, 3: 500_000}  # the largest range end of the range families, by level


@dataclass(frozen=True)
class _Solution:
    """A worked solution: reasoning sentences to pick from, a complete script that prints exactly the answer,
    and a step-by-step text derivation (without the boxed answer)."""

    reasons: tuple[str, ...]
    code: str
    text: str


def _join(items: list[Any]) -> str:
    words = [str(item) for item in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _p(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


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


def _range_count(rng: random.Random, level: int) -> _Question:
    lo, hi = _range(rng, level)
    if rng.random() < 0.5:
        digit = rng.randint(1, 9)
        answer = hi - lo + 1 - (_without_digit(hi, digit) - _without_digit(lo - 1, digit))
        prompt = f"How many integers from {lo} to {hi} (inclusive) contain the digit {digit}?"
        return prompt, answer, {"kind": "digit", "lo": lo, "hi": hi, "digit": digit}
    divisor, *excluded = _spread(rng, level, {1: 12, 2: 30, 3: 40}[level])
    steps = [(sign, math.lcm(*numbers)) for sign, numbers in _terms([divisor], excluded)]
    answer = sum(sign * (hi // step - (lo - 1) // step) for sign, step in steps)
    prompt = f"How many integers from {lo} to {hi} are {_condition([divisor], excluded)}?"
    return prompt, answer, {"kind": "divisible", "lo": lo, "hi": hi, "included": [divisor], "excluded": excluded}


def _range_count_solution(meta: dict[str, Any], answer: int) -> _Solution:
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
    return _Solution(reasons, code, text)


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


def _range_sum(rng: random.Random, level: int) -> _Question:
    lo, hi = _range(rng, level)
    if rng.random() < 0.5:
        answer = _odd_square_sum(math.isqrt(hi)) - _odd_square_sum(math.isqrt(lo - 1))
        prompt = f"What is the sum of all odd perfect squares from {lo} to {hi}?"
        return prompt, answer, {"kind": "odd_squares", "lo": lo, "hi": hi}
    numbers = _spread(rng, level, {1: 12, 2: 15, 3: 15}[level])
    included, excluded = (numbers[:2], numbers[2:]) if level > 1 else (numbers, [])
    answer = sum(sign * _sum_of_multiples(lo, hi, math.lcm(*nums))[3] for sign, nums in _terms(included, excluded))
    if level == 1:
        prompt = f"What is the sum of all multiples of {included[0]} from {lo} to {hi}?"
    else:
        prompt = f"What is the sum of all integers from {lo} to {hi} that are {_condition(included, excluded)}?"
    return prompt, answer, {"kind": "divisible", "lo": lo, "hi": hi, "included": included, "excluded": excluded}


def _range_sum_solution(meta: dict[str, Any], answer: int) -> _Solution:
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
    return _Solution(reasons, code, text)


# --- modpow -----------------------------------------------------------------------------------------------

_MODPOW = {
    1: ((2, 20), (5, 30), (7, 100)),
    2: ((10, 999), (100, 9_999), (100, 9_999)),
    3: ((1_000, 10**6), (10**6, 10**12), (10**5, 10**9)),
}


def _modpow(rng: random.Random, level: int) -> _Question:
    base, exponent, modulus = (rng.randint(*bounds) for bounds in _MODPOW[level])
    if rng.random() < 0.5:
        prompt = f"What is {base}^{exponent} mod {modulus}?"
    else:
        prompt = f"What is the remainder when {base}^{exponent} is divided by {modulus}?"
    return prompt, pow(base, exponent, modulus), {"kind": "modpow", "a": base, "e": exponent, "m": modulus}


def _modpow_solution(meta: dict[str, Any], answer: int) -> _Solution:
    a, e, m = meta["a"], meta["e"], meta["m"]
    reasons = (
        "Python's three-argument pow computes modular powers exactly and fast.",
        "The power is far too large to write out, but pow(base, exponent, modulus) reduces it at every step.",
    )
    text = f"Squaring and multiplying, and reducing modulo {m} after every step: {a}^{e} mod {m} = {answer}."
    return _Solution(reasons, f"print(pow({a}, {e}, {m}))", text)


# --- gcd_lcm ----------------------------------------------------------------------------------------------


def _gcd_lcm(rng: random.Random, level: int) -> _Question:
    count = {1: 2, 2: rng.choice((2, 3)), 3: 3}[level]
    common_top, multiplier_top = {1: (12, 10), 2: (60, 60), 3: (300, 1000)}[level]
    common, numbers = rng.randint(2, common_top), []
    while len(numbers) < count:
        n = common * rng.randint(2, multiplier_top)
        if n not in numbers:
            numbers.append(n)
    kind = rng.choice(("gcd", "lcm"))
    name = "greatest common divisor" if kind == "gcd" else "least common multiple"
    answer = math.gcd(*numbers) if kind == "gcd" else math.lcm(*numbers)
    return f"What is the {name} of {_join(numbers)}?", answer, {"kind": kind, "numbers": numbers}


def _euclid(a: int, b: int) -> tuple[str, int]:
    steps = [f"gcd({a}, {b})"]
    while b:
        a, b = b, a % b
        steps.append(f"gcd({a}, {b})")
    if len(steps) > 6:  # a long chain is no short derivation: keep its ends
        steps = [*steps[:2], "...", steps[-1]]
    return " = ".join(steps) + f" = {a}", a


def _gcd_lcm_solution(meta: dict[str, Any], answer: int) -> _Solution:
    kind, numbers = meta["kind"], meta["numbers"]
    lines, acc = [], numbers[0]
    for n in numbers[1:]:
        chain, g = _euclid(acc, n)
        lines.append(f"By Euclid's algorithm, {chain}.")
        if kind == "lcm":
            lines.append(f"So lcm({acc}, {n}) = {acc} * {n} / {g} = {acc * n // g}.")
            acc = acc * n // g
        else:
            acc = g
    reasons = (
        f"Python's math.{kind} gives the exact result for any number of arguments.",
        f"I will let math.{kind} do the work instead of factoring by hand.",
    )
    return _Solution(reasons, f"import math\n\nprint(math.{kind}({', '.join(map(str, numbers))}))", "\n".join(lines))


# --- digit_sum --------------------------------------------------------------------------------------------


def _digit_sum(rng: random.Random, level: int) -> _Question:
    if rng.random() < 0.5:
        (base_lo, base_hi), (exp_lo, exp_hi) = {
            1: ((2, 50), (2, 6)),
            2: ((11, 99), (5, 20)),
            3: ((100, 999), (20, 100)),
        }[level]
        n, k = rng.randint(base_lo, base_hi), rng.randint(exp_lo, exp_hi)
        prompt, value, extra = f"What is the sum of the digits of {n}^{k}?", n**k, {"kind": "power", "n": n, "k": k}
    else:
        n = rng.randint(*{1: (5, 15), 2: (16, 40), 3: (41, 200)}[level])
        prompt = f"What is the sum of the digits of {n}! (the factorial of {n})?"
        value, extra = math.factorial(n), {"kind": "factorial", "n": n}
    return prompt, sum(map(int, str(value))), extra


def _digit_sum_solution(meta: dict[str, Any], answer: int) -> _Solution:
    n = meta["n"]
    if meta["kind"] == "power":
        expr, value, python = f"{n}^{meta['k']}", n ** meta["k"], f"{n} ** {meta['k']}"
        code = f"print(sum(int(c) for c in str({python})))"
    else:
        expr, value = f"{n}!", math.factorial(n)
        code = f"import math\n\nprint(sum(int(c) for c in str(math.factorial({n}))))"
    digits = str(value)
    if len(digits) <= 24:
        text = f"{expr} = {value}.\nIts digits add up to {' + '.join(digits)} = {answer}."
    else:
        text = f"{expr} has {len(digits)} digits.\nAdded up, they give {answer}."
    reasons = (
        "Python's integers are exact at any size, so I will compute the number and add up its digits.",
        "The number is too long to expand by hand; I will build it in Python and sum its digits.",
    )
    return _Solution(reasons, code, text)


# --- divisors ---------------------------------------------------------------------------------------------

_SMALL_PRIMES = [p for p in range(2, 100) if all(p % d for d in range(2, math.isqrt(p) + 1))]


def _divisors(rng: random.Random, level: int) -> _Question:
    top_prime, (min_steps, max_steps), (lo, hi) = {
        1: (13, (2, 5), (12, 200)),
        2: (47, (3, 7), (1_000, 20_000)),
        3: (97, (5, 10), (10**5, 10**8)),
    }[level]
    primes = [p for p in _SMALL_PRIMES if p <= top_prime]
    n, factors = 1, {}
    while n < lo:
        n, factors = 1, {}
        for _ in range(rng.randint(min_steps, max_steps)):
            p = rng.choice(primes)
            if n * p > hi:
                break
            n, factors[p] = n * p, factors.get(p, 0) + 1
    pairs = sorted(factors.items())
    if rng.random() < 0.5:
        answer, kind, prompt = math.prod(e + 1 for _, e in pairs), "count", f"How many positive divisors does {n} have?"
    else:
        answer, kind = math.prod((p ** (e + 1) - 1) // (p - 1) for p, e in pairs), "sum"
        prompt = f"What is the sum of all positive divisors of {n}?"
    return prompt, answer, {"kind": kind, "n": n, "factors": [list(pair) for pair in pairs]}


def _divisors_solution(meta: dict[str, Any], answer: int) -> _Solution:
    n, kind, factors = meta["n"], meta["kind"], meta["factors"]
    factored = " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in factors)
    if kind == "count":
        text = (
            f"{n} = {factored}, so it has {' * '.join(f'({e} + 1)' for _, e in factors)} = {answer} positive divisors."
        )
    else:
        sums = " * ".join(str((p ** (e + 1) - 1) // (p - 1)) for p, e in factors)
        text = (
            f"{n} = {factored}.\nThe divisors of p^e add up to (p^(e+1) - 1) / (p - 1), so the sum of the divisors "
            f"of {n} is {sums} = {answer}."
        )
    if meta["level"] == 3:
        name = "divisor_count" if kind == "count" else "divisor_sigma"
        code = f"from sympy import {name}\n\nprint({name}({n}))"
        reasons = ("sympy factors the number and computes its divisor function directly.",)
    else:
        term = "1" if kind == "count" else "d"
        code = f"n = {n}\nprint(sum({term} for d in range(1, n + 1) if n % d == 0))"
        reasons = ("I will test every candidate divisor with a loop.", "A short loop over 1..n finds every divisor.")
    return _Solution(reasons, code, text)


# --- combinatorics ----------------------------------------------------------------------------------------


def _combinatorics(rng: random.Random, level: int) -> _Question:
    kind = rng.choice(("choose", "arrange", "committee"))
    if kind == "committee":
        group, most = {1: ((3, 8), 3), 2: ((6, 15), 5), 3: ((12, 30), 8)}[level]
        m, w = rng.randint(*group), rng.randint(*group)
        a, b = rng.randint(1, min(m - 1, most)), rng.randint(1, min(w - 1, most))
        prompt = (
            f"A club has {m} men and {w} women. In how many ways can a committee of {a} {'man' if a == 1 else 'men'} "
            f"and {b} {'woman' if b == 1 else 'women'} be chosen?"
        )
        return prompt, math.comb(m, a) * math.comb(w, b), {"kind": kind, "m": m, "w": w, "a": a, "b": b}
    n = rng.randint(*{1: (5, 12), 2: (12, 30), 3: (30, 60)}[level])
    k = rng.randint(2, min(n - 1, {1: 5, 2: 8, 3: 10}[level]))
    if kind == "choose":
        prompt = rng.choice(
            (
                f"In how many ways can {k} of {n} people be chosen?",
                f"How many ways are there to choose {k} books from {n} different books?",
            )
        )
        return prompt, math.comb(n, k), {"kind": kind, "n": n, "k": k}
    prompt = rng.choice(
        (
            f"In how many ways can {k} of {n} different books be arranged in a row?",
            f"In how many ways can {n} runners take the first {k} places of a race?",
        )
    )
    return prompt, math.perm(n, k), {"kind": kind, "n": n, "k": k}


def _combinatorics_solution(meta: dict[str, Any], answer: int) -> _Solution:
    kind = meta["kind"]
    if kind == "committee":
        m, w, a, b = meta["m"], meta["w"], meta["a"], meta["b"]
        x, y = math.comb(m, a), math.comb(w, b)
        code = f"import math\n\nprint(math.comb({m}, {a}) * math.comb({w}, {b}))"
        text = f"There are C({m}, {a}) = {x} ways to pick the men and C({w}, {b}) = {y} ways to pick the women.\n"
        text += f"Together: {x} * {y} = {answer}."
        reasons = ("The two groups are chosen independently, so I will multiply two binomial coefficients.",)
        return _Solution(reasons, code, text)
    n, k = meta["n"], meta["k"]
    product = " * ".join(str(n - i) for i in range(k))
    if kind == "choose":
        code = f"import math\n\nprint(math.comb({n}, {k}))"
        text = (
            f"The order does not matter, so the count is C({n}, {k}) = ({product}) / {k}! "
            f"= {math.perm(n, k)} / {math.factorial(k)} = {answer}."
        )
        reasons = ("Order does not matter here, so the answer is a binomial coefficient; math.comb gives it exactly.",)
    else:
        code = f"import math\n\nprint(math.perm({n}, {k}))"
        text = f"The order matters: {n} choices for the first place, {n - 1} for the next, and so on.\n"
        text += f"{product} = {answer}."
        reasons = ("Order matters here, so I need the number of k-permutations, which math.perm computes.",)
    return _Solution(reasons, code, text)


# --- linear_system ----------------------------------------------------------------------------------------


def _det(rows: list[list[int]]) -> int:
    if len(rows) == 2:
        return rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0]
    return sum((-1) ** j * rows[0][j] * _det([row[:j] + row[j + 1 :] for row in rows[1:]]) for j in range(3))


def _expression(row: list[int], names: str, times: str = "") -> str:
    text = ""
    for c, name in zip(row, names):
        if c:
            term = f"{abs(c)}{times}{name}" if abs(c) != 1 else name
            text = f"{text} {'-' if c < 0 else '+'} {term}" if text else f"{'-' if c < 0 else ''}{term}"
    return text


def _linear_system(rng: random.Random, level: int) -> _Question:
    names = "xyz" if level == 3 else "xy"
    coeff, top = {1: (5, 9), 2: (15, 40), 3: (9, 20)}[level]
    while True:
        rows = [[rng.randint(-coeff, coeff) for _ in names] for _ in names]
        if _det(rows) and (level == 3 or all(all(row) for row in rows)):
            break
    solution = [rng.randint(-top, top) for _ in names]
    rhs = [sum(c * v for c, v in zip(row, solution)) for row in rows]
    asked = rng.choice([*names, " + ".join(names)])
    answer = sum(solution) if "+" in asked else solution[names.index(asked)]
    equations = _join([f"{_expression(row, names)} = {r}" for row, r in zip(rows, rhs)])
    prompt = rng.choice((f"Given that {equations}, what is the value of {asked}?", f"If {equations}, what is {asked}?"))
    return prompt, answer, {"kind": "sum" if "+" in asked else asked, "rows": rows, "rhs": rhs, "solution": solution}


def _linear_system_solution(meta: dict[str, Any], answer: int) -> _Solution:
    rows, rhs, solution, kind = meta["rows"], meta["rhs"], meta["solution"], meta["kind"]
    names = "xyz"[: len(rows)]
    equations = ", ".join(f"Eq({_expression(row, names, '*')}, {r})" for row, r in zip(rows, rhs))
    printed = "sum(solution.values())" if kind == "sum" else f"solution[{kind}]"
    code = (
        f'from sympy import Eq, solve, symbols\n\n{", ".join(names)} = symbols("{" ".join(names)}")\n'
        f"solution = solve([{equations}], [{', '.join(names)}])\nprint({printed})"
    )
    if len(rows) == 2:
        (a, b), (c, d), (e, f) = rows[0], rows[1], rhs
        det = _det(rows)
        text = (
            f"The determinant is {_p(a)} * {_p(d)} - {_p(b)} * {_p(c)} = {det}.\nBy Cramer's rule, "
            f"x = ({_p(e)} * {_p(d)} - {_p(b)} * {_p(f)}) / {_p(det)} = {solution[0]} and "
            f"y = ({_p(a)} * {_p(f)} - {_p(e)} * {_p(c)}) / {_p(det)} = {solution[1]}."
        )
    else:
        values = ", ".join(f"{v} = {s}" for v, s in zip(names, solution))
        text = f"Eliminating one unknown at a time gives {values}."
    if kind == "sum":
        text += f"\nSo {' + '.join(names)} = {' + '.join(_p(s) for s in solution)} = {answer}."
    reasons = (
        "I will solve the system exactly with sympy.",
        "Elimination by hand is error-prone, so I will let sympy solve the equations.",
    )
    return _Solution(reasons, code, text)


FAMILIES: dict[str, Callable[[random.Random, int], _Question]] = {
    "range_count": _range_count,
    "range_sum": _range_sum,
    "modpow": _modpow,
    "gcd_lcm": _gcd_lcm,
    "digit_sum": _digit_sum,
    "divisors": _divisors,
    "combinatorics": _combinatorics,
    "linear_system": _linear_system,
}
"""The problem families by name; each draws one question at a level from 1 (easiest) to 3."""

_SOLUTIONS: dict[str, Callable[[dict[str, Any], int], _Solution]] = {
    "range_count": _range_count_solution,
    "range_sum": _range_sum_solution,
    "modpow": _modpow_solution,
    "gcd_lcm": _gcd_lcm_solution,
    "digit_sum": _digit_sum_solution,
    "divisors": _divisors_solution,
    "combinatorics": _combinatorics_solution,
    "linear_system": _linear_system_solution,
}


def _check_families(names: list[str], argument: str) -> None:
    for name in names:
        if name not in FAMILIES:
            close = difflib.get_close_matches(name, FAMILIES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown MathFamilies {argument} entry {name!r}; {hint}available: {sorted(FAMILIES)}")


class MathFamilies(ProblemDataModule):
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
        batch_size: Problems (or traces, for SFT) per step.
        seed: Seed of the generated problems and of the shuffling order.
        shuffle: Shuffle the training items each epoch.
        num_train: Number of training problems.
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
    """

    def __init__(
        self,
        batch_size: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        num_train: int = 256,
        num_val: int = 64,
        families: list[str] | None = None,
        min_level: int = 1,
        max_level: int = 3,
        trace_families: list[str] | None = None,
        trace_max_level: int | None = None,
        trace_style: Literal["code", "text"] = "code",
        num_traces: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, shuffle=shuffle)
        self.families = list(FAMILIES) if families is None else list(families)
        if not self.families:
            raise ValueError(f"MathFamilies families is empty; name some of {sorted(FAMILIES)}, or None for all")
        _check_families(self.families, "families")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"MathFamilies families lists a family twice: {self.families}; name each once")
        if not 1 <= min_level <= max_level <= 3:
            raise ValueError(f"need 1 <= min_level <= max_level <= 3, got min_level={min_level}, max_level={max_level}")
        if num_train < 0 or num_val < 0:
            raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
        self.trace_families = list(self.families) if trace_families is None else list(trace_families)
        _check_families(self.trace_families, "trace_families")
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
        self.num_train = num_train
        self.num_val = num_val
        self.min_level = min_level
        self.max_level = max_level
        self.trace_max_level = trace_max_level
        self.trace_style = trace_style
        self.num_traces = num_traces

    def load_problems(self, split: str) -> list[Problem]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        problems = self._generate()
        return problems[: self.num_train] if split == "train" else problems[self.num_train :]

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
        solution = _SOLUTIONS[family](problem.metadata, int(problem.answer))
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

    def _generate(self) -> list[Problem]:
        """All ``num_train + num_val`` problems: families take turns, each drawing from its own seeded stream."""
        return take_turns(self.families, self.num_train + self.num_val, self._family)

    def _family(self, family: str, count: int) -> list[Problem]:
        # A string seed: the stream of one family depends on nothing but the seed and the level range.
        rng = random.Random(f"retool-families:{self.seed}:{family}:{self.min_level}-{self.max_level}")

        def draw() -> tuple[str, int, dict[str, object]]:
            level = rng.randint(self.min_level, self.max_level)
            prompt, answer, extra = FAMILIES[family](rng, level)
            return prompt, answer, {"family": family, "level": level, **extra}

        too_few = (  # level 1 alone has a few hundred distinct questions per family
            f"could not draw {count} distinct {family!r} problems at levels {self.min_level}-"
            f"{self.max_level}; raise max_level or lower num_train/num_val"
        )
        return draw_distinct(family, count, draw, too_few)
