"""``retool fit`` and ``retool validate``: one set-up path from a parsed recipe to a Trainer and a run directory.

One file, because both commands must build a run the same way: instantiate and check the recipe, make the run
directory, build the loggers, callbacks and Trainer, then fit or evaluate and print what happened. Split, the
two commands' set-ups would drift apart (a check one makes and the other skips); the parts that stand alone
(recipe parsing, resume, the tables) already live in ``recipe.py``, ``resume.py`` and ``retool.tables``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as md
from pathlib import Path
from typing import Any

from retool import plugins as plugin_registry
from retool.cli import _common
from retool.cli._common import RECIPE_ERRORS, ConfigError, innermost, print_error, root_cause, wants_help
from retool.cli._common import console as make_console
from retool.cli.recipe import ParsedRecipe, build_parser, parse_recipe, trainer_help
from retool.cli.resume import (
    Resume,
    changed_options,
    cut_run_files,
    cut_tensorboard,
    find_resume,
    read_csv_rows,
    resume_arguments,
    split_resume,
)
from retool.plugins import PluginInfo


@dataclass(frozen=True)
class RunSetup:
    """A run built from a recipe: its components, the Trainer that runs them, and where it writes.

    Args:
        algorithm: The algorithm, its policy, rollout, executor and reward injected.
        data: The data module.
        trainer: The Lightning Trainer, with retool's callbacks and loggers.
        run_dir: The run directory (recipe, versions, logs, metrics, checkpoints, the exported policy).
        table: The live step table (it keeps every step's metrics and every evaluation).
        artifacts: The callback that writes the run directory's files and exports the policy.
        evaluates: Whether the run evaluates on held-out problems (the data has them and the recipe asks).
        console: Where the run prints.
    """

    algorithm: Any
    data: Any
    trainer: Any
    run_dir: Path
    table: Any
    artifacts: Any
    evaluates: bool
    console: Any


def cmd_fit(args: list[str], blocked: Sequence[str]) -> int:
    """``retool fit``: train with a recipe; 0 when it finished, 130 when interrupted (Ctrl-C), 128 + the signal's
    number when a signal stopped it at the end of a step (130 for SIGINT, 143 for SIGTERM)."""
    found = plugin_registry.discover(blocked)
    if wants_help(args):
        build_parser("retool fit").print_help()
        return 0
    if "--trainer.help" in args:
        print(trainer_help("retool fit"))
        return 0
    if any(arg.endswith(".help") for arg in args):  # --algorithm.help GRPO: a plugin's options, no recipe needed
        try:
            build_parser("retool fit").parse_args(args)
        except SystemExit as exc:
            return int(exc.code or 0)
    resume_dir, allow_changes, args = split_resume(args)
    resume = find_resume(resume_dir) if resume_dir is not None else None
    if resume is not None:
        args = resume_arguments(resume, args)
    try:
        parsed = parse_recipe(args, found, "retool fit")
    except SystemExit as exc:  # --print_config printed the resolved recipe
        return int(exc.code or 0)
    if resume is not None:
        saved = parse_recipe(resume_arguments(resume, []), found, "retool fit")
        changed = changed_options(saved.config.as_dict(), parsed.config.as_dict())
        if changed and not allow_changes:
            raise ConfigError(
                f"resuming {resume.run_dir} with changed options: {', '.join(changed)}; a resumed run continues "
                "the one it saved (add --allow_changes to continue with them anyway)"
            )
    return _fit(setup_run(parsed, found, "fit", resume=resume), parsed, resume)


def cmd_validate(args: list[str], blocked: Sequence[str]) -> int:
    """``retool validate``: evaluate a policy on a recipe's held-out problems.

    ``--ckpt_path`` takes a Hugging Face folder (a run's ``policy/``) or a Lightning checkpoint (``.ckpt``);
    without it the recipe's own policy is evaluated. ``--data.eval_sets '[aime24, aime25]'`` picks the sets
    (each with the data's ``eval_protocol``, or its own), and ``--limit N`` evaluates the first N problems
    of each (``data.eval_limit``).
    """
    found = plugin_registry.discover(blocked)
    if wants_help(args):
        build_parser("retool validate", "Evaluate a policy on a recipe's held-out problems.").print_help()
        print("\n  --limit N             Evaluate at most N problems of each evaluation set (data.eval_limit).")
        return 0
    args = _limit_option(args)
    if "--trainer.help" in args:
        print(trainer_help("retool validate"))
        return 0
    try:
        parsed = parse_recipe(args, found, "retool validate")
    except SystemExit as exc:
        return int(exc.code or 0)
    cfg = parsed.config
    ckpt = cfg.ckpt_path
    if ckpt is not None:
        path = Path(ckpt)
        if path.is_dir():  # an exported policy: evaluate it as the recipe's policy
            cfg.policy.name_or_path = str(path)
            cfg.ckpt_path = ckpt = None
        elif not path.is_file():
            raise ConfigError(f"--ckpt_path {ckpt!r} is neither a policy folder nor a checkpoint file")
    run = setup_run(parsed, found, "validate")
    run.console.print(f"[bold]retool validate[/] {parsed.path} ({cfg.policy.name_or_path}) -> [cyan]{run.run_dir}[/]")
    from retool.policy import PolicyLoadError

    try:
        validate_all(run, ckpt_path=ckpt)
    except PolicyLoadError as exc:
        print_error(str(exc))
        return 1
    finally:
        run.algorithm.close_resources()
    _print_evaluations(run)
    run.console.print(f"run directory: [cyan]{run.run_dir}[/]")
    return 0


def _limit_option(args: list[str]) -> list[str]:
    """``--limit N`` (or ``--limit=N``) as the data option it stands for, ``--data.init_args.eval_limit N``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        name, equals, value = args[i].partition("=")
        if name == "--limit":
            if not equals:
                if i + 1 >= len(args):
                    raise ConfigError("--limit takes a number of problems per evaluation set")
                value = args[i + 1]
                i += 1
            out += ["--data.init_args.eval_limit", value]
        else:
            out.append(args[i])
        i += 1
    return out


def setup_run(
    parsed: ParsedRecipe, found: Sequence[PluginInfo], command: str, resume: Resume | None = None
) -> RunSetup:
    """Instantiate a parsed recipe, check it, and build its run directory and Trainer (fit and validate).

    Everything that can fail on the recipe (a plugin's own check of its values, a missing data file, a
    missing policy) fails here, as a :class:`ConfigError`, before the run directory is made or weights load.
    """
    from retool.policy import PolicyLoadError

    _quiet_lightning()
    cfg = parsed.config
    try:
        init = parsed.parser.instantiate(cfg)
        if command == "validate":
            init.algorithm.eval_at_start = True  # what validate does: an algorithm checks what evaluation needs
        init.algorithm.check_components()
        if command == "fit":  # a missing file or a dataset without traces for SFT fails here, before any weights load
            train_on = init.algorithm.train_on
            items = init.data.traces("train") if train_on == "traces" else init.data.problems("train")
            if not items:
                raise ValueError(f"{type(init.data).__name__} has no training {train_on}")
        evaluates = bool(init.data.problems("val")) if _evaluates(init.algorithm) else False
        if init.policy is not None:
            init.policy.check()  # a missing folder or model package: before the run directory exists
    except PolicyLoadError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:
        cause = innermost(exc)
        if _common.DEBUG or not isinstance(cause, RECIPE_ERRORS):
            # A bug in a plugin's constructor or data loading, not a recipe value: its own traceback follows
            # (not jsonargparse's wrapper around it).
            print_error(f"setting up the run failed: {root_cause(exc)} (the traceback follows)")
            raise cause from None
        # A plugin's __init__ rejected a value: show its own message, not the wrapper's.
        raise ConfigError(f"invalid recipe value: {root_cause(exc)}") from None
    if command == "validate" and not evaluates:
        raise ConfigError(f"the data section ({type(init.data).__name__}) has no val problems to evaluate on")
    run_dir = _make_run_dir(parsed, found, command)
    return _build_trainer(init, run_dir, evaluates, command, cfg, resume)


RUN_DIR_VARIABLE = "RETOOL_RUN_DIR"
"""Where the launching process tells the processes it starts (``trainer.devices`` > 1) which run directory the
run writes to: the default name holds the time, which the processes would each read differently."""


def launched_as_rank_zero() -> bool:
    """Whether this process is the run's first (global rank 0), from the variables launchers set: Lightning's
    own (``LOCAL_RANK``, ``NODE_RANK``), torchrun's (``RANK``) and SLURM's (``SLURM_PROCID``)."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _make_run_dir(parsed: ParsedRecipe, found: Sequence[PluginInfo], command: str) -> Path:
    """The run directory, with the resolved recipe, the package versions and the seed written into it.

    Only the first process writes; the others take the directory it chose when it started them.
    """
    import lightning as L

    cfg = parsed.config
    default_name = parsed.path.stem if command == "fit" else f"validate-{parsed.path.stem}"
    first = launched_as_rank_zero()
    chosen = cfg.run_dir or (None if first else os.environ.get(RUN_DIR_VARIABLE))
    run_dir = Path(chosen or Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    L.seed_everything(cfg.seed_everything, workers=True, verbose=False)
    if not first:
        return run_dir
    os.environ[RUN_DIR_VARIABLE] = str(run_dir.resolve())  # read by the processes trainer.fit starts
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = cfg.clone()
    for key in ("print_config", "recipe"):
        if key in saved:
            del saved[key]
    saved.run_dir = None  # a rerun of the saved recipe must not write into this run's directory
    (run_dir / "recipe.yaml").write_text(parsed.parser.dump(saved), encoding="utf-8")
    (run_dir / "versions.json").write_text(json.dumps(_versions(found), indent=2) + "\n", encoding="utf-8")
    (run_dir / "seed.txt").write_text(f"{cfg.seed_everything}\n", encoding="utf-8")
    return run_dir


def _build_trainer(
    init: Any, run_dir: Path, evaluates: bool, command: str, cfg: Any, resume: Resume | None
) -> RunSetup:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from retool.callbacks import RunArtifacts, RunCheckpoints, StepTable

    console = make_console(quiet=not launched_as_rank_zero())  # one process speaks for the run
    trainer_kwargs = dict(init.trainer)
    callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    table = StepTable(console)
    artifacts = RunArtifacts(run_dir)
    callbacks += [table, artifacts]
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):  # a recipe's own ModelCheckpoint is left alone
        if command == "fit" and trainer_kwargs.get("enable_checkpointing") is not False and cfg.checkpoint_every > 0:
            callbacks.append(RunCheckpoints(run_dir, every=cfg.checkpoint_every, keep=max(cfg.keep_checkpoints, 1)))
        else:
            # checkpoint_every 0 means none: without this, Lightning adds its own ModelCheckpoint, which saves
            # weights and optimizer state (1.6 GB for SmolLM2-135M) under the first logger's folder.
            trainer_kwargs["enable_checkpointing"] = False
    if resume is not None:  # Lightning's warnings about a folder that has files: a resumed run means to continue them
        for folder in ("Experiment logs directory", "Checkpoint directory"):
            warnings.filterwarnings("ignore", message=f"{folder} .* exists and is not empty")
    extra_loggers = _recipe_loggers(cfg.trainer.get("logger"), run_dir)
    if extra_loggers or trainer_kwargs.get("logger") in (None, True):
        header, rows = read_csv_rows(run_dir, resume.step) if resume is not None else ([], [])
        csv_logger = CSVLogger(save_dir=run_dir, name="csv", version="")
        if rows and launched_as_rank_zero():
            # Lightning's CSV logger starts its table afresh in a folder that has one: put back the resumed
            # run's rows up to its checkpoint, which later rows are appended to.
            _ = csv_logger.experiment  # created now, and the old file with it deleted
            csv_logger.experiment.metrics_keys = list(header)
            with open(csv_logger.experiment.metrics_file_path, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)
        trainer_kwargs["logger"] = [
            csv_logger,
            TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""),
            *extra_loggers,
        ]
    trainer_kwargs["default_root_dir"] = str(run_dir)
    if trainer_kwargs.get("log_every_n_steps") is None:
        trainer_kwargs["log_every_n_steps"] = 1  # one RL step is expensive: log every one
    trainer_kwargs["enable_progress_bar"] = True
    trainer_kwargs["enable_model_summary"] = False
    trainer_kwargs["num_sanity_val_steps"] = 0  # evaluation rolls out whole problems: never as a "sanity check"
    # The data module gives each process its share of every global batch itself (retool.data.RankBatches):
    # Lightning's DistributedSampler would shard differently, and pad the held-out problems with repeats.
    trainer_kwargs["use_distributed_sampler"] = False
    every = init.algorithm.eval_every
    if evaluates and every > 0:  # evaluate every N steps, counted across epochs
        trainer_kwargs["val_check_interval"] = every
        trainer_kwargs["check_val_every_n_epoch"] = None
    elif command == "fit":
        trainer_kwargs["limit_val_batches"] = 0  # evaluation runs only where the CLI asks (start, end)
    try:
        trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs)
    except Exception as exc:  # a strategy this machine cannot run, devices it does not have: before any weights load
        if _common.DEBUG:
            raise
        raise ConfigError(f"invalid trainer section: {strategy_advice(root_cause(exc), trainer_kwargs)}") from None
    _check_strategy(trainer)
    try:  # before the processes start and any weights load
        init.algorithm.check_strategy(trainer.strategy)
    except ValueError as exc:
        raise ConfigError(f"invalid trainer section: {exc}") from None
    return RunSetup(init.algorithm, init.data, trainer, run_dir, table, artifacts, evaluates, console)


def _recipe_loggers(spec: Any, run_dir: Path) -> list[Any]:
    """The loggers a recipe's ``trainer.logger`` names (one or a list of ``class_path``/``init_args``), built here
    rather than by the parser so that a ``save_dir`` left at its default goes into the run directory; retool's
    CSV and TensorBoard loggers stay beside them. ``None``, ``True`` and ``False`` name none."""
    if spec is None or isinstance(spec, bool):
        return []
    import importlib
    import inspect

    loggers = []
    for one in spec if isinstance(spec, list) else [spec]:
        one = one.as_dict() if hasattr(one, "as_dict") else dict(one)
        module, _, name = str(one["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        options = dict(one.get("init_args") or {})
        parameters = inspect.signature(cls.__init__).parameters
        for key in ("save_dir", "root_dir"):  # where each of Lightning's loggers writes its files
            if key in parameters and options.get(key) in (None, ".", "./"):
                options[key] = str(run_dir)
        # The parser filled in the options of the logger's **kwargs (wandb.init's) as None: leave those out.
        loggers.append(cls(**{k: v for k, v in options.items() if k in parameters or v is not None}))
    return loggers


def strategy_advice(message: str, trainer_kwargs: dict[str, Any]) -> str:
    """Lightning's refusal of a strategy, with what to use instead on this machine."""
    strategy = str(trainer_kwargs.get("strategy", "auto"))
    if strategy.startswith(("fsdp", "deepspeed")) and ("GPU" in message or "CUDA" in message):
        return f"{message.rstrip('.')}. {SHARDED_ADVICE}"
    return message


SHARDED_ADVICE = (
    "retool's strategies are ddp (every process holds the model), fsdp2 (FSDP2: parameters, gradients and "
    "optimizer state sharded) and deepspeed_stage_2 / deepspeed_stage_3 (DeepSpeed ZeRO, one trained module); "
    "all run on CPU too (see the docs page 'Many processes')"
)


def _check_strategy(trainer: Any) -> None:
    """Refuse the strategies retool's step cannot run: those that start their processes by spawning
    (``ddp_spawn``, ``ddp_notebook``: the processes would train, but the run's files, summary and export would
    stay in the ones that end with them), and Lightning's sharded ones that wrap the model in a way the
    rollout, clipping and export do not know (FSDP1's ``fsdp``; ``deepspeed_*`` other than retool's)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    strategy = trainer.strategy
    sharded = isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy))
    if sharded and not hasattr(strategy, "shard_module"):
        raise ConfigError(f"invalid trainer section: {type(strategy).__name__} is not one of {SHARDED_ADVICE}")
    if isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher):
        raise ConfigError(
            "invalid trainer section: retool runs its processes as scripts; use strategy: ddp instead of "
            f"{type(trainer.strategy).__name__} with the {trainer.strategy.launcher._start_method!r} start method"
        )


def _fit(run: RunSetup, parsed: ParsedRecipe, resume: Resume | None = None) -> int:
    from retool.callbacks import RunStopped, stopped_by_signal
    from retool.policy import PolicyLoadError

    algorithm, trainer, console = run.algorithm, run.trainer, run.console
    stopped: RunStopped | None = None
    # One module goes through up to three stages (evaluate, train, evaluate): its executor, reward workers and
    # rollout engine stay open across them and are closed once, at the end, however the run ends.
    algorithm.keep_resources_open = True
    console.print(f"[bold]retool fit[/] {parsed.path} -> run directory [cyan]{run.run_dir}[/]")
    if resume is not None:
        if launched_as_rank_zero():  # the steps after the checkpoint are taken again: their rows go
            cut_run_files(resume.run_dir, resume.step)
            cut_tensorboard(resume.run_dir, resume.step)
        console.print(f"resuming after step {resume.step} from [cyan]{resume.checkpoint}[/]")
    try:
        if run.evaluates and algorithm.eval_at_start and not parsed.config.ckpt_path:  # a resumed run evaluated
            validate_all(run)
        trainer.fit(algorithm, datamodule=run.data, ckpt_path=parsed.config.ckpt_path)
        stopped = stopped_by_signal(trainer)
        last = run.table.evaluations[-1].step if run.table.evaluations else None
        if run.evaluates and not trainer.interrupted and stopped is None and last != trainer.global_step:
            validate_all(run)  # the "after" row of the run
    except PolicyLoadError as exc:
        print_error(str(exc))
        return 1
    except SystemExit:
        # Lightning shuts down gracefully on Ctrl-C, then exits; finish our report before we do.
        if not trainer.interrupted:
            raise
    finally:
        algorithm.close_resources()
    if run.table.history:
        console.print(run.table.summary())
    _print_evaluations(run)
    if stopped is not None:  # a signal, at the end of a step: 128 + its number, as a shell reports it
        # soft_wrap: paths stay whole, to be copied
        console.print(f"[yellow]{stopped}; checkpoint: {stopped.checkpoint}[/]", soft_wrap=True)
        console.print(f"continue with: [cyan]retool fit --resume {run.run_dir}[/]", soft_wrap=True)
        return 128 + stopped.signum
    if trainer.interrupted:
        exported = run.artifacts.exported
        where = f"; the policy as it was is in {exported}" if exported else ""
        console.print(f"[yellow]interrupted after {trainer.global_step} steps{where}[/]")
        console.print(f"run directory: {run.run_dir}")
        return 130
    if run.artifacts.exported:
        console.print(f"policy (Hugging Face format): [cyan]{run.artifacts.exported}[/]")
    console.print(f"run directory: [cyan]{run.run_dir}[/]")
    return 0


def validate_all(run: RunSetup, ckpt_path: str | None = None) -> None:
    """``trainer.validate`` over every val problem (a fit may have set ``limit_val_batches`` to 0)."""
    trainer = run.trainer
    saved = trainer.limit_val_batches
    trainer.limit_val_batches = 1.0
    try:
        trainer.validate(run.algorithm, datamodule=run.data, ckpt_path=ckpt_path, verbose=False)
    finally:
        trainer.limit_val_batches = saved


def _print_evaluations(run: RunSetup) -> None:
    from retool.tables import eval_set_names, eval_sets_table, evaluation_table

    if run.table.evaluations:
        rows = [record.row() for record in run.table.evaluations]
        if not eval_set_names(rows[-1]):
            run.console.print(evaluation_table(rows, "evaluation on held-out problems (greedy)"))
            return
        for row in rows:  # named sets, each with its own protocol: one line per set
            title = f"evaluation at step {int(row['step'])}, by set (accuracy: greedy; avg@n, pass@k: sampled)"
            run.console.print(eval_sets_table(row, title))


def _versions(found: Sequence[PluginInfo]) -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("retool", "torch", "transformers", "lightning", "jsonargparse", "math-verify", "vllm", "deepspeed"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    for p in found:
        versions.setdefault(p.package, p.version)
    return versions


def _evaluates(algorithm: Any) -> bool:
    return bool(algorithm.eval_every or algorithm.eval_at_start)


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    """Drop lines of Lightning's that say nothing about the run: an advertisement, a deprecation of its own, and
    advice for checkpoints of manual optimization that retool's already follow."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvert())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # A checkpoint holds the state after its step's update, by design: it is where a resumed run goes on from.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
