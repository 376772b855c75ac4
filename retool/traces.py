"""Checking a cold-start (SFT) set before training on it (the checks behind ``retool traces check``).

The ReTool paper builds its cold-start data with two filters, format verification and answer verification.
This module applies both and adds a third, execution verification: every cell of a trace runs again, in
order, in one executor session, and what it prints must be what the trace's interpreter block says. A trace
that teaches the model that code prints something it does not print teaches it to ignore the interpreter.

A trace is dropped for one reason, the first check it fails, in this order:

* ``format``: a ``<code>`` cell is not closed or has no python fence; an interpreter block has no cell
  right before it (text between them, or none at all); a cell has no interpreter block after it; more than
  one ``<answer>``, or the answer comes before the last cell.
* ``no_answer``: no ``<answer>...\\boxed{...}...</answer>`` after the last cell.
* ``cell_failed``: a cell raises or times out here, while its interpreter block shows no error.
* ``output_mismatch``: a cell's output here differs from its interpreter block.
* ``wrong_answer``: the problem has a gold answer and the reward scores the trace's final answer <= 0.

Failed attempts are fine: a cell whose block shows the error it raises here is kept (the paper keeps traces
in which the model recovers from its own mistakes).

How outputs are compared: both sides lose their ``<interpreter>`` tags, every line is stripped and blank
lines at the ends are dropped. Two leniencies, both because other sandboxes write the same outcome
differently: (1) an error matches when the block contains the last line of the error raised here
(``NameError: name 'x' is not defined``; the traceback frames around it may differ), or, for a cell that
timed out here, mentions a timeout; (2) output cut short matches: when either side has a line that starts
with ``...`` (a truncation marker such as ``...[3001 chars cut]...``), the lines before it must start the
other side and the lines after it must end it. The notice that a session restarted is ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from retool.answer import ANSWER_CLOSE, ANSWER_OPEN, extract_boxed_answer
from retool.executor import Executor
from retool.reward import Reward
from retool.rollout.format import ToolFormat
from retool.types import ExecutionResult, Problem, Trace, Trajectory

Reason = Literal["ok", "format", "cell_failed", "output_mismatch", "wrong_answer", "no_answer"]
REASONS: tuple[Reason, ...] = ("ok", "format", "no_answer", "cell_failed", "output_mismatch", "wrong_answer")
"""Every verdict reason, in the order the checks run (``ok`` first)."""

_CODE_OPEN, _CODE_CLOSE = "<code>", "</code>"
_CODE_TAG = re.compile(r"</?code>")
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ERROR_WORDS = re.compile(r"Traceback|Error\b|Exception\b|timed out|time limit", re.IGNORECASE)
_SHOWN_CHARS = 80


@dataclass(frozen=True)
class TraceVerdict:
    """The outcome of checking one trace.

    Args:
        index: Position of the trace in the checked sequence.
        kept: Whether the trace passed every check that applied to it.
        reason: ``"ok"`` when kept; else the first check it failed: ``"format"``, ``"no_answer"``,
            ``"cell_failed"``, ``"output_mismatch"`` or ``"wrong_answer"``.
        detail: What was found, for a person (``"cell 2 printed '42' but its interpreter block says '41'"``);
            for a kept trace, what was checked (and which check was skipped, and why).
        problem_id: ``Problem.id`` of the trace's problem.
    """

    index: int
    kept: bool
    reason: Reason
    detail: str
    problem_id: str = ""


@dataclass(frozen=True)
class _Cell:
    number: int  # 1-based
    code: str
    block: str  # the interpreter block as the trace has it


class _Rejected(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---- checking ---------------------------------------------------------------------------------------------


async def check_trace(
    trace: Trace, fmt: ToolFormat, executor: Executor, session: str, *, index: int = 0
) -> TraceVerdict:
    """Check one trace's format and run its cells; the answer check is :func:`check_traces`' (it batches rewards).

    The cells run in order in ``session``, which is closed when the check ends.

    Args:
        trace: The trace; its response is cut into model text and interpreter blocks by ``fmt``.
        fmt: The text format the trace is written in (``ReToolFormat()`` for the paper's tags).
        executor: Where the cells run.
        session: An executor session of this trace's own.
        index: The trace's position, copied into the verdict.

    Returns:
        The verdict: kept with reason ``"ok"``, or dropped with the first failed check's reason.
    """
    problem_id = trace.problem.id
    try:
        cells, _ = _parse(trace.response, fmt)
    except _Rejected as rejected:
        return TraceVerdict(index, False, rejected.reason, rejected.detail, problem_id)
    try:
        for cell in cells:
            result = await executor.execute(cell.code, session)
            problem = _compare(cell, result, fmt)
            if problem is not None:
                return TraceVerdict(index, False, problem[0], problem[1], problem_id)
    finally:
        await executor.close_session(session)
    ran = f"{len(cells)} cell{'s' if len(cells) != 1 else ''} ran and matched" if cells else "no cells"
    return TraceVerdict(index, True, "ok", ran, problem_id)


def check_traces(
    traces: Sequence[Trace],
    fmt: ToolFormat,
    executor: Executor,
    reward: Reward | None = None,
    concurrency: int = 8,
) -> list[TraceVerdict]:
    """Check every trace: format, then execution (concurrently, each trace in its own session), then answer.

    The answer check needs a ``reward`` and a gold answer: a trace whose problem has an empty answer, or
    whose answer was read from the trace itself (``metadata["answer_from"] == "trace"``, as ``TraceFile``
    marks the ReTool-SFT set), is kept unchecked and its detail says so. The reward scores a
    :class:`~retool.Trajectory` whose ``model_text`` is the trace without its interpreter blocks; a score
    ``<= 0`` drops the trace as ``wrong_answer``.

    Runs on retool's background event loop (the one rollouts use), so the executor may be closed afterwards
    with ``retool._async.run_sync(executor.aclose())``. Call it from synchronous code.

    Args:
        traces: The traces to check.
        fmt: Their text format.
        executor: Where the cells run.
        reward: Scores final answers against gold answers; ``None`` skips the answer check.
        concurrency: Traces whose cells run at the same time.

    Returns:
        One verdict per trace, in order.
    """
    from retool._async import run_sync

    if concurrency < 1:
        raise ValueError(f"check_traces concurrency must be >= 1, got {concurrency}")
    verdicts = run_sync(_check_all(traces, fmt, executor, concurrency))
    return _check_answers(traces, fmt, verdicts, reward)


async def _check_all(
    traces: Sequence[Trace], fmt: ToolFormat, executor: Executor, concurrency: int
) -> list[TraceVerdict]:
    limit = asyncio.Semaphore(concurrency)
    run = uuid.uuid4().hex[:8]

    async def one(index: int, trace: Trace) -> TraceVerdict:
        async with limit:
            return await check_trace(trace, fmt, executor, f"trace-check-{run}-{index}", index=index)

    return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(traces))))


def _gold(problem: Problem, trace: Trace) -> str | None:
    if "trace" in (problem.metadata.get("answer_from"), trace.metadata.get("answer_from")):
        return None
    return problem.answer if problem.answer.strip() else None


def _check_answers(
    traces: Sequence[Trace], fmt: ToolFormat, verdicts: list[TraceVerdict], reward: Reward | None
) -> list[TraceVerdict]:
    to_score: list[int] = []
    for i, verdict in enumerate(verdicts):
        if not verdict.kept:
            continue
        trace = traces[i]
        if reward is None:
            verdicts[i] = dataclasses.replace(verdict, detail=f"{verdict.detail}; answer not checked: no reward given")
        elif _gold(trace.problem, trace) is None:
            why = (
                "its answer was taken from the trace itself"
                if "trace" in (trace.problem.metadata.get("answer_from"), trace.metadata.get("answer_from"))
                else "the problem has no answer"
            )
            verdicts[i] = dataclasses.replace(verdict, detail=f"{verdict.detail}; answer not checked: {why}")
        else:
            to_score.append(i)
    if not to_score or reward is None:
        return verdicts
    texts = {i: _model_text(traces[i].response, fmt) for i in to_score}
    trajectories = [
        Trajectory(
            problem_id=traces[i].problem.id,
            group=0,
            token_ids=[],
            loss_mask=[],
            prompt_len=0,
            prompt_text="",
            response_text=traces[i].response,
            model_text=texts[i],
        )
        for i in to_score
    ]
    scores = reward(trajectories, [traces[i].problem for i in to_score]).rewards
    for i, score in zip(to_score, scores, strict=True):
        verdict = verdicts[i]
        if score > 0:
            verdicts[i] = dataclasses.replace(verdict, detail=f"{verdict.detail}; answer verified")
        else:
            given = extract_boxed_answer(texts[i])
            verdicts[i] = dataclasses.replace(
                verdict,
                kept=False,
                reason="wrong_answer",
                detail=f"the final answer {_show(given or '')} is not the gold answer "
                f"{_show(traces[i].problem.answer)} (reward {score:g})",
            )
    return verdicts


# ---- format -----------------------------------------------------------------------------------------------


def _model_text(response: str, fmt: ToolFormat) -> str:
    return "".join(text for text, by_model in fmt.split_response(response) if by_model)


def _segments(response: str, fmt: ToolFormat) -> list[tuple[str, str | None]]:
    """``(model text, the interpreter block after it or None)``: one pair per block, then the final text."""
    segments: list[tuple[str, str | None]] = []
    text = ""
    for piece, by_model in fmt.split_response(response):
        if by_model:
            text += piece
        else:
            segments.append((text, piece))
            text = ""
    segments.append((text, None))
    return segments


def _first_close(fmt: ToolFormat, segment: str) -> int | None:
    """Where a rollout would have stopped in ``segment``: the shortest prefix that ``fmt`` calls a closed cell."""
    ends = {m.end() for m in re.finditer(re.escape(_CODE_CLOSE) + "|```", segment)} | {len(segment)}
    for end in sorted(ends):
        if fmt.cell_closed(segment[:end]):
            return end
    return None


def _parse(response: str, fmt: ToolFormat) -> tuple[list[_Cell], str]:
    """The trace's cells and model text; raises :class:`_Rejected` (``format``/``no_answer``) on a bad trace."""
    segments = _segments(response, fmt)
    model_text = "".join(text for text, _ in segments)
    depth, cell = 0, 0
    for tag in _CODE_TAG.finditer(model_text):
        if tag.group() == _CODE_OPEN:
            cell += 1
            if depth:
                raise _Rejected("format", f"cell {cell - 1} is not closed: a new <code> opens before its </code>")
            depth = 1
        elif not depth:
            raise _Rejected("format", f"a </code> after cell {cell} has no <code> before it")
        else:
            depth = 0
    if depth:
        raise _Rejected("format", f"cell {cell} is not closed: its <code> has no </code>")
    for tag in ("<interpreter>", "</interpreter>"):
        if tag in model_text:
            raise _Rejected("format", f"a stray {tag} (an interpreter block is not closed, or not opened)")

    cells: list[_Cell] = []
    before = ""  # model text before the current segment
    for number, (segment, block) in enumerate(segments, start=1):
        end = _first_close(fmt, segment)
        if block is None:  # the text after the last interpreter block
            if end is not None:
                raise _Rejected("format", f"cell {number} has no interpreter block after it")
            break
        if end is None:
            where = "no text at all" if not segment.strip() else "no closed code cell"
            raise _Rejected("format", f"interpreter block {number} has {where} before it")
        after = segment[end:].strip()
        if after:
            raise _Rejected(
                "format",
                f"cell {number} is followed by text before its interpreter block ({_show(after)}); a rollout stops "
                "at the end of a cell",
            )
        opened = segment.rfind(_CODE_OPEN, 0, end)
        tagged = opened >= 0 and segment[:end].rstrip().endswith(_CODE_CLOSE)
        if tagged and not _FENCE.search(segment[opened:end]):
            raise _Rejected("format", f"cell {number} has no closed ```python fence inside <code>")
        code = fmt.extract_code(before + segment[:end])
        if code is None:
            raise _Rejected("format", f"cell {number}: the format finds no code in it")
        cells.append(_Cell(number, code, block))
        before += segment

    final = segments[-1][0]
    answers = model_text.count(ANSWER_OPEN)
    if answers > 1:
        raise _Rejected("format", f"{answers} <answer> blocks; a trace has exactly one, after its last cell")
    if answers == 1 and ANSWER_OPEN not in final:
        raise _Rejected("format", "the <answer> comes before the last cell")
    start = final.find(ANSWER_OPEN)
    close = final.find(ANSWER_CLOSE, start + 1) if start >= 0 else -1
    if start < 0:
        raise _Rejected("no_answer", "no <answer>\\boxed{...}</answer> after the last cell")
    if close < 0:
        raise _Rejected("no_answer", "the <answer> is never closed with </answer>")
    if extract_boxed_answer(final[start : close + len(ANSWER_CLOSE)]) is None:
        raise _Rejected("no_answer", "the <answer> block has no closed \\boxed{...}")
    return cells, model_text


# ---- outputs ----------------------------------------------------------------------------------------------


def _lines(block: str) -> list[str]:
    """A block's text without its interpreter tags, each line stripped, blank lines at the ends dropped."""
    start, end = block.find("<interpreter>"), block.rfind("</interpreter>")
    if start >= 0 and end > start:
        block = block[start + len("<interpreter>") : end]
    lines = [line.strip() for line in block.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _same_output(expected: list[str], actual: list[str]) -> bool:
    if expected == actual:
        return True
    for cut, full in ((expected, actual), (actual, expected)):
        marker = next((i for i, line in enumerate(cut) if line.startswith("...")), None)
        if marker is None:
            continue
        head, tail, whole = "\n".join(cut[:marker]), "\n".join(cut[marker + 1 :]), "\n".join(full)
        if len(whole) >= len(head) + len(tail) and whole.startswith(head) and whole.endswith(tail):
            return True
    return False


def _compare(cell: _Cell, result: ExecutionResult, fmt: ToolFormat) -> tuple[Reason, str] | None:
    """``None`` when ``result`` is what the cell's interpreter block says, else the reason and a detail."""
    expected = _lines(cell.block)
    actual = _lines(fmt.feedback(dataclasses.replace(result, session_restarted=False)))
    if _same_output(expected, actual):
        return None
    said = _show(expected)
    if result.ok:
        if not expected and not result.stdout.strip():
            return None  # printed nothing, and the block is empty
        return "output_mismatch", f"cell {cell.number} printed {_show(actual)} but its interpreter block says {said}"
    error = (result.error or "").strip().splitlines()[-1:] or [""]
    raised = error[0] or ("a timeout" if result.timed_out else "an error")
    shown = "\n".join(expected)
    printed = "\n".join(_lines(result.stdout))
    if result.timed_out and re.search(r"time ?out|timed out|time limit", shown, re.IGNORECASE):
        if printed in shown:
            return None
    elif error[0] and error[0] in shown and printed in shown:
        return None
    if _ERROR_WORDS.search(shown):
        return "output_mismatch", f"cell {cell.number} raised {_show(raised)} but its interpreter block says {said}"
    failed = f"cell {cell.number} failed with {_show(raised)}"
    return "cell_failed", f"{failed}, but its interpreter block shows no error: {said}"


def _show(value: str | list[str]) -> str:
    text = "\n".join(value) if isinstance(value, list) else value
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return repr(text)
