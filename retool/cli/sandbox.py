"""``retool sandbox check``: each executor's isolation layers, and its self-test of each, as a table."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from retool import plugins as plugin_registry
from retool.cli._common import ConfigError, command_parser, parse, root_cause, wants_help, wide_console

USAGE = "retool sandbox check [--executor NAME_OR_CLASS_PATH] [--strict]"


def _parser() -> Any:
    parser = command_parser(
        "retool sandbox check",
        USAGE,
        "Print each executor's isolation layers on this machine and attack each active one from a cell. Exit "
        "code 1 if an active layer's self-test failed (or, with --strict, if a layer is not active).",
    )
    parser.add_argument(
        "--executor",
        default=None,
        metavar="NAME_OR_CLASS_PATH",
        help="Check only this executor; default: every discovered executor that checks itself.",
    )
    parser.add_argument("--strict", action="store_true", help="Also fail when a layer is not active here.")
    return parser


def cmd_sandbox(args: list[str], blocked: Sequence[str]) -> int:
    """Run the self-checks; 1 if an active layer's test failed (or, with ``--strict``, a layer is inactive).

    Without ``--executor`` every discovered executor plugin that implements ``self_check`` is checked; one
    that cannot be created here (a missing key, say) is reported and skipped.
    """
    if not args or args[0] in ("-h", "--help"):
        _parser().print_help()
        return 0 if args else 2
    if args[0] != "check":
        raise ConfigError(f"unknown sandbox command {args[0]!r}; usage: {USAGE}")
    parser = _parser()
    if wants_help(args[1:]):
        parser.print_help()
        return 0
    options = parse(parser, args[1:])
    found = plugin_registry.discover(blocked)
    if options.executor is not None:
        targets = [(options.executor, plugin_registry.resolve("executor", options.executor, found))]
    else:
        targets = [(p.name, p.cls) for p in found if p.kind == "executor" and _checks_itself(p.cls)]
        if not targets:
            raise ConfigError("no executor plugin implements self_check; name one with --executor")
    console = wide_console()
    failed = False
    for name, cls in targets:
        try:
            executor = cls()
        except Exception as exc:
            if options.executor is not None:
                raise ConfigError(f"executor {name!r} could not be created: {root_cause(exc)}") from None
            console.print(f"[yellow]{name}: skipped, it could not be created here: {root_cause(exc)}[/]")
            continue
        results = asyncio.run(_run_self_check(executor))
        console.print(_check_table(name, results))
        broken = [r.name for r in results if r.active and r.passed is False]
        inactive = [r.name for r in results if not r.active]
        if broken:
            console.print(f"[bold red]{name}: self-test FAILED for {', '.join(broken)}[/]")
        if inactive:
            style = "bold red" if options.strict else "yellow"
            console.print(f"[{style}]{name}: not active on this machine: {', '.join(inactive)}[/]")
        if not broken and not inactive:
            console.print(f"[green]{name}: every layer is active and held its self-test[/]")
        failed = failed or bool(broken) or (options.strict and bool(inactive))
    return 1 if failed else 0


def _checks_itself(cls: type) -> bool:
    from retool.executor import Executor

    return getattr(cls, "self_check", None) is not Executor.self_check


async def _run_self_check(executor: Any) -> list[Any]:
    try:
        return list(await executor.self_check())
    finally:
        await executor.aclose()


def _check_table(name: str, results: Sequence[Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{name}: isolation layers on this machine", show_lines=False)
    for column in ("layer", "active", "self-test", "how it is enforced / what the test saw"):
        table.add_column(column, overflow="fold")
    for r in results:
        active = "[green]yes[/]" if r.active else "[red]no[/]"
        test = {True: "[green]passed[/]", False: "[bold red]FAILED[/]", None: "-"}[r.passed]
        table.add_row(r.name, active, test, r.detail)
    return table
