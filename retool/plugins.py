"""Plugin discovery: the ``retool.plugins`` entry-point group, listing, and errors that name the fix.

A package registers a plugin class with an entry point (``pyproject.toml``)::

    [project.entry-points."retool.plugins"]
    MyReward = "my_pkg.rewards:MyReward"

and recipes then name it ``class_path: MyReward``. The built-in plugins in ``retool_plugins`` enter the
same way; the core imports nothing from that package. The order follows pytest's: ``-p no:NAME`` blocks a
plugin, then entry points load (unless ``RETOOL_DISABLE_PLUGIN_AUTOLOAD=1``), then the modules listed in
``RETOOL_PLUGINS=mod1,mod2`` are imported (their plugin classes are found by subclassing a base class).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
from collections.abc import Iterable
from dataclasses import dataclass

from retool.algorithm import Algorithm
from retool.data import ProblemDataModule
from retool.executor import Executor
from retool.reward import Reward
from retool.rollout.backend import RolloutBackend

ENTRY_POINT_GROUP = "retool.plugins"

KINDS: dict[str, type] = {
    "executor": Executor,
    "rollout": RolloutBackend,
    "algorithm": Algorithm,
    "reward": Reward,
    "data": ProblemDataModule,
}
"""Recipe section -> the base class its plugins subclass."""


class PluginError(Exception):
    """A plugin could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class PluginInfo:
    """One discovered plugin class."""

    kind: str
    name: str
    cls: type
    package: str
    version: str

    @property
    def class_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


def kind_of(cls: type) -> str | None:
    """The recipe section a plugin class belongs to, or ``None`` when it subclasses no known base."""
    for kind, base in KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base) and cls is not base:
            return kind
    return None


def discover(blocked: Iterable[str] = ()) -> list[PluginInfo]:
    """Load every plugin (entry points, then ``RETOOL_PLUGINS``) and return them sorted by kind and name."""
    blocked = set(blocked)
    found: dict[tuple[str, str], PluginInfo] = {}
    if os.environ.get("RETOOL_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes"):
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked:
                continue
            try:
                cls = ep.load()
            except Exception as exc:
                dist = ep.dist.name if ep.dist else "?"
                raise PluginError(
                    f"plugin {ep.name!r} (entry point {ep.value!r} of package {dist!r}) failed to import: "
                    f"{type(exc).__name__}: {exc}. Fix or reinstall that package, or block it with -p no:{ep.name}"
                ) from exc
            kind = kind_of(cls)
            if kind is None:
                raise PluginError(
                    f"entry point {ep.name!r} -> {ep.value!r} is not a subclass of any retool base class "
                    f"({', '.join(b.__name__ for b in KINDS.values())})"
                )
            dist = ep.dist
            found[(kind, ep.name)] = PluginInfo(
                kind, ep.name, cls, dist.name if dist else "?", dist.version if dist else "?"
            )
    for module in filter(None, (m.strip() for m in os.environ.get("RETOOL_PLUGINS", "").split(","))):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise PluginError(f"RETOOL_PLUGINS names module {module!r}, which cannot be imported: {exc}") from exc
        for value in vars(mod).values():
            kind = kind_of(value) if isinstance(value, type) else None
            if kind and value.__module__ == mod.__name__ and value.__name__ not in blocked:
                found.setdefault((kind, value.__name__), PluginInfo(kind, value.__name__, value, module, "-"))
    return sorted(found.values(), key=lambda p: (p.kind, p.name))


def resolve(kind: str, name: str, plugins: Iterable[PluginInfo]) -> type:
    """The ``kind`` plugin class that ``name`` (a discovered plugin's name, or a class path) names.

    Raises:
        PluginError: as :func:`check_class_path` does, naming the nearest plugin and the ones available.
    """
    plugins = list(plugins)
    check_class_path(kind, name, plugins)
    for plugin in plugins:
        if plugin.kind == kind and plugin.name == name:
            return plugin.cls
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)  # check_class_path has vetted it


def check_class_path(kind: str, class_path: str, plugins: Iterable[PluginInfo]) -> None:
    """Raise :class:`PluginError` unless ``class_path`` names a usable ``kind`` plugin.

    A short name must be a discovered plugin of that kind; a dotted path must import and subclass the
    kind's base class.
    """
    base = KINDS[kind]
    available = sorted(p.name for p in plugins if p.kind == kind)
    if "." not in class_path:
        if class_path in available:
            return
        near = difflib.get_close_matches(class_path, available, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise PluginError(
            f"unknown {kind} {class_path!r}{hint} available: {', '.join(available) or '(none installed)'}. "
            f"A class in your own module works with its full path (class_path: my_pkg.module.Class)."
        )
    module_name, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{kind} class_path {class_path!r} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{kind} class_path {class_path!r} is not a subclass of {base.__module__}.{base.__name__}")
