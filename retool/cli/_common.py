"""What every ``retool`` command shares: its parser, its error, and how both reach the user."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ConfigError(Exception):
    """A recipe or command-line problem: printed as one ``error:`` line, exit code 2."""


DEBUG = False
"""``retool --debug ...``: errors that are normally one line also print their traceback."""

# What a wrong recipe value or a missing file raises (a plugin's own check of its options raises ValueError, as
# the plugin contract asks; a missing optional package is the environment's, not a bug). Anything else raised
# while a recipe is instantiated is a bug in a plugin or in retool: its traceback is what a user needs.
RECIPE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ModuleNotFoundError,
)  # fmt: skip


def innermost(exc: BaseException) -> BaseException:
    """The exception at the bottom of ``exc``'s chain of causes (what jsonargparse and others wrap)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def print_error(message: str) -> None:
    """``error: message`` on stderr, on one line, never a traceback."""
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


FILE_WIDTH = 200
"""Columns of a console that writes to a file or a pipe (cluster logs, ``nohup``, CI), where rich would assume 80
and cut the tables; a terminal keeps its own width, and ``COLUMNS`` wins over both."""


def console(**options: Any) -> Any:
    """A rich console for retool's output: a terminal's width on a terminal, else :data:`FILE_WIDTH`."""
    import os

    from rich.console import Console

    made = Console(highlight=False, **options)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = FILE_WIDTH
    return made


def wide_console() -> Any:
    """A console for tables whose cells (class paths, file paths) must not be cut, even on a narrow terminal."""
    made = console()
    made.width = max(made.width, 160)
    return made


def command_parser(prog: str, usage: str, description: str) -> Any:
    """The parser of one command: jsonargparse's, as the recipe's is, so every command's help reads alike.

    Errors are raised (never printed with an exit), and turned into :class:`ConfigError` by :func:`parse`.
    """
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, usage=usage, description=description, exit_on_error=False)


def parse(parser: Any, argv: Sequence[str]) -> Any:
    """``parser``'s namespace for ``argv``; a usage mistake is a :class:`ConfigError` naming the fix.

    An option the parser does not have is found here, before jsonargparse sees it, so that the message is
    ours (with the options it does have), not a rewording of another library's text.
    """
    from jsonargparse import ArgumentError

    known = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    for arg in argv:
        name = arg.partition("=")[0]
        if name.startswith("-") and name not in known and name not in ("-h", "--help") and not _number(name):
            import difflib

            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown option {name!r}{hint} {parser.prog} takes {', '.join(known)}")
    try:
        return parser.parse_args(list(argv))
    except ArgumentError as exc:
        raise ConfigError(f"{exc}; see `{parser.prog} --help`") from None


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def whole_number(option: str, value: str | None, minimum: int | None = None) -> int | None:
    """``value`` (a command-line string, or ``None`` when not given) as an int, or a ConfigError naming ``option``."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{option} takes a whole number, got {value!r}") from None
    if minimum is not None and number < minimum:
        wanted = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise ConfigError(f"{option} takes {wanted}, got {number}")
    return number


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def root_cause(exc: BaseException) -> str:
    """The innermost exception's message (jsonargparse wraps a constructor's ValueError in its own errors)."""
    exc = innermost(exc)
    text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    return clean_message(text)


def clean_message(message: str) -> str:
    """A long nested message (jsonargparse lists every subclass it tried) cut to the lines a user can act on."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(("- ", "Given value type", "Subclass types expected"))]
    return " ".join(keep or lines)[:1500]
