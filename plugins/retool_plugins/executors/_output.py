"""Cutting a cell's output to a budget, head and tail kept: shared by every built-in executor so that a long
output reads the same whichever sandbox ran it.

Standard library only: LocalSandbox's workers import it inside the sandbox, where the trainer's packages
(torch, retool's core) are never loaded.
"""

from __future__ import annotations

from collections.abc import Callable

MARKER = "\n...[{} chars cut]...\n"
"""Stands where the middle of a long output was cut; ``{}`` is the number of characters dropped."""


class Clip:
    """The head and a rolling tail of a text stream, holding at most about ``3 * cap`` characters.

    Args:
        cap: Characters kept at each end.
        mirror: Called with each piece of text that enters the head, and once with ``None`` when the stream
            first runs past its head.
    """

    def __init__(self, cap: int, mirror: Callable[[str | None], None] | None = None) -> None:
        self.cap = cap
        self.mirror = mirror
        self.overflowed = False
        self.head: list[str] = []
        self.head_len = 0
        self.tail: list[str] = []
        self.tail_len = 0
        self.total = 0

    def add(self, text: str) -> None:
        """Account for ``text`` and keep what falls into the head or the tail."""
        n = len(text)
        self.total += n
        start = 0
        if self.head_len < self.cap:
            start = min(self.cap - self.head_len, n)
            piece = text[:start]
            self.head.append(piece)
            self.head_len += start
            if self.mirror is not None:
                self.mirror(piece)
        rest = n - start
        if rest <= 0:
            return
        if not self.overflowed:
            self.overflowed = True
            if self.mirror is not None:
                self.mirror(None)
        if rest >= self.cap:
            # Slice from the end only: one huge string then costs no copy beyond what is kept.
            self.tail = [text[n - self.cap :]]
            self.tail_len = self.cap
            return
        self.tail.append(text[start:])
        self.tail_len += rest
        if self.tail_len > 2 * self.cap:  # amortized trimming keeps many small writes cheap
            joined = "".join(self.tail)
            self.tail = [joined[len(joined) - self.cap :]]
            self.tail_len = self.cap

    def render(self, budget: int) -> tuple[str, bool]:
        """The stream in at most ``budget`` characters (plus a marker): head and tail halves when it is longer."""
        head, tail = "".join(self.head), "".join(self.tail)
        if self.total <= budget:
            return head + tail, False
        if self.total == len(head) + len(tail):  # nothing was dropped yet: cut the whole text
            head = tail = head + tail
        keep_head = (budget + 1) // 2
        keep_tail = budget - keep_head
        return head[:keep_head] + MARKER.format(self.total - budget) + tail[len(tail) - keep_tail :], True


def fit(out: Clip, err: Clip, budget: int) -> tuple[str, str, bool]:
    """Render stdout and stderr within one shared ``budget`` of characters.

    A short stream keeps all of its text and leaves the rest of the budget to the other; two long ones get half
    each. Returns ``(stdout, stderr, truncated)``.
    """
    n_out, n_err = out.total, err.total
    if n_out + n_err <= budget:
        b_out, b_err = n_out, n_err
    elif n_err <= budget // 2:
        b_out, b_err = budget - n_err, n_err
    elif n_out <= budget - budget // 2:
        b_out, b_err = n_out, budget - n_out
    else:
        b_out, b_err = budget - budget // 2, budget // 2
    stdout, cut_out = out.render(b_out)
    stderr, cut_err = err.render(b_err)
    return stdout, stderr, cut_out or cut_err


def clip_text(text: str, budget: int) -> Clip:
    """A :class:`Clip` holding ``text``, for cutting a string that is already in memory."""
    clip = Clip(budget)
    clip.add(text)
    return clip


def error_budget(cap: int) -> int:
    """Characters kept of the error line (a message can be huge: ``raise ValueError("x" * 10**8)``)."""
    return max(cap, 200)
