"""``retool plugins``: every plugin found, with its kind, class, package and version."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retool.cli._common import command_parser, parse, wants_help, wide_console

USAGE = "retool [-p no:NAME ...] plugins"


def _parser() -> Any:
    return command_parser(
        "retool plugins",
        USAGE,
        "List the plugins found: entry points of the retool.plugins group (blocked ones left out with -p no:NAME), "
        "then the modules named in RETOOL_PLUGINS.",
    )


def cmd_plugins(args: list[str], blocked: Sequence[str]) -> int:
    from rich.table import Table

    from retool import plugins as plugin_registry

    parser = _parser()
    if wants_help(args):
        parser.print_help()
        return 0
    parse(parser, args)
    table = Table(title="retool plugins")
    for column in ("kind", "name", "class", "package", "version"):
        table.add_column(column)
    for p in plugin_registry.discover(blocked):
        table.add_row(p.kind, p.name, p.class_path, p.package, p.version)
    wide_console().print(table)
    return 0
