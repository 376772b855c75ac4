"""The option contract: a plugin's recipe options are its ``__init__`` signature and its docstring's ``Args:``.

A plugin that extends a base class with options of its own (``GRPO`` over ``PolicyGradient`` over
``Algorithm``) lists its own options and passes the rest on with ``**kwargs``; jsonargparse follows that into
the bases, so every base option stays settable from a recipe and is listed, with its help, by
``retool fit --KIND.help NAME``. :func:`options_contract` checks both for one plugin class.
"""

from __future__ import annotations

import inspect

INJECTED = ("policy", "rollout", "executor", "reward")
"""Arguments the core fills from the recipe's other sections, not options a user sets."""


def declared_options(cls: type, stop: type | None = None) -> dict[str, type]:
    """Every option that ``cls`` or one of its bases (below ``stop``, which is included) declares in its
    ``__init__``, mapped to the class that declares it."""
    options: dict[str, type] = {}
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass) or (stop is not None and not issubclass(klass, stop)):
            continue
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in INJECTED:
                options.setdefault(p.name, klass)
    return options


def recipe_options(cls: type) -> dict[str, str]:
    """The options a recipe can set on ``cls``, as jsonargparse reads its signature, with their help text."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "plugin", fail_untyped=False)
    return {
        action.dest.removeprefix("plugin."): (action.help or "")
        for action in parser._actions
        if action.dest.startswith("plugin.") and not action.dest.endswith(".help")
        and action.dest.removeprefix("plugin.") not in INJECTED
    }  # fmt: skip


def options_contract(cls: type, base: type | None = None) -> None:
    """Check that every option ``cls`` and its bases declare (up to ``base``, the kind's base class) can be
    set from a recipe and has a help text.

    Raises:
        AssertionError: naming each option that a recipe cannot reach (a base option that ``__init__`` does
            not pass on with ``**kwargs``) or that has no help (no entry in its class's ``Args:``).
    """
    declared = declared_options(cls, base)
    reachable = recipe_options(cls)
    problems = [
        f"{name!r} (declared by {owner.__name__}) cannot be set from a recipe: pass the base's options on with **kwargs"
        for name, owner in declared.items()
        if name not in reachable
    ]
    problems += [
        f"{name!r} has no help text: document it in the Args: of the class that declares it"
        for name, text in reachable.items()
        if not text.strip() or text.strip().startswith("(type:")
    ]
    if problems:
        raise AssertionError(f"{cls.__name__}: " + "; ".join(problems))
