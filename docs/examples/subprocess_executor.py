"""A minimal executor: every cell runs in a fresh ``python -I -c`` process, with a timeout.

It is *stateless* (a cell does not see the variables of the cell before it) and isolates nothing beyond a
process of its own and a scrubbed environment: a tutorial, not a sandbox. The contract tests in
``tests/contract`` run against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

from retool import ExecutionResult, Executor


class SubprocessExecutor(Executor):
    """Runs each cell in a new Python process (``sys.executable -I -c CODE``).

    Args:
        timeout_s: Wall-clock limit of one cell; past it the cell's process group is killed.
        max_output_chars: Characters kept of stdout and of stderr each; the rest is read and dropped.
    """

    stateful = False  # each cell starts from nothing: the contract tests skip what needs state

    def __init__(self, timeout_s: float = 5.0, max_output_chars: int = 2000) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self._running: set[asyncio.subprocess.Process] = set()

    async def execute(self, code: str, session: str) -> ExecutionResult:
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # ignore the user's site-packages and PYTHON* variables
            "-c",
            code,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"},  # none of the trainer's secrets
            start_new_session=True,  # its own process group, so that a timeout kills its children too
        )
        self._running.add(proc)
        reading = asyncio.gather(self._read(proc.stdout), self._read(proc.stderr), proc.wait())
        try:
            (out, cut_out), (err, cut_err), code_ = await asyncio.wait_for(reading, self.timeout_s)
        except asyncio.TimeoutError:
            _kill(proc)
            await proc.wait()
            return ExecutionResult(
                error=f"TimeoutError: the cell ran longer than {self.timeout_s:g} s",
                timed_out=True,
                stop_reason="timeout",
                wall_s=time.monotonic() - start,
            )
        finally:
            self._running.discard(proc)
        error = None
        if code_ != 0:
            lines = [line for line in err.splitlines() if line.strip()]
            error = lines[-1] if lines else f"the process ended with exit code {code_}"
        return ExecutionResult(
            stdout=out,
            stderr=err,
            error=error,
            truncated=cut_out or cut_err,
            stop_reason="crash" if code_ < 0 else None,  # killed by a signal (a segfault, say)
            wall_s=time.monotonic() - start,
        )

    async def _read(self, stream: asyncio.StreamReader | None) -> tuple[str, bool]:
        """Read a stream to its end, keeping at most ``max_output_chars`` bytes: a flood costs no memory."""
        kept, cut = b"", False
        while stream is not None and (chunk := await stream.read(65536)):
            room = self.max_output_chars - len(kept)
            kept += chunk[:room]
            cut = cut or len(chunk) > room
        return kept.decode("utf-8", "replace"), cut

    async def close_session(self, session: str) -> None:
        pass  # nothing outlives a cell

    async def aclose(self) -> None:
        for proc in list(self._running):
            _kill(proc)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
