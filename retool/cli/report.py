"""``retool report RUN_DIR [RUN_DIR ...]``: a run's curves, its trajectory page and its evaluations, after the fact.

For each run directory written by ``retool fit`` it draws the training and evaluation curves, writes a page of
sampled trajectories and prints a table of the evaluations; given several runs (the stages of a pipeline, or
seeds) it also prints every evaluation of every run in one table. The drawing is :mod:`retool.report`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retool.cli._common import ConfigError, command_parser, parse, wants_help, whole_number
from retool.cli._common import console as make_console

USAGE = "retool report RUN_DIR [RUN_DIR ...] [--out DIR] [--max-per-step N]"


def _parser() -> Any:
    parser = command_parser(
        "retool report",
        USAGE,
        "Draw each run's training and evaluation curves (training.png, evaluation.png), write a page of its "
        "sampled trajectories (trajectories.html) and print its evaluations; with several runs, print every "
        "evaluation of every run in one table.",
    )
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="Run directories written by retool fit.")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="Write here instead of RUN_DIR/report (one folder per run when several).",
    )
    parser.add_argument(
        "--max-per-step", default="4", metavar="N", help="Trajectories shown per step on the page (N >= 1)."
    )
    return parser


def cmd_report(args: list[str], blocked: Sequence[str] = ()) -> int:
    """Write every run's report; 0 on success (a usage or input problem is a :class:`ConfigError`)."""
    from retool.report import ReportError, load_run, write_report

    parser = _parser()
    if wants_help(args):
        parser.print_help()
        return 0
    options = parse(parser, args)
    if not options.run_dirs:
        raise ConfigError(f"the following arguments are required: RUN_DIR; usage: {USAGE}")
    max_per_step = whole_number("--max-per-step", options.max_per_step, minimum=1)
    assert max_per_step is not None
    try:
        runs = [load_run(d) for d in options.run_dirs]  # every directory is checked before anything is written
    except ReportError as exc:
        raise ConfigError(str(exc)) from None
    console = _console()
    for run, name in zip(runs, _out_names([run.name for run in runs])):
        target = None if options.out is None else Path(options.out) / name if len(runs) > 1 else Path(options.out)
        try:
            paths = write_report(run.path, target, max_per_step=max_per_step, run=run)
        except OSError as exc:
            raise ConfigError(f"could not write the report of {str(run.path)!r}: {exc}") from None
        _print_run(console, run, paths)
    if len(runs) > 1:
        _print_comparison(console, runs)
    return 0


def _console() -> Any:

    console = make_console()
    console.width = max(console.width, 120)
    return console


def _out_names(names: list[str]) -> list[str]:
    """A folder name per run under ``--out``: its directory's name, numbered when two runs share one."""
    return [name if names.count(name) == 1 else f"{name}-{i + 1}" for i, name in enumerate(names)]


def _by_step(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: row["step"] if type(row.get("step")) is int else -1)


def _summary(metrics: Sequence[dict[str, Any]]) -> str:
    """One line: the steps, and the first and last reward and accuracy (or loss, for a run without reward)."""
    from retool.report import series

    steps = sorted({row["step"] for row in metrics if type(row.get("step")) is int})
    parts = [f"training: {len(steps)} steps" + (f" ({steps[0]}..{steps[-1]})" if steps else "")]
    keys = {"reward/mean": "reward", "reward/correct": "accuracy"}
    for key, label in keys.items() if series(metrics, "reward/mean") else [("train/loss", "loss")]:
        if points := series(metrics, key):
            parts.append(f"{label} {points[0][1]:.3f} -> {points[-1][1]:.3f}")
    return "; ".join(parts)


def _print_run(console: Any, run: Any, paths: list[Path]) -> None:
    from rich.markup import escape

    from retool.tables import evaluation_table

    console.print(f"[bold]{escape(run.name)}[/] ({escape(str(run.path))})", soft_wrap=True)
    if run.evaluation:
        console.print(evaluation_table(_by_step(run.evaluation), f"evaluation of {escape(run.name)}"))
    if run.metrics:
        console.print(_summary(run.metrics), markup=False, soft_wrap=True)
    for path in paths:
        console.print(f"wrote {path}", markup=False, soft_wrap=True)


def _print_comparison(console: Any, runs: list[Any]) -> None:
    """Every evaluation of every run, in the order the runs were given, with the paper's metrics.

    For the stages of one pipeline (``retool report runs/x/sft runs/x/grpo``) the rows read as the
    before/after table: the SFT run's step 0 (before SFT), its last evaluation (after SFT), the RL run's last
    (after RL).
    """
    from retool.tables import evaluation_table

    pairs = [(run.name, row) for run in runs for row in _by_step(run.evaluation)]
    title = "held-out evaluations across the runs (greedy; in the order given)"
    console.print(evaluation_table([row for _, row in pairs], title, run_names=[name for name, _ in pairs]))
