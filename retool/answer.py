"""Reading the model's final answer: the last ``\\boxed{...}`` of its last ``<answer>`` block.

One definition, shared by everything that reads answers (the reward plugins, ``retool traces check``, the
trace datasets), so that a trace the checker accepts is read the same way by the reward that trains on it.
Braces are matched in one linear pass, so an adversarial generation (thousands of unclosed ``\\boxed{``)
costs time proportional to its length, never more.
"""

from __future__ import annotations

import re

# Opening ``\boxed{`` / ``\fbox{`` (a space may precede the brace), an escaped character (so ``\{``, ``\}``
# and ``\\`` never count as braces), or a bare brace.
_TOKENS = re.compile(r"(?P<box>\\(?:boxed|fbox)\s*\{)|(?P<esc>\\.)|(?P<open>\{)|(?P<close>\})", re.S)
_SPACE = re.compile(r"\s*")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def last_boxed(text: str) -> str | None:
    """The content of the last closed ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, stripped, or ``None``.

    Escaped ``\\{`` and ``\\}`` do not count as braces; an unclosed ``\\boxed{`` is ignored, and
    ``\\boxed{\\boxed{x}}`` gives ``x``.
    """
    stack: list[tuple[int, int]] = []  # per open brace: (box start, content start), or (-1, -1) if no box
    boxes: dict[int, tuple[int, int]] = {}  # closing-brace index -> (box start, content start) of each box
    last: tuple[int, int] | None = None  # content span of the box that closed last
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind == "box" or kind == "open":
            stack.append((match.start(), match.end()) if kind == "box" else (-1, -1))
        elif kind == "close" and stack:  # a stray "}" closes nothing
            opener, start = stack.pop()
            if opener >= 0:
                boxes[match.start()] = (opener, start)
                last = (start, match.start())
    while last is not None:  # a box whose whole content is another box: answer with the inner one
        first, close = _SPACE.match(text, *last).end(), last[1] - 1
        while close > first and text[close].isspace():
            close -= 1
        inner = boxes.get(close)
        if inner is None or inner[0] != first:
            break
        last = (inner[1], close)
    return None if last is None else text[last[0] : last[1]].strip()


def extract_boxed_answer(text: str) -> str | None:
    """The model's final answer: the last boxed content inside the last ``<answer>`` block, else anywhere.

    Args:
        text: What the model wrote (``Trajectory.model_text``); any string, including garbage.

    Returns:
        The boxed content (without ``\\boxed{}``), or ``None`` when there is no closed box.
    """
    if not isinstance(text, str) or not text:
        return None
    opening = text.rfind(ANSWER_OPEN)
    if opening != -1:
        body = opening + len(ANSWER_OPEN)
        closing = text.find(ANSWER_CLOSE, body)
        found = last_boxed(text[body : closing if closing != -1 else len(text)])
        if found is not None:
            return found
    return last_boxed(text)
