"""The executor contract suite runs against every executor.

Each ``factories_*.py`` module in this folder defines ``FACTORIES``: a dict of name -> zero-argument function
returning a fresh :class:`retool.Executor` (with a short timeout suitable for tests) or raising
``pytest.skip`` when that executor cannot run here. The ``executor`` fixture is parametrized over all of them,
so every test in ``test_executor_contract.py`` runs once per executor.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest

from retool import Executor


def _factories() -> dict[str, Callable[[], Executor]]:
    found: dict[str, Callable[[], Executor]] = {}
    for path in sorted(Path(__file__).parent.glob("factories_*.py")):
        module = importlib.import_module(path.stem)  # this folder is on sys.path (rootdir conftest)
        found.update(module.FACTORIES)
    return found


FACTORIES = _factories()


@pytest.fixture(params=sorted(FACTORIES), ids=sorted(FACTORIES))
def make_executor(request: pytest.FixtureRequest) -> Callable[[], Executor]:
    return FACTORIES[request.param]
