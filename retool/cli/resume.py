"""``retool fit --resume RUN_DIR``: continue a run from its newest checkpoint, in its own directory.

The run's saved recipe is the recipe; command-line overrides may extend it (``--trainer.max_steps``) but not
change what the run computes unless ``--allow_changes`` says so. The per-step files are cut back to the
checkpoint's step before training goes on, so that a step written after the checkpoint, by the run that was
killed, is neither lost nor written twice: it is taken again.
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retool.callbacks import checkpoint_step, sharded_checkpoint_complete
from retool.cli._common import ConfigError

EXTENDS = ("trainer.max_steps", "checkpoint_every", "keep_checkpoints")
"""Options an override may change on resume without ``--allow_changes``: they say how long or how the run is
kept, not what a step computes."""

STEP_FILES = ("metrics.jsonl", "trajectories.jsonl", "evaluation.jsonl", "eval_trajectories.jsonl")


@dataclass(frozen=True)
class Resume:
    """What ``--resume`` found: the run directory, its newest complete checkpoint and that checkpoint's step."""

    run_dir: Path
    checkpoint: Path
    step: int


def split_resume(args: Sequence[str]) -> tuple[Path | None, bool, list[str]]:
    """(``--resume``'s run directory or ``None``, whether ``--allow_changes`` was given, the other arguments)."""
    run_dir: Path | None = None
    allow = False
    rest: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg == "--resume":
            if i + 1 >= len(items):
                raise ConfigError("--resume needs the run directory to continue (e.g. --resume runs/my-run)")
            run_dir, i = Path(items[i + 1]), i + 2
            continue
        if arg.startswith("--resume="):
            run_dir = Path(arg.split("=", 1)[1])
        elif arg == "--allow_changes":
            allow = True
        else:
            rest.append(arg)
        i += 1
    if allow and run_dir is None:
        raise ConfigError("--allow_changes goes with --resume RUN_DIR")
    return run_dir, allow, rest


def find_resume(run_dir: Path) -> Resume:
    """The newest complete checkpoint of ``run_dir``; a clear :class:`ConfigError` when there is none."""
    if not (run_dir / "recipe.yaml").is_file():
        raise ConfigError(f"--resume {str(run_dir)!r} is not a run directory (it has no recipe.yaml)")
    candidates = sorted(
        (p for p in (run_dir / "checkpoints").glob("step=*.ckpt") if checkpoint_step(p) >= 0),
        key=checkpoint_step,
    )
    if not candidates:
        raise ConfigError(
            f"{str(run_dir)!r} has no checkpoint to resume from (checkpoints/step=N.ckpt); a run saves one every "
            "checkpoint_every steps and at its end"
        )
    newest = candidates[-1]
    if not _complete(newest):
        raise ConfigError(
            f"checkpoint {str(newest)!r} is damaged (not a complete file); move it away to resume from the one "
            "before, if there is one. Nothing in the run directory was changed"
        )
    return Resume(run_dir=run_dir, checkpoint=newest, step=checkpoint_step(newest))


def _complete(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint: a ``torch.save`` file is a zip archive whose directory (written
    last) reads back; a sharded one is a folder (see :func:`retool.callbacks.sharded_checkpoint_complete`)."""
    if path.is_dir():
        return sharded_checkpoint_complete(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def resume_arguments(found: Resume, rest: Sequence[str]) -> list[str]:
    """The arguments of a fit that continues ``found``: its recipe, directory and checkpoint, then ``rest``."""
    for flag in ("--recipe", "--run_dir", "--ckpt_path"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in rest):
            raise ConfigError(f"--resume takes the run's own recipe, directory and checkpoint: drop {flag}")
    return [
        "--recipe", str(found.run_dir / "recipe.yaml"), "--run_dir", str(found.run_dir),
        "--ckpt_path", str(found.checkpoint), *rest,
    ]  # fmt: skip


def changed_options(saved: Any, resumed: Any) -> list[str]:
    """The options whose value differs between the saved recipe and the resumed one (dotted names), other
    than those that only extend the run (:data:`EXTENDS`) and the resume's own (``ckpt_path``, ``run_dir``)."""
    a, b = _flatten(saved), _flatten(resumed)
    ignored = set(EXTENDS) | {"ckpt_path", "run_dir", "recipe"}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(tuple(ignored)))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def cut_run_files(run_dir: Path, step: int) -> None:
    """Drop from the run's per-step files (JSON lines, and the CSV logger's table) every row after ``step``."""
    for name in STEP_FILES:
        path = run_dir / name
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(kept), encoding="utf-8")


def _logged_before(logger_step: int, names: Sequence[str], step: int) -> bool:
    """Whether a logger row (Lightning's step, and the metric names it holds) was written before the run's
    ``step``-th checkpoint. Lightning logs RL step k's training numbers at logger step k - 1 and the evaluation
    that follows step k at logger step k."""
    return logger_step < step or (logger_step == step and all(name.startswith("eval/") for name in names))


def read_csv_rows(run_dir: Path, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The CSV logger's header and its rows up to ``step`` (Lightning's logger deletes the file when it starts
    in a directory that has one: the caller writes these back)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        rows = [row for row in reader if not row.get("step") or _logged_before(*_csv_row(row), step)]
        return list(reader.fieldnames or []), rows


def _csv_row(row: dict[str, str]) -> tuple[int, list[str]]:
    """A CSV logger row's step and the names of the metrics it holds."""
    return int(float(row["step"])), [name for name, value in row.items() if value and name not in ("step", "epoch")]


def cut_tensorboard(run_dir: Path, step: int) -> None:
    """Drop from the run's TensorBoard event files every value logged after the ``step``-th checkpoint (the run
    that was stopped may have logged later steps, which the resumed run logs again)."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:  # no TensorBoard, no event files to cut
        return
    for path in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        kept, dropped = [], 0
        for raw in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(raw)
            names = [value.tag for value in event.summary.value]
            if names and not _logged_before(event.step, names, step):
                dropped += 1
            else:
                kept.append(raw)
        if dropped:
            partial = path.with_name(path.name + ".partial")
            with open(partial, "wb") as file:
                writer = RecordWriter(file)
                for raw in kept:
                    writer.write(raw)
                writer.flush()
            os.replace(partial, path)
