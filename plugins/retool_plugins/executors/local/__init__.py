"""LocalSandbox: model-written code runs in confined Python workers forked from a warm zygote on this machine.

The parts: ``sandbox.py`` (the plugin: sessions, cells, limits, results), ``_pool.py`` (starting, talking to and
killing workers), ``_host.py`` (the trainer's handle on the zygote process, killing process trees),
``_cgroups.py`` (cgroups over all sessions, a uid per worker), ``_zygote.py`` and ``_worker.py`` (what runs
inside the sandbox), ``_isolation.py`` (namespaces, mounts, rlimits, seccomp) and ``_checks.py`` (``retool
sandbox check``'s attacks on each layer).

The zygote and the workers import modules of this folder; importing one runs this file first, so it must not
import retool's core (which loads torch): the plugin class is loaded on first access instead.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LocalSandbox", "SandboxUnavailable", "missing_layers"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from retool_plugins.executors.local import sandbox

        return getattr(sandbox, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
