"""``retool traces check FILE --executor NAME``: filter a cold-start set by format, execution and answer.

The checks are :mod:`retool.traces`'; this command reads the file with the ``TraceFile`` data plugin, writes
the rows it keeps, and prints what it dropped and why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retool.cli._common import ConfigError, command_parser, parse, print_error, wants_help, whole_number
from retool.cli._common import console as make_console

USAGE = "retool traces check FILE --executor NAME [--reward NAME] [--layout fields|messages|retool-sft] [...]"

_DATA_OPTIONS = {
    "layout": "How a row holds its trace: fields, messages or retool-sft (TraceFile's layout; default fields).",
    "split": "The split of a dataset folder or hub dataset that holds the traces.",
    "prompt_field": "Key of the question (layout fields).",
    "response_field": "Key of the response, the whole trace (layout fields).",
    "answer_field": "Key of the gold answer.",
    "id_field": "Key of the problem id.",
    "messages_field": "Key of the chat (layouts messages and retool-sft).",
}
"""The options passed on to the data module: ``TraceFile``'s arguments of the same names."""


def _parser() -> Any:
    parser = command_parser(
        "retool traces check",
        USAGE,
        "Check a cold-start SFT set: each trace's format, its cells run again in the executor (outputs must "
        "match its interpreter blocks) and, with --reward and gold answers, its final answer. Writes the traces "
        "that pass, as their original rows, to --out and prints what was dropped and why.",
    )
    parser.add_argument(
        "file", nargs="?", default=None, metavar="FILE",
        help="A .jsonl or .parquet file, a dataset folder, or a Hugging Face Hub id ORG/NAME (see TraceFile).",
    )  # fmt: skip
    parser.add_argument(
        "--executor", default=None, metavar="NAME", help="The executor plugin that runs the cells (required)."
    )
    parser.add_argument(
        "--reward", default=None, metavar="NAME", help="The reward plugin that checks final answers; none: unchecked."
    )
    for name, text in _DATA_OPTIONS.items():
        parser.add_argument(
            f"--{name}", default=None, metavar="KEY" if name.endswith("_field") else name.upper(), help=text
        )
    parser.add_argument(
        "--out",
        default=None,
        metavar="KEPT.jsonl",
        help="Where the kept rows go (default: FILE's name with .kept.jsonl).",
    )
    parser.add_argument("--limit", default=None, metavar="N", help="Check only the first N rows.")
    parser.add_argument("--concurrency", default="8", metavar="N", help="Traces whose cells run at the same time.")
    return parser


def cmd_traces(args: list[str], blocked: Sequence[str]) -> int:
    """Check a cold-start set and write the traces it keeps.

    Returns 0 when the check ran (whatever it dropped), 2 on a usage, data or plugin error (a
    :class:`ConfigError`), 1 when the executor or the reward failed during the check.
    """
    from retool.plugins import discover, resolve

    if not args or args[0] in ("-h", "--help"):
        _parser().print_help()
        return 0 if args else 2
    if args[0] != "check":
        raise ConfigError(f"unknown traces command {args[0]!r}; the command is: {USAGE}")
    parser = _parser()
    if wants_help(args[1:]):
        parser.print_help()
        return 0
    options = parse(parser, args[1:])
    if options.file is None:
        raise ConfigError("no FILE given; usage: retool traces check FILE --executor NAME")
    if options.executor is None:
        raise ConfigError("--executor NAME is required (the executor plugin that runs the cells, e.g. LocalSandbox)")
    limit = whole_number("--limit", options.limit)
    concurrency = whole_number("--concurrency", options.concurrency, minimum=1)
    found = discover(blocked)
    executor_cls = resolve("executor", options.executor, found)
    reward_cls = resolve("reward", options.reward, found) if options.reward else None
    data_cls = resolve("data", "TraceFile", found)
    data_options = {k: getattr(options, k) for k in _DATA_OPTIONS if getattr(options, k) is not None}
    executor: Any = None
    reward: Any = None
    try:
        data = data_cls(path=options.file, limit=limit, **data_options)
        traces, rows = data.traces("train"), data.rows("train")
        out = Path(options.out).expanduser() if options.out else _default_out(options.file)
        executor = _create("executor", options.executor, executor_cls)
        reward = _create("reward", options.reward, reward_cls) if reward_cls is not None else None
    except (ValueError, OSError) as exc:
        _close(executor, reward)
        raise ConfigError(str(exc)) from None
    except ConfigError:
        _close(executor, reward)
        raise

    from retool.rollout.format import ReToolFormat
    from retool.traces import check_traces

    try:
        verdicts = check_traces(traces, ReToolFormat(), executor, reward, concurrency=concurrency or 8)
    except Exception as exc:
        print_error(f"the check failed: {type(exc).__name__}: {exc}")
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
        raise ConfigError(f"cannot write the kept traces to {out}: {exc}") from None
    _print_verdicts(options, traces, verdicts, out)
    return 0


def _create(kind: str, name: str, cls: type) -> Any:
    try:
        return cls()
    except Exception as exc:
        raise ConfigError(f"{kind} {name!r} could not be created: {exc}") from None


def _default_out(file: str) -> Path:
    source = Path(file).expanduser()
    if source.exists():
        return source.parent / f"{source.stem if source.is_file() else source.name}.kept.jsonl"
    return Path(f"{file.rstrip('/').rpartition('/')[2]}.kept.jsonl")  # a hub id: in the current folder


def _close(executor: Any, reward: Any) -> None:
    from retool._async import run_sync

    try:
        if executor is not None:
            run_sync(executor.aclose())
    finally:
        if reward is not None:
            reward.close()


def _print_verdicts(options: Any, traces: Sequence[Any], verdicts: Sequence[Any], out: Path) -> None:
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    from retool.traces import REASONS

    def where(v: Any) -> str:
        row = traces[v.index].metadata.get("row")
        return f"row {row} ({v.problem_id})" if row is not None else f"trace {v.index} ({v.problem_id})"

    kept = [v for v in verdicts if v.kept]
    unchecked = Counter(v.detail.partition("answer not checked: ")[2] for v in kept if "answer not checked" in v.detail)
    reward = options.reward or "none"
    title = f"retool traces check: {options.file} (executor {options.executor}, reward {reward})"
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

    console = make_console()
    console.width = max(console.width, 120)
    console.print(table)
    for why, count in unchecked.items():
        console.print(f"answer not checked for {count} of the kept traces: {escape(why)}")
    console.print(f"wrote {len(kept)} kept rows to {escape(str(out))}")
