"""Reading the model's final answer: the boxes of its last ``<answer>`` block.

One definition, shared by everything that reads answers (the reward plugins, ``retool traces check``, the
trace datasets), so that a trace the checker accepts is read the same way by the reward that trains on it.
Braces are matched in one linear pass, so an adversarial generation (thousands of unclosed ``\\boxed{``)
costs time proportional to its length, never more.

A box is ``\\boxed{...}`` or ``\\fbox{...}`` (math-verify reads both), or either command followed by a single
LaTeX token instead of a braced group: ``\\boxed 5``, ``\\boxed x``, ``\\boxed\\pi`` (as in LaTeX, ``\\boxed 42``
boxes only the ``4``).
"""

from __future__ import annotations

import re

# A box opening: the command (not a prefix of a longer one such as \boxedx), then either "{" or, as LaTeX
# reads an argument without braces, one token: a digit, a letter after a space (``\boxedx`` is another
# command), or a control word other than a box command (``\boxed \boxed{5}`` would be a box around a box
# command: the inner box is read instead). Otherwise an escaped character (so ``\{``, ``\}`` and ``\\`` never
# count as braces), or a bare brace.
_TOKENS = re.compile(
    r"(?P<box>\\(?:boxed|fbox)(?![A-Za-z])\s*"
    r"(?:(?P<brace>\{)|(?P<arg>[0-9]|(?<=\s)[A-Za-z]|\\(?!(?:boxed|fbox)(?![A-Za-z]))[A-Za-z]+)))"
    r"|(?P<esc>\\.)|(?P<open>\{)|(?P<close>\})",
    re.S,
)
_SPACE = re.compile(r"\s*")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def boxed_contents(text: str) -> list[str]:
    """The contents of the closed boxes in ``text`` that are not inside another box, in order, stripped.

    Escaped ``\\{`` and ``\\}`` do not count as braces; an unclosed ``\\boxed{`` is ignored, and a box whose
    whole content is another box gives the inner one's (``\\boxed{\\boxed{x}}`` gives ``x``).
    """
    stack: list[tuple[int, int]] = []  # per open brace: (box start, content start), or (-1, -1) if no box
    content: dict[int, tuple[int, int, int]] = {}  # box start -> (content start, content end, box end)
    for match in _TOKENS.finditer(text):
        if match.group("box") is not None:
            if match.group("brace") is not None:
                stack.append((match.start(), match.end()))
            else:
                content[match.start()] = (match.start("arg"), match.end(), match.end())
        elif match.group("open") is not None:
            stack.append((-1, -1))
        elif match.group("close") is not None and stack:  # a stray "}" closes nothing
            opener, start = stack.pop()
            if opener >= 0:
                content[opener] = (start, match.start(), match.end())
    found: list[str] = []
    outer_end = -1
    for start in sorted(content):
        if start < outer_end:  # nested in the previous outer box: part of its content
            continue
        first, last, outer_end = content[start]
        while True:  # a box whose whole content is another box: answer with the inner one
            first = _SPACE.match(text, first, last).end()
            end = last
            while end > first and text[end - 1].isspace():
                end -= 1
            inner = content.get(first)
            if inner is None or inner[2] != end:
                break
            first, last = inner[0], inner[1]
        found.append(text[first:last].strip())
    return found


def last_boxed(text: str) -> str | None:
    """The content of the last closed box in ``text`` (see :func:`boxed_contents`), or ``None``."""
    found = boxed_contents(text)
    return found[-1] if found else None


def final_boxes(text: str) -> list[str]:
    """The model's final answer: every box of the last ``<answer>`` block, else every box in ``text``.

    Several boxes are one answer read together (a list of solutions, one box each); rewards decide what that
    list means. Boxes anywhere count when the last ``<answer>`` block has none, so that writing several
    candidates outside the block is no way around that rule.

    Args:
        text: What the model wrote (``Trajectory.model_text``); any string, including garbage.

    Returns:
        The boxed contents (without ``\\boxed{}``), in order; empty when there is no closed box.
    """
    if not isinstance(text, str) or not text:
        return []
    opening = text.rfind(ANSWER_OPEN)
    if opening != -1:
        body = opening + len(ANSWER_OPEN)
        closing = text.find(ANSWER_CLOSE, body)
        found = boxed_contents(text[body : closing if closing != -1 else len(text)])
        if found:
            return found
    return boxed_contents(text)


def extract_boxed_answer(text: str) -> str | None:
    """The last of the :func:`final_boxes`: the last box in the last ``<answer>`` block, else anywhere.

    Args:
        text: What the model wrote (``Trajectory.model_text``); any string, including garbage.

    Returns:
        The boxed content (without ``\\boxed{}``), or ``None`` when there is no closed box.
    """
    found = final_boxes(text)
    return found[-1] if found else None
