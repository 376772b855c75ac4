"""The number-theory families: modular powers, gcd and lcm, digit sums, and divisor counts and sums."""

from __future__ import annotations

import math
import random
from typing import Any

from retool_plugins.datasets._families.common import Family, Solution, join_words
from retool_plugins.datasets._generated import Question

# --- modpow -----------------------------------------------------------------------------------------------

_MODPOW = {
    1: ((2, 20), (5, 30), (7, 100)),
    2: ((10, 999), (100, 9_999), (100, 9_999)),
    3: ((1_000, 10**6), (10**6, 10**12), (10**5, 10**9)),
}


def _modpow(rng: random.Random, level: int) -> Question:
    base, exponent, modulus = (rng.randint(*bounds) for bounds in _MODPOW[level])
    if rng.random() < 0.5:
        prompt = f"What is {base}^{exponent} mod {modulus}?"
    else:
        prompt = f"What is the remainder when {base}^{exponent} is divided by {modulus}?"
    return Question(prompt, pow(base, exponent, modulus), {"kind": "modpow", "a": base, "e": exponent, "m": modulus})


def _modpow_solution(meta: dict[str, Any], answer: int) -> Solution:
    a, e, m = meta["a"], meta["e"], meta["m"]
    reasons = (
        "Python's three-argument pow computes modular powers exactly and fast.",
        "The power is far too large to write out, but pow(base, exponent, modulus) reduces it at every step.",
    )
    text = f"Squaring and multiplying, and reducing modulo {m} after every step: {a}^{e} mod {m} = {answer}."
    return Solution(reasons, f"print(pow({a}, {e}, {m}))", text)


# --- gcd_lcm ----------------------------------------------------------------------------------------------


def _gcd_lcm(rng: random.Random, level: int) -> Question:
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
    return Question(f"What is the {name} of {join_words(numbers)}?", answer, {"kind": kind, "numbers": numbers})


def _euclid(a: int, b: int) -> tuple[str, int]:
    steps = [f"gcd({a}, {b})"]
    while b:
        a, b = b, a % b
        steps.append(f"gcd({a}, {b})")
    if len(steps) > 6:  # a long chain is no short derivation: keep its ends
        steps = [*steps[:2], "...", steps[-1]]
    return " = ".join(steps) + f" = {a}", a


def _gcd_lcm_solution(meta: dict[str, Any], answer: int) -> Solution:
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
    return Solution(reasons, f"import math\n\nprint(math.{kind}({', '.join(map(str, numbers))}))", "\n".join(lines))


# --- digit_sum --------------------------------------------------------------------------------------------


def _digit_sum(rng: random.Random, level: int) -> Question:
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
    return Question(prompt, sum(map(int, str(value))), extra)


def _digit_sum_solution(meta: dict[str, Any], answer: int) -> Solution:
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
    return Solution(reasons, code, text)


# --- divisors ---------------------------------------------------------------------------------------------

_SMALL_PRIMES = [p for p in range(2, 100) if all(p % d for d in range(2, math.isqrt(p) + 1))]


def _divisors(rng: random.Random, level: int) -> Question:
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
    return Question(prompt, answer, {"kind": kind, "n": n, "factors": [list(pair) for pair in pairs]})


def _divisors_solution(meta: dict[str, Any], answer: int) -> Solution:
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
    return Solution(reasons, code, text)


FAMILIES = {
    "modpow": Family(_modpow, _modpow_solution),
    "gcd_lcm": Family(_gcd_lcm, _gcd_lcm_solution),
    "digit_sum": Family(_digit_sum, _digit_sum_solution),
    "divisors": Family(_divisors, _divisors_solution),
}
