"""The benchmarks' output: a rich table, and optionally the same rows as Markdown for the docs."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def print_table(console: Console, title: str, header: list[str], body: list[list[str]], markdown: bool) -> None:
    """Print a rich table, and with ``markdown`` the same rows as a Markdown table (for the docs)."""
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for line in body:
        table.add_row(*line)
    console.print(table)
    if markdown:
        plain = [[Text.from_markup(cell).plain for cell in line] for line in body]
        lines = [f"| {' | '.join(header)} |", "|" + "|".join("---" for _ in header) + "|"]
        lines += [f"| {' | '.join(line)} |" for line in plain]
        console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
