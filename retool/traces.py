"""Checking a cold-start (SFT) set before training on it: ``retool traces check FILE --executor NAME``.

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
import json
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


# ---- retool traces check ---------------------------------------------------------------------------------

USAGE = """usage: retool traces check FILE --executor NAME [--reward NAME] [--layout fields|messages|retool-sft]
                          [--split SPLIT] [--prompt_field KEY] [--response_field KEY] [--answer_field KEY]
                          [--id_field KEY] [--messages_field KEY] [--out KEPT.jsonl] [--limit N] [--concurrency N]

Check a cold-start SFT set: each trace's format, its cells run again in the executor (outputs must match its
interpreter blocks) and, with --reward and gold answers, its final answer. Writes the traces that pass, as their
original rows, to --out (default: FILE's name with .kept.jsonl) and prints what was dropped and why.

  FILE              a .jsonl or .parquet file, a dataset folder, or a Hugging Face Hub id ORG/NAME (see TraceFile)
  --executor NAME   the executor plugin that runs the cells (e.g. LocalSandbox), or a class path
  --reward NAME     the reward plugin that checks final answers (e.g. MathAnswerReward); none: not checked
  --layout ...      how a row holds its trace (TraceFile's layout; default fields)
  --limit N         check only the first N rows"""

_OPTIONS = (
    "executor",
    "reward",
    "layout",
    "split",
    "prompt_field",
    "response_field",
    "answer_field",
    "id_field",
    "messages_field",
    "out",
    "limit",
    "concurrency",
)


_DATA_OPTIONS = ("layout", "split", "prompt_field", "response_field", "answer_field", "id_field", "messages_field")
"""The options passed on to the data module (``TraceFile``'s arguments of the same names)."""


class _UsageError(Exception):
    """A command-line mistake: printed as one ``error:`` line, exit code 2."""


def _parse_args(argv: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {"file": None}
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in _OPTIONS:
                raise _UsageError(f"unknown option {arg!r}; options: {', '.join('--' + o for o in _OPTIONS)}")
            if not eq:
                if not rest:
                    raise _UsageError(f"option --{name} needs a value")
                value = rest.pop(0)
            options[name] = value
        elif options["file"] is None:
            options["file"] = arg
        else:
            raise _UsageError(f"one FILE only; got {options['file']!r} and {arg!r}")
    if options["file"] is None:
        raise _UsageError("no FILE given; usage: retool traces check FILE --executor NAME")
    if "executor" not in options:
        raise _UsageError("--executor NAME is required (the executor plugin that runs the cells, e.g. LocalSandbox)")
    for name in ("limit", "concurrency"):
        if name in options:
            try:
                options[name] = int(options[name])
            except ValueError:
                raise _UsageError(f"--{name} takes a whole number, got {options[name]!r}") from None
    return options


def _plugin(kind: str, name: str, found: Sequence[Any]) -> type:
    import importlib

    from retool.plugins import check_class_path

    check_class_path(kind, name, found)
    for plugin in found:
        if plugin.kind == kind and plugin.name == name:
            return plugin.cls
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)  # check_class_path has vetted it


def _default_out(file: str) -> Path:
    source = Path(file).expanduser()
    if source.exists():
        return source.parent / f"{source.stem if source.is_file() else source.name}.kept.jsonl"
    return Path(f"{file.rstrip('/').rpartition('/')[2]}.kept.jsonl")  # a hub id: in the current folder


def main(argv: list[str], blocked: Sequence[str] = ()) -> int:
    """``retool traces check FILE --executor NAME ...``: check a cold-start set and write the traces it keeps.

    Returns 0 when the check ran (whatever it dropped), 2 on a usage, data or plugin error, 1 when the
    executor or the reward failed during the check. Errors print one ``error:`` line, never a traceback.
    """
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] != "check":
        _error(f"unknown traces command {args[0]!r}; the command is: retool traces check FILE --executor NAME")
        return 2
    if any(a in ("-h", "--help") for a in args[1:]):
        print(USAGE)
        return 0
    from retool.plugins import PluginError, discover

    executor: Any = None
    reward: Any = None
    try:
        options = _parse_args(args[1:])
        found = discover(blocked)
        executor_cls = _plugin("executor", options["executor"], found)
        reward_cls = _plugin("reward", options["reward"], found) if options.get("reward") else None
        data_cls = _plugin("data", "TraceFile", found)
        data_options = {k: options[k] for k in _DATA_OPTIONS if k in options}
        data = data_cls(path=options["file"], limit=options.get("limit"), **data_options)
        traces = data.traces("train")
        rows = data.rows("train")
        out = Path(options["out"]).expanduser() if options.get("out") else _default_out(options["file"])
        try:
            executor = executor_cls()
        except Exception as exc:
            raise _UsageError(f"executor {options['executor']!r} could not be created: {exc}") from None
        if reward_cls is not None:
            try:
                reward = reward_cls()
            except Exception as exc:
                raise _UsageError(f"reward {options['reward']!r} could not be created: {exc}") from None
    except (_UsageError, PluginError, ValueError, OSError) as exc:
        _close(executor, reward)
        _error(str(exc))
        return 2

    from retool.rollout.format import ReToolFormat

    try:
        verdicts = check_traces(traces, ReToolFormat(), executor, reward, concurrency=options.get("concurrency", 8))
    except Exception as exc:
        _error(f"the check failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        _close(executor, reward)

    kept = [rows[v.index] for v in verdicts if v.kept]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as file:
            for row in kept:
                file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    except OSError as exc:
        _error(f"cannot write the kept traces to {out}: {exc}")
        return 2
    _report(options, traces, verdicts, out)
    return 0


def _close(executor: Any, reward: Any) -> None:
    from retool._async import run_sync

    try:
        if executor is not None:
            run_sync(executor.aclose())
    finally:
        close = getattr(reward, "close", None)
        if callable(close):
            close()


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


def _report(options: dict[str, Any], traces: Sequence[Trace], verdicts: list[TraceVerdict], out: Path) -> None:
    from collections import Counter

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def where(v: TraceVerdict) -> str:
        row = traces[v.index].metadata.get("row")
        return f"row {row} ({v.problem_id})" if row is not None else f"trace {v.index} ({v.problem_id})"

    kept = [v for v in verdicts if v.kept]
    unchecked = Counter(v.detail.partition("answer not checked: ")[2] for v in kept if "answer not checked" in v.detail)
    reward = options.get("reward") or "none"
    title = f"retool traces check: {options['file']} (executor {options['executor']}, reward {reward})"
    table = Table(title=escape(title), title_justify="left")
    table.add_column("outcome")
    table.add_column("traces", justify="right")
    table.add_column("examples: where, problem id: what was found", overflow="fold")
    table.add_row("total", str(len(verdicts)), "")
    table.add_row("[green]kept[/]", str(len(kept)), "")
    for reason in REASONS[1:]:
        dropped = [v for v in verdicts if v.reason == reason]
        if dropped:
            examples = "\n".join(f"{where(v)}: {v.detail}" for v in dropped[:3])
            table.add_row(f"[red]dropped: {reason}[/]", str(len(dropped)), escape(examples))
    console = Console(highlight=False)
    console.width = max(console.width, 120)
    console.print(table)
    for why, count in unchecked.items():
        console.print(f"answer not checked for {count} of the kept traces: {escape(why)}")
    console.print(f"wrote {len(kept)} kept rows to {escape(str(out))}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
