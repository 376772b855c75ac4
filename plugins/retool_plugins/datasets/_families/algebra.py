"""The counting and algebra families: choices, arrangements and committees, and linear systems."""

from __future__ import annotations

import math
import random
from typing import Any

from retool_plugins.datasets._families.common import Family, Solution, join_words, paren
from retool_plugins.datasets._generated import Question

# --- combinatorics ----------------------------------------------------------------------------------------


def _combinatorics(rng: random.Random, level: int) -> Question:
    kind = rng.choice(("choose", "arrange", "committee"))
    if kind == "committee":
        group, most = {1: ((3, 8), 3), 2: ((6, 15), 5), 3: ((12, 30), 8)}[level]
        m, w = rng.randint(*group), rng.randint(*group)
        a, b = rng.randint(1, min(m - 1, most)), rng.randint(1, min(w - 1, most))
        prompt = (
            f"A club has {m} men and {w} women. In how many ways can a committee of {a} {'man' if a == 1 else 'men'} "
            f"and {b} {'woman' if b == 1 else 'women'} be chosen?"
        )
        return Question(prompt, math.comb(m, a) * math.comb(w, b), {"kind": kind, "m": m, "w": w, "a": a, "b": b})
    n = rng.randint(*{1: (5, 12), 2: (12, 30), 3: (30, 60)}[level])
    k = rng.randint(2, min(n - 1, {1: 5, 2: 8, 3: 10}[level]))
    if kind == "choose":
        prompt = rng.choice(
            (
                f"In how many ways can {k} of {n} people be chosen?",
                f"How many ways are there to choose {k} books from {n} different books?",
            )
        )
        return Question(prompt, math.comb(n, k), {"kind": kind, "n": n, "k": k})
    prompt = rng.choice(
        (
            f"In how many ways can {k} of {n} different books be arranged in a row?",
            f"In how many ways can {n} runners take the first {k} places of a race?",
        )
    )
    return Question(prompt, math.perm(n, k), {"kind": kind, "n": n, "k": k})


def _combinatorics_solution(meta: dict[str, Any], answer: int) -> Solution:
    kind = meta["kind"]
    if kind == "committee":
        m, w, a, b = meta["m"], meta["w"], meta["a"], meta["b"]
        x, y = math.comb(m, a), math.comb(w, b)
        code = f"import math\n\nprint(math.comb({m}, {a}) * math.comb({w}, {b}))"
        text = f"There are C({m}, {a}) = {x} ways to pick the men and C({w}, {b}) = {y} ways to pick the women.\n"
        text += f"Together: {x} * {y} = {answer}."
        reasons = ("The two groups are chosen independently, so I will multiply two binomial coefficients.",)
        return Solution(reasons, code, text)
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
    return Solution(reasons, code, text)


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


def _linear_system(rng: random.Random, level: int) -> Question:
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
    equations = join_words([f"{_expression(row, names)} = {r}" for row, r in zip(rows, rhs)])
    prompt = rng.choice((f"Given that {equations}, what is the value of {asked}?", f"If {equations}, what is {asked}?"))
    return Question(
        prompt, answer, {"kind": "sum" if "+" in asked else asked, "rows": rows, "rhs": rhs, "solution": solution}
    )


def _linear_system_solution(meta: dict[str, Any], answer: int) -> Solution:
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
            f"The determinant is {paren(a)} * {paren(d)} - {paren(b)} * {paren(c)} = {det}.\nBy Cramer's rule, "
            f"x = ({paren(e)} * {paren(d)} - {paren(b)} * {paren(f)}) / {paren(det)} = {solution[0]} and "
            f"y = ({paren(a)} * {paren(f)} - {paren(e)} * {paren(c)}) / {paren(det)} = {solution[1]}."
        )
    else:
        values = ", ".join(f"{v} = {s}" for v, s in zip(names, solution))
        text = f"Eliminating one unknown at a time gives {values}."
    if kind == "sum":
        text += f"\nSo {' + '.join(names)} = {' + '.join(paren(s) for s in solution)} = {answer}."
    reasons = (
        "I will solve the system exactly with sympy.",
        "Elimination by hand is error-prone, so I will let sympy solve the equations.",
    )
    return Solution(reasons, code, text)


FAMILIES = {
    "combinatorics": Family(_combinatorics, _combinatorics_solution),
    "linear_system": Family(_linear_system, _linear_system_solution),
}
