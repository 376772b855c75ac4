"""E2BExecutor for the contract suite, through the real E2B SDK against the local fake E2B (127.0.0.1 only).

The fake (tests/fakes/fake_e2b_server.py) starts on an ephemeral port when the first executor is made and stops
when the interpreter exits; every executor made here shares it, each with its own sandboxes.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

import pytest

from retool import Executor

_server: Any = None


def _server_url() -> str:
    global _server
    if _server is None:
        fakes = str(Path(__file__).resolve().parents[1] / "fakes")
        if fakes not in sys.path:
            sys.path.insert(0, fakes)
        from fake_e2b_server import FakeE2BServer

        _server = FakeE2BServer()
        atexit.register(_server.stop)
    return _server.url


def e2b_fake() -> Executor:
    pytest.importorskip("e2b_code_interpreter", reason="the E2B SDK is not installed: pip install 'retool[e2b]'")
    from retool_plugins.executors.e2b import E2BExecutor

    url = _server_url()
    return E2BExecutor(
        api_key="fake-key",
        timeout_s=2.0,
        start_jitter_s=0.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        sdk_options={"api_url": url, "sandbox_url": url},
    )


FACTORIES = {"e2b-fake": e2b_fake}
