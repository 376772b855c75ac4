"""Helpers of :class:`E2BExecutor` that do not need its state: what a failed request means, the lazy SDK import
and the exit-time kill. Nothing here imports the SDK at module level."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("retool_plugins.executors.e2b")

INSTALL_HINT = "E2BExecutor needs the E2B SDK: pip install 'retool[e2b]'"
RETRY, LOST, FATAL = "retry", "lost", "fatal"
_STATUS = re.compile(r"^(\d{3})\b")  # the SDK's code-interpreter errors start with the HTTP status


def sdk() -> Any:
    """``e2b_code_interpreter``, imported on first use so that recipes load without it."""
    try:
        import e2b_code_interpreter
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return e2b_code_interpreter


def accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether this SDK version's ``function`` takes the keyword ``name`` (the extra allows any 2.x)."""
    return name in inspect.signature(function).parameters


def classify(exc: BaseException) -> str:
    """What a failed request means for the session.

    ``RETRY``: the code never reached the kernel (429, 5xx, a refused connection): send the same request again.
    ``LOST``: the sandbox may have run part of the cell, or be gone (a dropped stream, a 502 or 404 for a dead
    sandbox): try again on a fresh one. ``FATAL``: no retry can help (a bad key or template, a bug).
    """
    import httpx
    from e2b import exceptions as e2b

    if isinstance(exc, (e2b.AuthenticationException, e2b.InvalidArgumentException, e2b.TemplateException)):
        return FATAL
    if isinstance(exc, (e2b.RateLimitException, e2b.ServiceBusyException, httpx.ConnectError, ConnectionRefusedError)):
        return RETRY
    if isinstance(exc, (e2b.TimeoutException, e2b.NotFoundException, httpx.TransportError, OSError)):
        return LOST
    if not isinstance(exc, e2b.SandboxException):
        return FATAL  # not the service's doing: retrying would only repeat it
    status = exc.status_code
    if status is None and (match := _STATUS.match(str(exc))):
        status = int(match.group(1))
    if status is not None and (status == 429 or status >= 500):
        return RETRY
    return FATAL if status is not None and 400 <= status < 500 else LOST


async def is_running(sandbox: Any) -> bool:
    try:
        return bool(await sandbox.is_running())
    except Exception:
        return True  # unknown: keep it; a dead one fails the next request again


def kill_leftovers(live: dict[str, None], options: dict[str, Any]) -> None:
    """Kill the sandboxes an executor never closed, when it is collected or the interpreter exits.

    Synchronous, one after another, with the SDK's sync API: at exit no event loop can be relied on, and no new
    thread may start.
    """
    if not live or options.get("debug"):
        return
    try:
        from e2b_code_interpreter import Sandbox
    except ImportError:
        return
    for sandbox_id in list(live):
        try:
            Sandbox.kill(sandbox_id, **options)
            live.pop(sandbox_id, None)
        except Exception as exc:
            logger.warning("could not kill E2B sandbox %s at exit: %r", sandbox_id, exc)
