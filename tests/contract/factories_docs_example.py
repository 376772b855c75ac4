"""The tutorial's executor (docs/examples/subprocess_executor.py), so that the page's code is held to the contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from retool import Executor

_PATH = Path(__file__).resolve().parents[2] / "docs" / "examples" / "subprocess_executor.py"


def _docs_example() -> Executor:
    spec = importlib.util.spec_from_file_location("docs_example_subprocess_executor", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SubprocessExecutor(timeout_s=2.0)


FACTORIES = {"docs-example": _docs_example}
