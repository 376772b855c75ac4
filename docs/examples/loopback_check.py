"""A network self-check for `retool sandbox check`: can a cell reach a port open on the host's loopback?"""

from __future__ import annotations

import socket

from retool import CheckResult, Executor


async def loopback_check(executor: Executor) -> CheckResult:
    """Open a real port on 127.0.0.1 here, then try to connect to it from a cell of ``executor``."""
    with socket.socket() as server:  # a port on this machine's loopback, open for real
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = await executor.execute(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", "self-check"
        )
    await executor.close_session("self-check")
    blocked = result.error is not None
    return CheckResult("network", blocked, blocked, f"connect to the host's port {port}: {result.error or 'connected'}")
