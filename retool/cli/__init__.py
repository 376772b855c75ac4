"""The ``retool`` command.

``retool [--debug] [-p no:PLUGIN ...] COMMAND ...``: ``fit`` and ``validate`` take a recipe (``recipe.py``: the flat
YAML recipe, its parser and its checks; ``run.py``: one set-up path from a parsed recipe to a Trainer and a
run directory); ``report``, ``traces check``, ``sandbox check`` and ``plugins`` each live in a module of their
own. Every command parses its arguments with jsonargparse and reports a mistake as one ``error:`` line that
names the fix (exit code 2), with no traceback; a failure that is not a recipe mistake (a bug in a plugin's
constructor or data loading) shows its traceback, and ``--debug`` shows it for every error.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from retool.cli import _common
from retool.cli._common import ConfigError, print_error


@dataclass(frozen=True)
class Command:
    """One subcommand: where its ``cmd_*(args, blocked) -> exit code`` function lives, and its usage line."""

    module: str
    function: str
    usage: str
    summary: str


COMMANDS: dict[str, Command] = {
    "fit": Command("run", "cmd_fit", "fit --recipe PATH [--print_config] [--section.key VALUE ...]",
                   "train with a recipe"),
    "validate": Command("run", "cmd_validate", "validate --recipe PATH [--ckpt_path POLICY] [--limit N]",
                        "evaluate a policy on the recipe's held-out or named sets"),
    "report": Command("report", "cmd_report", "report RUN_DIR [RUN_DIR ...]",
                      "draw a run's curves, write its trajectories as HTML"),
    "traces": Command("traces", "cmd_traces", "traces check FILE --executor NAME [--reward NAME]",
                      "filter a cold-start set: format, cells, answers"),
    "plugins": Command("listing", "cmd_plugins", "plugins", "list the plugins found"),
    "sandbox": Command("sandbox", "cmd_sandbox", "sandbox check [--executor NAME_OR_CLASS_PATH] [--strict]",
                       "show and test the executors' isolation"),
}  # fmt: skip


def usage() -> str:
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = [f"  {c.usage.ljust(width)}   {c.summary}" for c in COMMANDS.values()]
    return (
        "usage: retool [--debug] [-p no:PLUGIN ...] COMMAND ...\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "`retool COMMAND --help` shows a command's options; `retool fit --help` lists every option of every section.\n"
        "--debug prints the traceback of every error (by default a recipe mistake is one line)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``retool`` with ``argv`` (default: the process's arguments); return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _common.DEBUG = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    try:
        blocked, args = _take_blocked(args)
        if not args or args[0] in ("-h", "--help"):
            print(usage())
            return 0 if args else 2
        name, rest = args[0], args[1:]
        command = COMMANDS.get(name)
        if command is None:
            import difflib

            near = difflib.get_close_matches(name, COMMANDS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown command {name!r}{hint} commands: {', '.join(COMMANDS)}")
        run = getattr(importlib.import_module(f"retool.cli.{command.module}"), command.function)
        return int(run(rest, blocked))
    except ConfigError as exc:
        print_error(str(exc))
        if _common.DEBUG:
            traceback.print_exc()
        return 2
    except Exception as exc:
        from retool.plugins import PluginError
        from retool.rollout.failures import ExecutorFailing

        if isinstance(exc, PluginError):
            print_error(str(exc))
            return 2
        if isinstance(exc, ExecutorFailing) and not _common.DEBUG:  # the run's own verdict: no traceback to read
            print_error(str(exc))
            return 1
        raise


def _take_blocked(args: list[str]) -> tuple[list[str], list[str]]:
    """Split off ``-p no:NAME`` options (pytest's syntax for blocking a plugin)."""
    blocked, rest, i = [], [], 0
    while i < len(args):
        if args[i] == "-p" and i + 1 < len(args):
            value = args[i + 1]
            if not value.startswith("no:"):
                raise ConfigError(f"-p takes no:NAME to block a plugin, got {value!r}")
            blocked.append(value[3:])
            i += 2
            continue
        rest.append(args[i])
        i += 1
    return blocked, rest


__all__ = ["COMMANDS", "ConfigError", "main"]
