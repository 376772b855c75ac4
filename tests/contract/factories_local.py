"""LocalSandbox for the contract suite."""

from __future__ import annotations

from retool_plugins.executors.local import LocalSandbox

FACTORIES = {"local": lambda: LocalSandbox(timeout_s=2.0)}
