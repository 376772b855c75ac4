"""The text format of a tool-using trajectory: how the prompt asks for code, where a cell ends, what the
interpreter's reply looks like.

The format is a swappable object (a rollout option), so that a JSON tool-call format can sit beside the
paper's tags. :class:`ReToolFormat` is the paper's: code goes in ``<code>`` + a python fence + ``</code>``,
the interpreter answers in ``<interpreter>...</interpreter>``, the final answer is
``<answer>\\boxed{...}</answer>``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from retool.types import ExecutionResult, Problem

_FENCE_OPEN = re.compile(r"```[ \t]*(?:python|py|python3)[ \t]*\n", re.IGNORECASE)
_CODE_OPEN = "<code>"
_CODE_CLOSE = "</code>"
_INTERPRETER_BLOCK = re.compile(r"\n?<interpreter>.*?</interpreter>\n?", re.DOTALL)


class ToolFormat(ABC):
    """How tool calls are written in text. Subclass it for another convention (e.g. JSON tool calls)."""

    @abstractmethod
    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat messages that open a trajectory for ``problem`` (rendered by the model's chat template)."""

    @abstractmethod
    def cell_closed(self, segment: str) -> bool:
        """Whether ``segment`` (model text since the last interpreter reply) ends with a complete code cell.

        The rollout backend calls this while decoding, whenever the text grew; it must be cheap.
        """

    @abstractmethod
    def extract_code(self, segment: str) -> str | None:
        """The code of the cell that closes ``segment``, or ``None`` when there is none."""

    @abstractmethod
    def feedback(self, result: ExecutionResult) -> str:
        """The text appended after a cell: the interpreter's reply as the model will read it."""

    def split_response(self, response: str) -> list[tuple[str, bool]]:
        """Cut a written-out response into ``(text, written_by_model)`` pieces, in order.

        Supervised training uses it to mask what the model did not write (the interpreter's replies). The
        pieces concatenate back to ``response``. The default: all of it is the model's.
        """
        return [(response, True)] if response else []


def _last_cell_start(segment: str) -> tuple[int, bool] | None:
    """Position just after the last opening of a cell in ``segment``, and whether it was ``<code>``-wrapped."""
    tag = segment.rfind(_CODE_OPEN)
    fences = list(_FENCE_OPEN.finditer(segment))
    fence = fences[-1].end() if fences else -1
    if tag < 0 and fence < 0:
        return None
    if tag >= 0 and (fence < 0 or fence > tag):
        # A fence after the last <code> belongs to that <code> cell: wait for </code>.
        return tag + len(_CODE_OPEN), True
    return fence, False


class ReToolFormat(ToolFormat):
    """The ReTool paper's format: ``<code>`` cells, ``<interpreter>`` replies, ``<answer>\\boxed{}</answer>``.

    A cell closes at ``</code>``; a bare python fence (no ``<code>`` around it) closes at its closing
    backticks, so a small model that has never seen the tags calls the interpreter from its first step.

    Args:
        instructions: The tool instructions put before the question (``{question}`` marks where it goes;
            ``{example}`` where the worked example goes). The default tells the model how to write code
            and the final answer.
        example: A worked example in the format, shown before the question; ``None`` for none. Measured
            with SmolLM2-135M-Instruct on the quickstart's problems: without it 0 of 32 answers had a
            ``\\boxed{}`` answer; with it 22 of 32 did and 7 were right.
        system_prompt: An optional system message; ``None`` keeps the chat template's default.
        empty_output: What the interpreter says when a cell printed nothing and raised nothing.
    """

    DEFAULT_INSTRUCTIONS = (
        "Solve the math problem below. You can run Python code to compute exact results: write a complete "
        "script between <code> and </code> in a ```python code block, and use print() to show values. The "
        "printed output comes back to you between <interpreter> and </interpreter>. Finish with the final "
        "answer as <answer>\\boxed{{your answer}}</answer>.\n\n{example}Problem: {question}"
    )
    DEFAULT_EXAMPLE = (
        "Example:\nProblem: What is 25 * 31?\n<code>\n```python\nprint(25 * 31)\n```\n</code>\n"
        "<interpreter>\n775\n</interpreter>\n<answer>\\boxed{775}</answer>\n\n"
    )

    def __init__(
        self,
        instructions: str = DEFAULT_INSTRUCTIONS,
        example: str | None = DEFAULT_EXAMPLE,
        system_prompt: str | None = None,
        empty_output: str = "(no output: use print() to show a value)",
    ) -> None:
        if "{question}" not in instructions:
            raise ValueError("ReToolFormat instructions must contain the placeholder {question}")
        try:  # fail at construction (before any model loads), not at the first rollout
            instructions.format(question="", example="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"ReToolFormat instructions may only use the placeholders {{question}} and {{example}} "
                f"(write a literal brace as {{{{ or }}}}): {exc!r}"
            ) from None
        self.instructions = instructions
        self.example = example
        self.system_prompt = system_prompt
        self.empty_output = empty_output

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        content = self.instructions.format(question=problem.prompt, example=self.example or "")
        messages.append({"role": "user", "content": content})
        return messages

    def cell_closed(self, segment: str) -> bool:
        start = _last_cell_start(segment)
        if start is None:
            return False
        pos, tagged = start
        body = segment[pos:]
        return _CODE_CLOSE in body if tagged else "```" in body

    def extract_code(self, segment: str) -> str | None:
        start = _last_cell_start(segment)
        if start is None:
            return None
        pos, tagged = start
        body = segment[pos:]
        if tagged:
            end = body.find(_CODE_CLOSE)
            if end < 0:
                return None
            body = body[:end]
            fence = _FENCE_OPEN.search(body)
            if fence:
                body = body[fence.end() :]
            body = body.split("```")[0]
        else:
            end = body.find("```")
            if end < 0:
                return None
            body = body[:end]
        return body.strip("\n")

    def split_response(self, response: str) -> list[tuple[str, bool]]:
        # An interpreter block, with the newline before and after it that feedback() adds in a rollout, is
        # not the model's: the same tokens a rollout would have appended are masked in training.
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for match in _INTERPRETER_BLOCK.finditer(response):
            if match.start() > pos:
                pieces.append((response[pos : match.start()], True))
            pieces.append((match.group(0), False))
            pos = match.end()
        if pos < len(response):
            pieces.append((response[pos:], True))
        return pieces

    def feedback(self, result: ExecutionResult) -> str:
        parts = [result.stdout.rstrip("\n")] if result.stdout.strip() else []
        if result.timed_out:
            parts.append("TimeoutError: the cell ran past its time limit and was stopped")
        elif result.error:
            parts.append(result.error)
        if result.session_restarted:
            parts.insert(0, "(the interpreter was restarted: earlier variables are gone)")
        text = "\n".join(parts) if parts else self.empty_output
        return f"\n<interpreter>\n{text}\n</interpreter>\n"


class TextOnlyFormat(ToolFormat):
    """No tools: the model reasons in text and boxes its answer (the text-RL baseline of the paper).

    Nothing the model writes counts as a code cell, so generation never stops for one.

    Args:
        instructions: The instructions put before the question (``{question}`` marks where it goes).
        system_prompt: An optional system message; ``None`` keeps the chat template's default.
    """

    DEFAULT_INSTRUCTIONS = (
        "Solve the math problem below step by step. Finish with the final answer as "
        "<answer>\\boxed{{your answer}}</answer>.\n\nProblem: {question}"
    )

    def __init__(self, instructions: str = DEFAULT_INSTRUCTIONS, system_prompt: str | None = None) -> None:
        if "{question}" not in instructions:
            raise ValueError("TextOnlyFormat instructions must contain the placeholder {question}")
        self.instructions = instructions
        self.system_prompt = system_prompt

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return [*messages, {"role": "user", "content": self.instructions.format(question=problem.prompt)}]

    def cell_closed(self, segment: str) -> bool:
        return False

    def extract_code(self, segment: str) -> str | None:
        return None

    def feedback(self, result: ExecutionResult) -> str:
        raise RuntimeError("TextOnlyFormat has no tools, so it never renders interpreter output")
