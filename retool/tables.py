"""The tables a run prints: the step table's columns, the evaluation table, and how their numbers are written.

One definition each, used by the live step table (:mod:`retool.callbacks`), the end of ``retool fit`` and
``retool validate``, and ``retool report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

STEP_COLUMNS: list[tuple[str, str, str]] = [
    ("reward", "reward/mean", "{:+.2f}"),
    ("acc", "reward/correct", "{:.2f}"),
    ("tokens", "response/model_tokens", "{:.0f}"),
    ("calls", "tools/calls", "{:.2f}"),
    ("cell ok", "tools/cell_ok", "{:.2f}"),
    ("gen s", "time/generate_s", "{:.1f}"),
    ("tool s", "time/tool_wait_s", "{:.1f}"),
    ("upd s", "time/update_s", "{:.1f}"),
    ("tok/s", "perf/generate_tokens_per_s", "{:.0f}"),
]
"""(header, metric key, format) of the row printed after each RL step; an algorithm may set its own
(``Algorithm.table_columns``: SFT shows its loss instead of rewards)."""


def format_value(value: Any, fmt: str) -> str:
    """``value`` written with ``fmt`` (a ``str.format`` pattern), or ``-`` when it is absent, not a number or NaN.

    A ``{:d}`` pattern takes a float that holds a whole number (JSON and logs store steps as floats too).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return fmt.format(int(value) if fmt.endswith("d}") else value)


def eval_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(header, key, format) of an evaluation table: accuracy, the avg@k / pass@k present, the paper's metrics."""
    sampled = sorted({k for row in rows for k in row if k.startswith(("eval/avg@", "eval/pass@"))})
    return [
        ("accuracy", "eval/accuracy", "{:.3f}"),
        *[(k[5:], k, "{:.3f}") for k in sampled],
        ("code ratio", "eval/code_ratio", "{:.2f}"),
        ("code lines", "eval/code_lines", "{:.1f}"),
        ("cell ok", "eval/cell_ok", "{:.2f}"),
        ("last cell ok", "eval/last_cell_ok", "{:.2f}"),
        ("1st cell pos", "eval/first_cell_pos", "{:.2f}"),
        ("resp tokens", "eval/response_length", "{:.0f}"),
    ]


def eval_set_names(row: dict[str, Any]) -> list[str]:
    """The named evaluation sets of an evaluation row (keys ``eval/<name>/problems``), in order."""
    parts = [key.split("/") for key in row if key.startswith("eval/")]
    return [p[1] for p in parts if len(p) == 3 and p[2] == "problems"]


def eval_sets_table(row: dict[str, Any], title: str) -> Any:
    """One line per named evaluation set of one evaluation row: its size, greedy accuracy, avg@n and pass@k,
    and the paper's code metrics."""
    from rich.markup import escape
    from rich.table import Table

    names = eval_set_names(row)
    sampled = sorted(
        {key.split("/")[2] for key in row if key.count("/") == 2 and key.split("/")[2].startswith(("avg@", "pass@"))},
        key=lambda k: (k.split("@")[0] != "avg", int(k.split("@")[1])),
    )
    columns = [
        ("problems", "problems", "{:d}"),
        ("accuracy", "accuracy", "{:.3f}"),
        *[(k, k, "{:.3f}") for k in sampled],
        ("code ratio", "code_ratio", "{:.2f}"),
        ("code lines", "code_lines", "{:.1f}"),
        ("cell ok", "cell_ok", "{:.2f}"),
        ("last cell ok", "last_cell_ok", "{:.2f}"),
        ("resp tokens", "response_length", "{:.0f}"),
    ]
    table = Table(title=title, title_justify="left")
    table.add_column("set")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for name in names:
        table.add_row(escape(name), *[format_value(row.get(f"eval/{name}/{key}"), fmt) for _, key, fmt in columns])
    return table


def evaluation_table(rows: Sequence[dict[str, Any]], title: str, run_names: Sequence[str] | None = None) -> Any:
    """A rich table of evaluation rows (``{"step": ..., "eval/...": ...}``), one line each, with the paper's metrics.

    ``run_names``, one per row, adds a first column naming the run each row comes from.
    """
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    if run_names is not None:
        table.add_column("run")
    columns = [("step", "step", "{:d}"), *eval_columns(rows)]
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for i, row in enumerate(rows):
        cells = [format_value(row.get(key), fmt) for _, key, fmt in columns]
        table.add_row(*([escape(run_names[i])] if run_names is not None else []), *cells)
    return table
