"""What every math family shares: a family record (a question generator and its reference solution) and the
text helpers their solutions use."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retool_plugins.datasets._generated import Question


@dataclass(frozen=True)
class Solution:
    """A worked solution: reasoning sentences to pick from, a complete script that prints exactly the answer,
    and a step-by-step text derivation (without the boxed answer)."""

    reasons: tuple[str, ...]
    code: str
    text: str


@dataclass(frozen=True)
class Family:
    """One family of problems: how to draw a question at a level (1 to 3), and how to solve it.

    Args:
        draw: ``draw(rng, level)`` gives one question; its metadata holds what ``solve`` needs.
        solve: ``solve(metadata, answer)`` gives the reference solution of a question drawn by ``draw`` (the
            metadata also holds the problem's ``family`` and ``level``).
    """

    draw: Callable[[random.Random, int], Question]
    solve: Callable[[dict[str, Any], int], Solution]


def join_words(items: list[Any]) -> str:
    words = [str(item) for item in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)
