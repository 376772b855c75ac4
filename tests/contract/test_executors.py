"""Every built-in executor, and the tutorial's, held to the executor contract of ``retool.testing``."""

from __future__ import annotations

import atexit
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from retool import Executor
from retool.testing import ExecutorContract

ROOT = Path(__file__).resolve().parents[2]
_server: Any = None


def local_sandbox() -> Executor:
    from retool_plugins.executors.local import LocalSandbox

    return LocalSandbox(timeout_s=2.0)


def e2b_fake() -> Executor:
    """E2BExecutor through the real E2B SDK against the local fake E2B (127.0.0.1 only), started once."""
    global _server
    pytest.importorskip("e2b_code_interpreter", reason="the E2B SDK is not installed: pip install 'retool[e2b]'")
    from retool_plugins.executors.e2b import E2BExecutor

    if _server is None:
        sys.path.insert(0, str(ROOT / "tests" / "fakes"))
        from fake_e2b_server import FakeE2BServer

        _server = FakeE2BServer()
        atexit.register(_server.stop)
    url = _server.url
    return E2BExecutor(
        api_key="fake-key",
        timeout_s=2.0,
        start_jitter_s=0.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        sdk_options={"api_url": url, "sandbox_url": url},
    )


def docs_example() -> Executor:
    """The tutorial's executor (docs/examples/subprocess_executor.py), so that the page's code keeps the contract."""
    path = ROOT / "docs" / "examples" / "subprocess_executor.py"
    spec = importlib.util.spec_from_file_location("docs_example_subprocess_executor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SubprocessExecutor(timeout_s=2.0)


class TestLocalSandbox(ExecutorContract):
    factory = staticmethod(local_sandbox)


class TestE2BExecutor(ExecutorContract):
    factory = staticmethod(e2b_fake)


class TestDocsExample(ExecutorContract):
    factory = staticmethod(docs_example)
