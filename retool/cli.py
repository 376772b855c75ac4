"""The ``retool`` command: ``retool fit --recipe recipes/X.yaml [--section.key value ...]``, ``retool validate``,
``retool report``, ``retool traces check``, ``retool plugins`` and ``retool sandbox check``.

A recipe is flat, one section per plugin kind; the core wires the sections together (jsonargparse links the
instantiated policy, rollout, executor and reward into the algorithm), so a user never nests one plugin in
another. Every check that can fail on a typo runs before any model loads, and config errors print one
message that names the fix, never a traceback.
"""

from __future__ import annotations

import difflib
import json
import logging
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from importlib import metadata as md
from pathlib import Path
from typing import Any

import yaml

from retool import plugins as plugin_registry
from retool.plugins import KINDS, PluginError, PluginInfo

SECTIONS = ["seed_everything", "run_dir", "ckpt_path", "trainer", "policy", *KINDS]
COMMANDS = ["fit", "validate", "report", "traces", "plugins", "sandbox"]
USAGE = """usage: retool [-p no:PLUGIN ...] COMMAND ...

commands:
  fit --recipe PATH [--print_config] [--section.key VALUE ...]   train with a recipe
  validate --recipe PATH [--ckpt_path POLICY_OR_CKPT]            evaluate a policy on the recipe's held-out problems
  report RUN_DIR [RUN_DIR ...]                                   draw a run's curves, write its trajectories as HTML
  traces check FILE --executor NAME [--reward NAME]              filter a cold-start set: format, cells, answers
  plugins                                                        list the plugins found
  sandbox check [--executor NAME_OR_CLASS_PATH] [--strict]       show and test the executors' isolation

`retool fit --help` lists every option of every section."""


class ConfigError(Exception):
    """A recipe or command-line problem: printed as one message, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    blocked, args = _take_blocked(args)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "plugins":
            return cmd_plugins(blocked)
        if command == "fit":
            return cmd_fit(rest, blocked)
        if command == "validate":
            return cmd_validate(rest, blocked)
        if command == "sandbox":
            return cmd_sandbox(rest, blocked)
        if command == "report":
            from retool.report import main as report_main

            return report_main(rest)
        if command == "traces":
            from retool.traces import main as traces_main

            return traces_main(rest, blocked)
        raise ConfigError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    except (ConfigError, PluginError) as exc:
        _error(str(exc))
        return 2


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


def _take_blocked(args: list[str]) -> tuple[list[str], list[str]]:
    """Split off ``-p no:NAME`` options (pytest's syntax for blocking a plugin)."""
    blocked, rest, i = [], [], 0
    while i < len(args):
        if args[i] == "-p" and i + 1 < len(args):
            value = args[i + 1]
            if not value.startswith("no:"):
                raise SystemExit(f"error: -p takes no:NAME to block a plugin, got {value!r}")
            blocked.append(value[3:])
            i += 2
            continue
        rest.append(args[i])
        i += 1
    return blocked, rest


# ---- retool plugins -------------------------------------------------------------------------------------


def cmd_plugins(blocked: Sequence[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    found = plugin_registry.discover(blocked)
    table = Table(title="retool plugins")
    for column in ("kind", "name", "class", "package", "version"):
        table.add_column(column)
    for p in found:
        table.add_row(p.kind, p.name, p.class_path, p.package, p.version)
    console = Console()
    console.width = max(console.width, 160)  # class paths are long; never cut them
    console.print(table)
    return 0


# ---- retool sandbox check ---------------------------------------------------------------------------------

SANDBOX_USAGE = "usage: retool sandbox check [--executor NAME_OR_CLASS_PATH] [--strict]"


def cmd_sandbox(args: list[str], blocked: Sequence[str]) -> int:
    """Print each executor's isolation layers and run its self-tests; 1 if an active layer's test failed.

    Without ``--executor`` every discovered executor plugin that implements ``self_check`` is checked; one
    that cannot be created here (a missing key, say) is reported and skipped. ``--strict`` also fails on an
    inactive layer.
    """
    import asyncio

    from rich.console import Console

    if not args or args[0] in ("-h", "--help"):
        print(SANDBOX_USAGE)
        return 0 if args else 2
    if args[0] != "check":
        raise ConfigError(f"unknown sandbox command {args[0]!r}; {SANDBOX_USAGE}")
    named, strict, rest = None, False, args[1:]
    while rest:
        arg = rest.pop(0)
        if arg == "--strict":
            strict = True
        elif arg == "--executor" and rest:
            named = rest.pop(0)
        elif arg.startswith("--executor="):
            named = arg.split("=", 1)[1]
        else:
            raise ConfigError(f"unknown option {arg!r}; {SANDBOX_USAGE}")
    found = plugin_registry.discover(blocked)
    if named is not None:
        plugin_registry.check_class_path("executor", named, found)
        targets = [(named, _executor_class(named, found))]
    else:
        targets = [(p.name, p.cls) for p in found if p.kind == "executor" and _checks_itself(p.cls)]
        if not targets:
            raise ConfigError("no executor plugin implements self_check; name one with --executor")
    console = Console()
    console.width = max(console.width, 160)
    failed = False
    for name, cls in targets:
        try:
            executor = cls()
        except Exception as exc:
            if named is not None:
                raise ConfigError(f"executor {name!r} could not be created: {_root_cause(exc)}") from None
            console.print(f"[yellow]{name}: skipped, it could not be created here: {_root_cause(exc)}[/]")
            continue
        results = asyncio.run(_run_self_check(executor))
        console.print(_check_table(name, results))
        broken = [r.name for r in results if r.active and r.passed is False]
        inactive = [r.name for r in results if not r.active]
        if broken:
            console.print(f"[bold red]{name}: self-test FAILED for {', '.join(broken)}[/]")
        if inactive:
            style = "bold red" if strict else "yellow"
            console.print(f"[{style}]{name}: not active on this machine: {', '.join(inactive)}[/]")
        if not broken and not inactive:
            console.print(f"[green]{name}: every layer is active and held its self-test[/]")
        failed = failed or bool(broken) or (strict and bool(inactive))
    return 1 if failed else 0


def _checks_itself(cls: type) -> bool:
    from retool.executor import Executor

    return getattr(cls, "self_check", None) is not Executor.self_check


def _executor_class(name: str, found: Sequence[PluginInfo]) -> type:
    import importlib

    for plugin in found:
        if plugin.kind == "executor" and plugin.name == name:
            return plugin.cls
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)  # check_class_path has vetted it


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


# ---- retool fit -------------------------------------------------------------------------------------------


def build_parser() -> Any:
    """The jsonargparse parser of a recipe: one section per plugin kind, linked into the algorithm."""
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    from retool.policy import Policy

    parser = ArgumentParser(prog="retool fit", exit_on_error=False, description="Train a policy with a recipe.")
    parser.add_argument("--recipe", action=ActionConfigFile, help="Path to a YAML recipe.")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed of every RNG (Lightning).")
    parser.add_argument("--run_dir", type=str | None, default=None, help="Run directory (default: runs/NAME-TIME).")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint to resume from.")
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.add_class_arguments(Policy, "policy")
    parser.add_subclass_arguments(KINDS["algorithm"], "algorithm", required=True)
    parser.add_subclass_arguments(KINDS["rollout"], "rollout", required=False)
    parser.add_subclass_arguments(KINDS["executor"], "executor", required=False)
    parser.add_subclass_arguments(KINDS["reward"], "reward", required=False)
    parser.add_subclass_arguments(KINDS["data"], "data", required=True)
    for section in ("policy", "rollout", "executor", "reward"):
        parser.link_arguments(section, f"algorithm.init_args.{section}", apply_on="instantiate")
    return parser


def _recipe_path(args: Sequence[str]) -> Path | None:
    for i, arg in enumerate(args):
        if arg == "--recipe" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--recipe="):
            return Path(arg.split("=", 1)[1])
    return None


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a recipe file; a missing file or a YAML error becomes a :class:`ConfigError` with its line."""
    if not path.is_file():
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.yaml")], n=1)
        hint = f"; did you mean {str(path.parent / near[0])!r}?" if near else ""
        raise ConfigError(f"recipe file {str(path)!r} does not exist{hint}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        start = getattr(exc, "context_mark", None)
        if start is not None and mark is not None and start.line != mark.line:
            # The parser notices an unclosed bracket or quote only on a later line; name where it opened too.
            where += f" (in what opens at line {start.line + 1}, column {start.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections ({', '.join(SECTIONS)})")
    return data


def check_recipe(recipe: dict[str, Any], args: Sequence[str], found: list[PluginInfo]) -> None:
    """Catch the typos that matter before jsonargparse does: unknown sections and unknown plugin names."""
    for key in recipe:
        if key not in SECTIONS:
            near = difflib.get_close_matches(str(key), SECTIONS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown recipe section {key!r}{hint} sections: {', '.join(SECTIONS)}")
    for key in ("trainer", "policy"):
        if key in recipe and recipe[key] is not None and not isinstance(recipe[key], dict):
            raise ConfigError(
                f"recipe section {key!r} must be a mapping of options (`option: value` lines indented under "
                f"`{key}:`), got a {type(recipe[key]).__name__}"
            )
    for kind in KINDS:
        section = recipe.get(kind)
        if section is not None and not isinstance(section, (dict, str)):
            raise ConfigError(
                f"recipe section {kind!r} must name a plugin (`{kind}: Name`) or be a mapping with `class_path:` "
                f"and `init_args:`, got a {type(section).__name__}"
            )
    chosen: dict[str, str] = {}
    for kind in KINDS:
        section = recipe.get(kind)
        if isinstance(section, dict) and "class_path" in section:
            chosen[kind] = str(section["class_path"])
        elif isinstance(section, str):
            chosen[kind] = section
    for i, arg in enumerate(args):  # command-line overrides: --executor X, --executor.class_path X, --executor=X
        name, _, value = arg.partition("=")
        for kind in KINDS:
            if name in (f"--{kind}", f"--{kind}.class_path"):
                chosen[kind] = value or (args[i + 1] if i + 1 < len(args) else "")
    for kind, class_path in chosen.items():
        plugin_registry.check_class_path(kind, class_path, found)


def _clean_jsonargparse_error(message: str) -> str:
    """jsonargparse nests the cause in long messages; keep the lines a user can act on."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(("- ", "Given value type", "Subclass types expected"))]
    text = " ".join(keep or lines)
    return text[:1500]


def _parse_error(message: str, recipe: dict[str, Any], args: Sequence[str], found: Sequence[PluginInfo]) -> str:
    """A jsonargparse error in the recipe's own terms: which section, which option, what it expects."""
    return (
        _unknown_option(message, recipe, args, found)
        or _unknown_group_option(message)
        or _wrong_value(message, recipe, args, found)
        or _clean_jsonargparse_error(message)
    )


def _chosen_class(kind: str, recipe: dict[str, Any], args: Sequence[str], found: Sequence[PluginInfo]) -> type | None:
    """The plugin class a recipe (or a command-line override) picks for ``kind``."""
    chosen = recipe.get(kind)
    class_path = chosen.get("class_path") if isinstance(chosen, dict) else chosen
    for i, arg in enumerate(args):  # a class chosen on the command line wins
        key, _, value = arg.partition("=")
        if key in (f"--{kind}", f"--{kind}.class_path"):
            class_path = value or (args[i + 1] if i + 1 < len(args) else class_path)
    return next((p.cls for p in found if p.kind == kind and class_path in (p.name, p.class_path)), None)


def _options_of(cls: type) -> list[str]:
    """The constructor options of ``cls``, its bases' too where it passes ``**kwargs`` on."""
    import inspect

    accepted: list[str] = []
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        accepted += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(a for a in accepted if a not in ("policy", "rollout", "executor", "reward")))


def _did_you_mean(name: str, accepted: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, accepted, n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def _unknown_option(
    message: str, recipe: dict[str, Any], args: Sequence[str], found: Sequence[PluginInfo]
) -> str | None:
    """For a misspelled plugin option (``--data.init_args.trace_famlies``), the nearest real one and the list."""
    import re

    option = re.search(r"Option '([^']+)' is not accepted", message)
    section = re.search(r'Parser key "([a-z_]+)"', message)
    if option is None or section is None or section.group(1) not in KINDS:
        return None
    kind, name = section.group(1), option.group(1)
    cls = _chosen_class(kind, recipe, args, found)
    if cls is None:
        return None
    accepted = _options_of(cls)
    hint = _did_you_mean(name, accepted)
    return f"{kind} {cls.__name__} has no option {name!r}{hint} its options: {', '.join(accepted)}"


def _unknown_group_option(message: str) -> str | None:
    """A misspelled ``trainer`` or ``policy`` option, in the recipe or on the command line."""
    import re

    match = re.search(r"Group '(trainer|policy)' does not accept option '([^']+)'", message) or re.search(
        r"unrecognized arguments: --(trainer|policy)\.([A-Za-z_]\w*)", message
    )
    if match is None:
        return None
    group, name = match.groups()
    if group == "policy":
        from retool.policy import Policy

        accepted = _options_of(Policy)
        return f"policy has no option {name!r}{_did_you_mean(name, accepted)} its options: {', '.join(accepted)}"
    import lightning as L

    accepted = _options_of(L.Trainer)
    return (
        f"trainer has no option {name!r}{_did_you_mean(name, accepted)} (the trainer section takes Lightning "
        "Trainer's arguments; `retool fit --help` lists them)"
    )


def _wrong_value(message: str, recipe: dict[str, Any], args: Sequence[str], found: Sequence[PluginInfo]) -> str | None:
    """``executor LocalSandbox: option 'timeout_s' expects a float, got 'fast'`` from jsonargparse's nested text."""
    import re

    message = " ".join(message.split())  # jsonargparse spreads the nested errors over indented lines
    pattern = r"""Parser key "([\w.]+)": Expected a <class '(\w+)'>\. Got value: (.*?)(?= - | Given value|$)"""
    wrong = re.findall(pattern, message)
    if not wrong:
        return None
    key, expected, value = wrong[-1]  # the innermost: the option itself
    section = re.match(r'Parser key "([a-z_]+)": Does not validate', message)
    if section is not None and section.group(1) in KINDS:
        kind = section.group(1)
        cls = _chosen_class(kind, recipe, args, found)
        where = f"{kind} {cls.__name__}" if cls is not None else kind
        return f"{where}: option {key!r} expects {_a(expected)}, got {value.strip()!r}"
    return f"{key} expects {_a(expected)}, got {value.strip()!r}"


def _a(type_name: str) -> str:
    return f"an {type_name}" if type_name[:1] in "aeiou" else f"a {type_name}"


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's message (jsonargparse wraps a constructor's ValueError in its own errors)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return _clean_jsonargparse_error(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))


def cmd_fit(args: list[str], blocked: Sequence[str]) -> int:
    from jsonargparse import ArgumentError

    found = plugin_registry.discover(blocked)
    if "-h" in args or "--help" in args:
        build_parser().print_help()
        return 0
    if any(arg.endswith(".help") for arg in args):  # --algorithm.help GRPO: a plugin's options, no recipe needed
        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            return int(exc.code or 0)
    # jsonargparse prints the config where --print_config stands; put it last so every override is in it.
    args = [a for a in args if not a.startswith("--print_config")] + [a for a in args if a.startswith("--print_config")]
    recipe_path = _recipe_path(args)
    if recipe_path is None:
        raise ConfigError("retool fit needs --recipe PATH (see recipes/ for examples)")
    recipe = load_recipe(recipe_path)
    check_recipe(recipe, args, found)
    parser = build_parser()
    try:
        cfg = parser.parse_args(args)  # --print_config (jsonargparse's own) prints and exits here
    except ArgumentError as exc:
        raise ConfigError(_parse_error(str(exc), recipe, args, found)) from None
    except SystemExit as exc:
        return int(exc.code or 0)
    return _fit(parser, cfg, recipe_path, found)


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


def _stage(parser: Any, cfg: Any, recipe_path: Path, found: Sequence[PluginInfo], command: str) -> Any:
    """Instantiate a parsed recipe and build its run directory and Trainer (shared by fit and validate)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from rich.console import Console

    from retool.callbacks import RunArtifacts, StepTable
    from retool.policy import PolicyLoadError

    _quiet_lightning()
    console = Console()
    try:
        init = parser.instantiate(cfg)
        if command == "validate":
            init.algorithm.eval_at_start = True  # what validate does: an algorithm checks what evaluation needs
        init.algorithm.check_components()
        if command == "fit":  # a missing file or a dataset without traces for SFT fails here, before any weights load
            train_on = getattr(init.algorithm, "train_on", "problems")
            items = init.data.traces("train") if train_on == "traces" else init.data.problems("train")
            if not items:
                raise ValueError(f"{type(init.data).__name__} has no training {train_on}")
        has_val = bool(init.data.problems("val")) if _evaluates(init.algorithm) else False
        if init.policy is not None:
            init.policy.check()  # a missing folder or model package: before the run directory exists
    except PolicyLoadError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # a plugin's __init__ rejected a value: show its own message, not the wrapper's
        raise ConfigError(f"invalid recipe value: {_root_cause(exc)}") from None
    if command == "validate" and not has_val:
        raise ConfigError(f"the data section ({type(init.data).__name__}) has no val problems to evaluate on")
    default_name = recipe_path.stem if command == "fit" else f"validate-{recipe_path.stem}"
    run_dir = Path(cfg.run_dir or Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = cfg.clone()
    for key in ("print_config", "recipe"):
        if key in saved:
            del saved[key]
    saved.run_dir = None  # a rerun of the saved recipe must not write into this run's directory
    (run_dir / "recipe.yaml").write_text(parser.dump(saved), encoding="utf-8")
    (run_dir / "versions.json").write_text(json.dumps(_versions(found), indent=2) + "\n", encoding="utf-8")
    (run_dir / "seed.txt").write_text(f"{cfg.seed_everything}\n", encoding="utf-8")
    L.seed_everything(cfg.seed_everything, workers=True, verbose=False)

    trainer_kwargs = dict(init.trainer)
    callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    table = StepTable(console)
    artifacts = RunArtifacts(run_dir)
    callbacks += [table, artifacts]
    if (
        command == "fit"
        and trainer_kwargs.get("enable_checkpointing", True)
        and not any(isinstance(c, ModelCheckpoint) for c in callbacks)
    ):
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True))
    if trainer_kwargs.get("logger") in (None, True):
        trainer_kwargs["logger"] = [
            CSVLogger(save_dir=run_dir, name="csv", version=""),
            TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""),
        ]
    trainer_kwargs["default_root_dir"] = str(run_dir)
    if trainer_kwargs.get("log_every_n_steps") is None:
        trainer_kwargs["log_every_n_steps"] = 1  # one RL step is expensive: log every one
    trainer_kwargs["enable_progress_bar"] = True
    trainer_kwargs["enable_model_summary"] = False
    trainer_kwargs["num_sanity_val_steps"] = 0  # evaluation rolls out whole problems: never as a "sanity check"
    every = init.algorithm.eval_every
    if has_val and every > 0:  # evaluate every N steps, counted across epochs
        trainer_kwargs["val_check_interval"] = every
        trainer_kwargs["check_val_every_n_epoch"] = None
    elif command == "fit":
        trainer_kwargs["limit_val_batches"] = 0  # evaluation runs only where the CLI asks (start, end)
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs)
    return init, trainer, run_dir, table, artifacts, has_val, console


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    """Drop two lines of Lightning's that say nothing about the run: an advertisement and a deprecation of its own."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvert())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _evaluates(algorithm: Any) -> bool:
    return bool(getattr(algorithm, "eval_every", 0) or getattr(algorithm, "eval_at_start", False))


def _fit(parser: Any, cfg: Any, recipe_path: Path, found: Sequence[PluginInfo]) -> int:
    from retool.policy import PolicyLoadError

    init, trainer, run_dir, table, artifacts, has_val, console = _stage(parser, cfg, recipe_path, found, "fit")
    algorithm = init.algorithm
    # One module goes through up to three stages (evaluate, train, evaluate): its executor, reward workers and
    # rollout engine stay open across them and are closed once, at the end, however the run ends.
    algorithm.keep_resources_open = True
    console.print(f"[bold]retool fit[/] {recipe_path} -> run directory [cyan]{run_dir}[/]")
    try:
        if has_val and algorithm.eval_at_start:
            _validate_limited(trainer, algorithm, init.data)
        trainer.fit(algorithm, datamodule=init.data, ckpt_path=cfg.ckpt_path)
        last = table.evaluations[-1]["step"] if table.evaluations else None
        if has_val and not trainer.interrupted and last != trainer.global_step:
            _validate_limited(trainer, algorithm, init.data)  # the "after" row of the run
    except PolicyLoadError as exc:
        _error(str(exc))
        return 1
    except SystemExit:
        # Lightning shuts down gracefully on Ctrl-C, then exits; finish our report before we do.
        if not trainer.interrupted:
            raise
    finally:
        algorithm.close_resources()
    if table.history:
        console.print(table.summary())
    if table.evaluations:
        console.print(_evaluation_table(table.evaluations))
    if trainer.interrupted:
        where = f"; the policy as it was is in {artifacts.exported}" if artifacts.exported else ""
        console.print(f"[yellow]interrupted after {trainer.global_step} steps{where}[/]")
        console.print(f"run directory: {run_dir}")
        return 130
    if artifacts.exported:
        console.print(f"policy (Hugging Face format): [cyan]{artifacts.exported}[/]")
    console.print(f"run directory: [cyan]{run_dir}[/]")
    return 0


def _validate_limited(trainer: Any, algorithm: Any, data: Any, ckpt_path: str | None = None) -> None:
    """``trainer.validate`` over every val problem (a fit may have set ``limit_val_batches`` to 0)."""
    saved = trainer.limit_val_batches
    trainer.limit_val_batches = 1.0
    try:
        trainer.validate(algorithm, datamodule=data, ckpt_path=ckpt_path, verbose=False)
    finally:
        trainer.limit_val_batches = saved


def _evaluation_table(rows: Sequence[dict[str, Any]]) -> Any:
    from rich.table import Table

    from retool.report import eval_columns

    table = Table(title="evaluation on held-out problems (greedy)", title_justify="left")
    columns = [("step", "step", "{:d}"), *eval_columns(rows)]
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            ok = value is not None and not (isinstance(value, float) and value != value)
            cells.append(fmt.format(int(value) if fmt == "{:d}" else value) if ok else "-")
        table.add_row(*cells)
    return table


# ---- retool validate -------------------------------------------------------------------------------------


def cmd_validate(args: list[str], blocked: Sequence[str]) -> int:
    """Evaluate a policy on a recipe's held-out problems: ``retool validate --recipe R [--ckpt_path P]``.

    ``--ckpt_path`` takes a Hugging Face folder (a run's ``policy/``) or a Lightning checkpoint (``.ckpt``);
    without it the recipe's own policy is evaluated.
    """
    from jsonargparse import ArgumentError

    from retool.policy import PolicyLoadError

    found = plugin_registry.discover(blocked)
    if "-h" in args or "--help" in args:
        print("usage: retool validate --recipe PATH [--ckpt_path POLICY_DIR_OR_CKPT] [--section.key VALUE ...]")
        return 0
    recipe_path = _recipe_path(args)
    if recipe_path is None:
        raise ConfigError("retool validate needs --recipe PATH (the recipe that names the data, rollout and reward)")
    recipe = load_recipe(recipe_path)
    check_recipe(recipe, args, found)
    parser = build_parser()
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as exc:
        raise ConfigError(_parse_error(str(exc), recipe, args, found)) from None
    except SystemExit as exc:
        return int(exc.code or 0)
    ckpt = cfg.ckpt_path
    if ckpt is not None:
        path = Path(ckpt)
        if path.is_dir():  # an exported policy: evaluate it as the recipe's policy
            cfg.policy.name_or_path = str(path)
            cfg.ckpt_path = ckpt = None
        elif not path.is_file():
            raise ConfigError(f"--ckpt_path {ckpt!r} is neither a policy folder nor a checkpoint file")
    init, trainer, run_dir, table, _, _, console = _stage(parser, cfg, recipe_path, found, "validate")
    console.print(f"[bold]retool validate[/] {recipe_path} ({cfg.policy.name_or_path}) -> [cyan]{run_dir}[/]")
    try:
        _validate_limited(trainer, init.algorithm, init.data, ckpt_path=ckpt)
    except PolicyLoadError as exc:
        _error(str(exc))
        return 1
    finally:
        init.algorithm.close_resources()
    if table.evaluations:
        console.print(_evaluation_table(table.evaluations))
    console.print(f"run directory: [cyan]{run_dir}[/]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
