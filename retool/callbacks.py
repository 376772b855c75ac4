"""What a run shows and keeps: a rich progress bar with one table row per RL step, and the run directory's
files (per-step metrics, a readable sample of trajectories, the exported policy).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from retool.tables import STEP_COLUMNS, eval_set_names, format_value
from retool.types import EvalRecord, StepRecord


class StepTable(ProgressBar):
    """A rich progress bar over RL steps and, after each step, one row of the numbers that matter.

    Columns: ``reward`` mean reward; ``acc`` share of correct answers; ``tokens`` tokens the model wrote per
    trajectory; ``calls`` code cells per trajectory; ``cell ok`` share of cells that ran without error; the
    step's wall time split into ``gen s`` (decoding), ``tool s`` (waiting for cells while nothing could
    decode) and ``upd s`` (the update); ``tok/s`` decoding throughput.
    """

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self.console = console or Console()
        self.history: list[dict[str, float]] = []
        self._progress: Progress | None = None
        self._task: Any = None
        self._enabled = True
        self.columns: list[tuple[str, str, str]] = list(STEP_COLUMNS)
        self.evaluations: list[EvalRecord] = []

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    @property
    def _widths(self) -> list[int]:
        return [max(len(h), 6) for h, _, _ in self.columns]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.columns = list(getattr(pl_module, "table_columns", STEP_COLUMNS))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record: EvalRecord | None = getattr(pl_module, "last_evaluation", None)
        if record is None or (self.evaluations and self.evaluations[-1] is record):
            return
        self.evaluations.append(record)
        if not self.is_enabled:
            return
        result = record.metrics
        parts = [f"[bold]eval[/] at step {record.step}: accuracy {result['eval/accuracy']:.3f}"]
        names = eval_set_names(result)
        if names:  # named sets, each with its protocol: their headline numbers
            for name in names:
                mine = {k.split("/")[2]: v for k, v in result.items() if k.startswith(f"eval/{name}/")}
                shown = [f"{k} {v:.3f}" for k, v in mine.items() if k == "accuracy" or k.startswith("avg@")]
                parts.append(f"{name}: {' '.join(shown)} ({mine['problems']:.0f} problems)")
        else:
            parts += [f"{k[5:]} {v:.3f}" for k, v in result.items() if k.startswith(("eval/avg@", "eval/pass@"))]
            parts += [
                f"code ratio {result['eval/code_ratio']:.2f}",
                f"cell ok {result['eval/cell_ok']:.2f}",
                f"tokens {result['eval/model_tokens']:.0f}",
                f"({result['eval/problems']:.0f} problems)",
            ]
        console = self._progress.console if self._progress is not None else self.console
        console.print(", ".join(parts), soft_wrap=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._progress = Progress(
            TextColumn("[bold]RL steps"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("steps", total=total)
        header = "  ".join(["step".rjust(5)] + [h.rjust(w) for (h, _, _), w in zip(self.columns, self._widths)])
        self._progress.console.print(f"[bold]{header}", soft_wrap=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record: StepRecord | None = getattr(pl_module, "last_step", None)
        metrics = record.metrics if record is not None else {}
        self.history.append(dict(metrics))
        if not self.is_enabled or self._progress is None:
            return
        cells = [format_value(metrics.get(key), f).rjust(w) for (_, key, f), w in zip(self.columns, self._widths)]
        self._progress.console.print("  ".join([str(trainer.global_step).rjust(5), *cells]), soft_wrap=True)
        self._progress.update(self._task, completed=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self) -> Table:
        """A table of the run: first step, last step and the mean over all steps for each column."""
        table = Table(title="run summary", title_justify="left")
        table.add_column("metric")
        for name in ("first step", "last step", "mean"):
            table.add_column(name, justify="right")
        for header, key, fmt in self.columns:
            values = [h[key] for h in self.history if key in h]
            if not values:
                continue
            mean = sum(values) / len(values)
            table.add_row(header, format_value(values[0], fmt), format_value(values[-1], fmt), format_value(mean, fmt))
        return table


class RunArtifacts(Callback):
    """Writes the run directory's per-step files and exports the policy when the run ends.

    Files: ``metrics.jsonl`` (every logged number, one line per step), ``trajectories.jsonl`` (a sample of
    trajectories per step: prompt, the text with code and interpreter output, reward), ``evaluation.jsonl``
    (one line per evaluation on held-out problems) with ``eval_trajectories.jsonl`` (its greedy answers),
    and ``policy/`` (the final policy in Hugging Face format). If the run fails after at least one step, or is
    interrupted at once (a second Ctrl-C, or the first where it keeps no checkpoints), the policy as it is at
    that moment (possibly partway through a step's updates) is exported to ``policy-interrupted/`` so no
    finished work is lost.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.exported: Path | None = None
        self._last_written: EvalRecord | None = None

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record: StepRecord | None = getattr(pl_module, "last_step", None)
        if record is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": record.step, **record.metrics}) + "\n")
        with open(self.run_dir / "trajectories.jsonl", "a", encoding="utf-8") as f:
            for sample in record.samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record: EvalRecord | None = getattr(pl_module, "last_evaluation", None)
        if record is None or record is self._last_written or trainer.sanity_checking:
            return
        self._last_written = record
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "evaluation.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record.row()) + "\n")
        with open(self.run_dir / "eval_trajectories.jsonl", "a", encoding="utf-8") as f:
            for sample in record.samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank exports (a sharded policy is gathered from all of them); rank 0 writes. Not a run a signal
        # stopped: it has a checkpoint to go on from, is not finished, and may have little time left.
        if getattr(pl_module, "model", None) is not None and not trainer.interrupted and not stopped_by_signal(trainer):
            exported = pl_module.export(self.run_dir / "policy")  # type: ignore[operator]
            self.exported = exported if trainer.is_global_zero else None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if getattr(pl_module, "model", None) is None or trainer.global_step == 0:
            return
        if getattr(pl_module, "shards_parameters", False):
            # Gathering the shards needs every rank, and after a failure some may be gone or stuck elsewhere.
            rank_zero_warn(
                "the policy is sharded among the processes and cannot be gathered after a failure; "
                "no policy-interrupted/ is written (resume from a checkpoint instead)"
            )
            return
        if trainer.is_global_zero:
            self.exported = pl_module.export(self.run_dir / "policy-interrupted")  # type: ignore[operator]


@dataclass(frozen=True)
class RunStopped:
    """How a run that a signal (Ctrl-C's SIGINT, a scheduler's SIGTERM) stopped at the end of a step ended: the
    signal, the step, and the checkpoint of that step that ``retool fit --resume`` continues from."""

    signum: int
    step: int
    checkpoint: str | None

    def __str__(self) -> str:
        return f"stopped on {signal.Signals(self.signum).name} after step {self.step}"


class RunCheckpoints(ModelCheckpoint):
    """Resumable checkpoints in the run directory: every ``every`` steps and at the end, the newest ``keep`` kept.

    Each is ``checkpoints/step=N.ckpt`` (``last.ckpt`` links to the newest), the whole state a run continues
    from (``retool fit --resume RUN_DIR``):
    weights and optimizers, the step, the data position, every random stream. Each file is written to a
    temporary name and renamed, so a run killed while writing leaves the previous ones intact.

    While the run trains, SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption notice) stop it at the end of the
    step under way (its metrics logged, an evaluation due after it run), with a checkpoint of that step
    (:attr:`stopped`, a :class:`RunStopped`); a second Ctrl-C stops it at once, as
    an interrupted run without a checkpoint. Every process decides together: one signalled process stops all.
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run_dir: str | Path, every: int, keep: int) -> None:
        super().__init__(
            dirpath=Path(run_dir) / "checkpoints",
            filename="step={step}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_top_k=-1,  # the pruning is ours (see _prune): it also sees the files of the run this one resumes
            save_last="link",  # last.ckpt, a link to the newest: Lightning's name for --ckpt_path
            enable_version_counter=False,  # a resumed run relinks last.ckpt (and retakes a step's name)
            monitor="step",
            mode="max",
            save_on_train_epoch_end=False,
        )
        self.keep = keep
        self.stop_signal: int | None = None
        self.stopped: RunStopped | None = None
        self._handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # After Lightning's own SIGTERM handler is in place (it would stop the run without a checkpoint, and
        # broadcasts from inside the handler, which a process busy in another collective can deadlock on).
        if threading.current_thread() is threading.main_thread():
            self.stop_signal = None
            for signum in self.STOP_SIGNALS:
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            if self._rank_zero:
                sys.stderr.write(
                    f"\n{signal.Signals(signum).name}: stopping at the end of this step with a checkpoint "
                    f"(then: retool fit --resume {Path(self.dirpath or '.').parent}); Ctrl-C again stops now "
                    "without one\n"
                )
                sys.stderr.flush()
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now (Lightning's interrupted run)

    @property
    def _rank_zero(self) -> bool:
        return rank_zero_only.rank == 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = self.stop_signal is not None
        if trainer.world_size > 1:  # every step, so that all processes stop at the same one
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the last step: the run ends as a finished one
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        # Lightning ends the fit after this step as after its last: the step's metrics reach the loggers, and an
        # evaluation due after it runs (a resumed run would skip it).
        trainer.should_stop = True
        self.stopped = RunStopped(self.stop_signal or signal.SIGTERM, trainer.global_step, self._last_checkpoint_saved)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Written under a temporary name in the same folder, then renamed: a name step=N.ckpt is a whole
        # checkpoint. (Lightning's own transaction writes a temporary file elsewhere and copies it over: not
        # atomic.) Under a sharding strategy the checkpoint is a folder that every process writes its shards
        # into (a shared file system, as for any multi-node checkpoint); its rename waits for all of them.
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        trainer.strategy.barrier("retool-checkpoint-written")
        if trainer.is_global_zero:
            _remove(Path(filepath))  # a resumed run retaking a step's name
            os.replace(partial, filepath)
            self._prune(Path(filepath).parent)
        trainer.strategy.barrier("retool-checkpoint")
        self._last_checkpoint_saved = filepath

    def _prune(self, folder: Path) -> None:
        """Keep the newest ``keep`` checkpoints of the folder (a resumed run's included); drop what a killed write
        left half done."""
        saved = sorted((p for p in folder.glob("step=*.ckpt") if checkpoint_step(p) >= 0), key=checkpoint_step)
        for old in saved[: -self.keep]:
            _remove(old)
        for left in folder.glob("*.partial"):
            _remove(left)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before Lightning's own end-of-training save, which, where this process has saved nothing yet (a run
        # shorter than checkpoint_every, a resumed one), would write a whole file as last.ckpt and no step=N.ckpt.
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step and not trainer.interrupted:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)  # last.ckpt follows
        super().on_train_end(trainer, pl_module)


def stopped_by_signal(trainer: L.Trainer) -> RunStopped | None:
    """How a signal stopped ``trainer``'s fit (see :class:`RunCheckpoints`), or ``None`` if none did."""
    return next((c.stopped for c in trainer.callbacks if isinstance(c, RunCheckpoints) and c.stopped), None)


def _remove(path: Path) -> None:
    """Delete a checkpoint: a file, or a sharded checkpoint's folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sharded_checkpoint_complete(path: Path) -> bool:
    """Whether the folder ``path`` is a whole sharded checkpoint: PyTorch's distributed checkpoint (FSDP2)
    writes its index ``.metadata`` after every shard, and Lightning its ``meta.pt`` after that; DeepSpeed
    writes ``latest`` after every process has saved."""
    return ((path / ".metadata").is_file() and (path / "meta.pt").is_file()) or (path / "latest").is_file()


def checkpoint_step(path: Path) -> int:
    """The step of ``checkpoints/step=N.ckpt`` (-1 for a name that is not one)."""
    stem = path.stem
    return int(stem.split("=", 1)[1]) if stem.startswith("step=") and stem.split("=", 1)[1].isdigit() else -1
