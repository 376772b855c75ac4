"""The recipe: a flat YAML file with one section per plugin kind, read into one jsonargparse parser.

Every check that can fail on a typo runs before any model loads, and names the fix in the recipe's own terms
(section, plugin, option). The checks are built from what the recipe and the plugin signatures say, not from
the text of jsonargparse's errors, so they read the same whatever jsonargparse version is installed; what
they do not catch, jsonargparse does, and its message is shown shortened.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

from retool import plugins as plugin_registry
from retool.cli._common import ConfigError, clean_message
from retool.plugins import KINDS, PluginInfo

SECTIONS = [
    "seed_everything", "run_dir", "ckpt_path", "checkpoint_every", "keep_checkpoints", "trainer", "policy", *KINDS,
]  # fmt: skip
INJECTED = ("policy", "rollout", "executor", "reward")
"""The algorithm's arguments that the core fills from the recipe's other sections."""


@dataclass(frozen=True)
class ParsedRecipe:
    """A recipe file with its command-line overrides, checked and parsed.

    Args:
        path: The recipe file.
        parser: The jsonargparse parser it was parsed with (``parser.instantiate(config)`` builds the run).
        config: The resolved configuration (recipe, then overrides).
    """

    path: Path
    parser: Any
    config: Any


def build_parser(prog: str = "retool fit", description: str = "Train a policy with a recipe.") -> Any:
    """The jsonargparse parser of a recipe: one section per plugin kind, linked into the algorithm."""
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    from retool.policy import Policy

    parser = ArgumentParser(prog=prog, exit_on_error=False, description=description)
    parser.add_argument("--recipe", action=ActionConfigFile, help="Path to a YAML recipe.")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed of every RNG (Lightning).")
    parser.add_argument("--run_dir", type=str | None, default=None, help="Run directory (default: runs/NAME-TIME).")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint to resume from.")
    parser.add_argument(
        "--checkpoint_every", type=int, default=50,
        help="Save a resumable checkpoint in the run directory every this many steps, and at the end (0 = never).",
    )  # fmt: skip
    parser.add_argument("--keep_checkpoints", type=int, default=2, help="Keep the newest this many checkpoints.")
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.add_class_arguments(Policy, "policy")
    parser.add_subclass_arguments(KINDS["algorithm"], "algorithm", required=True)
    parser.add_subclass_arguments(KINDS["rollout"], "rollout", required=False)
    parser.add_subclass_arguments(KINDS["executor"], "executor", required=False)
    parser.add_subclass_arguments(KINDS["reward"], "reward", required=False)
    parser.add_subclass_arguments(KINDS["data"], "data", required=True)
    for section in INJECTED:
        parser.link_arguments(section, f"algorithm.init_args.{section}", apply_on="instantiate")
    return parser


def trainer_help(prog: str) -> str:
    """The trainer section's options (Lightning ``Trainer`` arguments), then the strategies retool runs."""
    from retool.strategies import STRATEGIES

    parser = build_parser(prog)
    text = parser.format_help()
    start = text.index(parser.groups["trainer"].title)
    end = text.find(parser.groups["policy"].title, start)
    options = text[start : end if end > 0 else None].rstrip()
    width = max(len(name) for name in STRATEGIES)
    choices = "\n".join(f"  {name:<{width}}  {what}" for name, what in STRATEGIES.items())
    return (
        f"trainer: Lightning's Trainer arguments\n\n{options}\n\n"
        f"trainer.strategy: the strategies retool's steps run (with trainer.devices and trainer.num_nodes; on CPU "
        f"too):\n{choices}\n"
    )


def parse_recipe(args: Sequence[str], found: Sequence[PluginInfo], prog: str) -> ParsedRecipe:
    """Read, check and parse ``--recipe PATH`` and the overrides in ``args``.

    Raises:
        ConfigError: the file is missing or not YAML, or a section, plugin, option or value is wrong.
        SystemExit: jsonargparse printed what was asked (``--print_config``) and the command is done.
    """
    from jsonargparse import ArgumentError

    # jsonargparse prints the config where --print_config stands; put it last so every override is in it.
    args = [a for a in args if not a.startswith("--print_config")] + [a for a in args if a.startswith("--print_config")]
    path = recipe_path(args)
    if path is None:
        raise ConfigError(f"{prog} needs --recipe PATH (see recipes/ for examples)")
    recipe = load_recipe(path)
    check_recipe(recipe, args, found)
    parser = build_parser(prog)
    try:
        config = parser.parse_args(args)
    except ArgumentError as exc:  # what the checks above do not know about
        raise ConfigError(clean_message(str(exc))) from None
    return ParsedRecipe(path=path, parser=parser, config=config)


def recipe_path(args: Sequence[str]) -> Path | None:
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


# ---- the checks -------------------------------------------------------------------------------------------


def check_recipe(recipe: dict[str, Any], args: Sequence[str], found: Sequence[PluginInfo]) -> None:
    """Catch the typos that matter, in the recipe and in the overrides, before jsonargparse does.

    Unknown sections, sections of the wrong shape, unknown plugin names, options the chosen plugin (or the
    trainer, or the policy) does not have, and values of the wrong type, each named with its section.
    """
    for key in recipe:
        if key not in SECTIONS:
            raise ConfigError(f"unknown recipe section {key!r}{_did_you_mean(str(key), SECTIONS)} sections: "
                              f"{', '.join(SECTIONS)}")  # fmt: skip
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
    chosen = _chosen_class_paths(recipe, args)
    for kind, class_path in chosen.items():
        plugin_registry.check_class_path(kind, class_path, found)
    for given in _given_options(recipe, args):
        _check_option(given, chosen, found)


@dataclass(frozen=True)
class _Given:
    """One option a recipe or the command line sets: ``section`` (trainer, policy or a plugin kind), its name and
    value, and whether the value is command-line text (parsed as jsonargparse parses it) or a YAML value."""

    section: str
    name: str
    value: Any
    from_cli: bool


def _chosen_class_paths(recipe: dict[str, Any], args: Sequence[str]) -> dict[str, str]:
    """The class path each plugin section names: the recipe's, unless the command line picks another."""
    chosen: dict[str, str] = {}
    for kind in KINDS:
        section = recipe.get(kind)
        if isinstance(section, dict) and "class_path" in section:
            chosen[kind] = str(section["class_path"])
        elif isinstance(section, str):
            chosen[kind] = section
    for i, arg in enumerate(args):  # --executor X, --executor.class_path X, --executor=X
        name, _, value = arg.partition("=")
        for kind in KINDS:
            if name in (f"--{kind}", f"--{kind}.class_path"):
                chosen[kind] = value or (args[i + 1] if i + 1 < len(args) else "")
    return chosen


def _given_options(recipe: dict[str, Any], args: Sequence[str]) -> list[_Given]:
    given: list[_Given] = []
    for section in ("trainer", "policy"):
        if isinstance(recipe.get(section), dict):
            given += [_Given(section, str(k), v, False) for k, v in recipe[section].items()]
    for kind in KINDS:
        section = recipe.get(kind)
        if isinstance(section, dict) and isinstance(section.get("init_args"), dict):
            given += [_Given(kind, str(k), v, False) for k, v in section["init_args"].items()]
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        parts = key[2:].split(".") if key.startswith("--") else []
        if len(parts) == 3 and parts[0] in KINDS and parts[1] == "init_args":
            section, name = parts[0], parts[2]
        elif len(parts) == 2 and parts[0] in ("trainer", "policy"):
            section, name = parts
        elif len(parts) == 2 and parts[0] in KINDS and parts[1] not in ("class_path", "init_args", "help"):
            section, name = parts  # jsonargparse's shorthand: --algorithm.group_size for ...init_args.group_size
        else:
            continue
        if not eq:
            if i + 1 >= len(args):
                continue  # jsonargparse says that a value is missing
            value = args[i + 1]
        given.append(_Given(section, name, value, True))
    return given


def _check_option(given: _Given, chosen: dict[str, str], found: Sequence[PluginInfo]) -> None:
    if given.section in ("trainer", "policy"):
        cls = _trainer_or_policy(given.section)
        where = given.section
    else:
        cls = _plugin_class(given.section, chosen.get(given.section), found)
        if cls is None:
            return  # no class chosen: jsonargparse says so
        where = f"{given.section} {cls.__name__}"
    accepted = options_of(cls)
    if given.name not in accepted:
        names = list(accepted)
        hint = _did_you_mean(given.name, names)
        if given.section == "trainer":
            raise ConfigError(
                f"trainer has no option {given.name!r}{hint} (the trainer section takes Lightning Trainer's "
                "arguments; `retool fit --help` lists them)"
            )
        raise ConfigError(f"{where} has no option {given.name!r}{hint} its options: {', '.join(names)}")
    annotation = accepted[given.name]
    if annotation is not None and _is_plain(given.value) and not _accepts(annotation, given.value, given.from_cli):
        expected = describe_type(annotation)
        if given.section == "trainer":
            raise ConfigError(f"trainer.{given.name} expects {expected}, got {given.value!r}")
        raise ConfigError(f"{where}: option {given.name!r} expects {expected}, got {given.value!r}")


def _trainer_or_policy(section: str) -> type:
    if section == "trainer":
        import lightning as L

        return L.Trainer
    from retool.policy import Policy

    return Policy


def _plugin_class(kind: str, class_path: str | None, found: Sequence[PluginInfo]) -> type | None:
    if class_path is None:
        return None
    for plugin in found:
        if plugin.kind == kind and class_path in (plugin.name, plugin.class_path):
            return plugin.cls
    if "." in class_path:
        return plugin_registry.resolve(kind, class_path, found)
    return None


def options_of(cls: type) -> dict[str, Any]:
    """A class's constructor options (name -> type, ``None`` where unknown), its bases' too where it passes
    ``**kwargs`` on; the algorithm's injected components are left out."""
    accepted: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        params = inspect.signature(init).parameters.values()
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not resolve here: check the name, not the type
            hints = {}
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in INJECTED:
                accepted.setdefault(p.name, hints.get(p.name))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return accepted


def _is_plain(value: Any) -> bool:
    """A value whose type this module checks: a scalar, or a list of scalars (a mapping is a nested config)."""
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _accepts(annotation: Any, value: Any, from_cli: bool) -> bool:
    """Whether jsonargparse takes ``value`` for an option of type ``annotation`` (``True`` when it cannot tell)."""
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_argument("--value", type=annotation)
    except Exception:  # a type jsonargparse handles only inside a class signature: leave it to the parse
        return True
    try:
        if from_cli:
            parser.parse_args(["--value", str(value)])
        else:
            parser.parse_object({"value": value})
    except ArgumentError:
        return False
    except Exception:
        return True
    return True


def describe_type(annotation: Any) -> str:
    """A type in words: ``an int``, ``a float or null``, ``one of 'code', 'text'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin in (typing.Union, UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    name = getattr(origin or annotation, "__name__", str(annotation))
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _did_you_mean(name: str, accepted: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, accepted, n=1)
    return f"; did you mean {near[0]!r}?" if near else ""
