"""LocalSandbox: each session is a long-lived Python worker process on this machine.

How it holds its limits against hostile code:

* time: the parent measures wall-clock time and SIGKILLs the worker's whole process group, so nothing inside
  the worker has to cooperate (ignored signals, one long C call and busy loops are all stopped);
* memory: ``RLIMIT_AS`` in the worker, so a large allocation fails with ``MemoryError``;
* output: the worker keeps only the head and a rolling tail of what a cell prints, and the parent never reads
  more than one bounded reply;
* isolation: one process (and process group) per session, a scrubbed environment, and a private scratch
  directory as working directory and ``HOME``, removed when the session closes.

It is a process sandbox, not a security boundary: the code runs as the trainer's user (as root it can even
raise its own rlimits) and can reach the file system and the network. Use a container-based executor for code
you would not run yourself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from retool.executor import Executor
from retool.types import ExecutionResult
from retool_plugins.executors import _worker

logger = logging.getLogger(__name__)

_WORKER = Path(_worker.__file__).resolve()
_FSIZE_BYTES = 64 * 1024 * 1024  # largest file a cell may write
_NOFILE = 256  # open files per worker
_START_TIMEOUT_S = 60.0  # a worker's start, preloads included (sympy alone takes ~0.5 s)
_EXIT_GRACE_S = 1.0  # after the reply pipe closes, how long a dying worker gets to exit on its own
_REAP_TIMEOUT_S = 10.0
_READ_LIMIT = 64 * 1024  # bytes the reply stream buffers before it stops reading the pipe


class _WorkerLost(Exception):
    """The worker closed its reply pipe (``closed``) or sent something that is not a valid reply."""

    def __init__(self, message: str, closed: bool = True) -> None:
        super().__init__(message)
        self.closed = closed


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    scratch: str
    reader: asyncio.StreamReader
    files: tuple[BinaryIO, BinaryIO]  # reply pipe, request pipe (owned by the transports once connected)
    mirror_fd: int | None
    read_transport: asyncio.ReadTransport | None = None
    write_transport: asyncio.WriteTransport | None = None
    seq: int = 0


@dataclass(eq=False)
class _Session:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    worker: _Worker | None = None
    restarted: bool = False  # state was lost; the next cell's result says so


class LocalSandbox(Executor):
    """Runs each session's cells in its own persistent Python process on this machine.

    Variables, imports and functions persist between the cells of a session, as in a notebook, and a bare
    expression on a cell's last line shows its value. The worker uses this interpreter (``sys.executable``)
    and its installed packages, in a scrubbed environment, with a private scratch directory as working
    directory. A cell that runs too long or crashes the interpreter kills only its session's worker; the next
    cell starts a fresh one and reports ``session_restarted``. Not a security boundary: see the module docs.

    Args:
        timeout_s: Wall-clock limit of one cell, in seconds; the worker is killed when it is exceeded.
        memory_mb: Address-space limit of a session's worker in MiB (``RLIMIT_AS``), or ``None`` for none.
            An allocation beyond it raises ``MemoryError`` in the cell (``stop_reason="memory"``).
        max_output_chars: Characters of stdout and stderr kept per cell, together; longer output keeps its
            head and tail with a marker in between (``truncated=True``).
        preload: Modules each worker imports when it starts (bound in the session's namespace), so that cells
            do not pay for slow imports such as ``numpy`` or ``sympy``. Defaults to ``["math"]``.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int | None = 1024,
        max_output_chars: int = 2000,
        preload: list[str] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if memory_mb is not None and memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, or None for no limit; got {memory_mb!r}")
        if max_output_chars < 0:
            raise ValueError(f"max_output_chars must be >= 0, got {max_output_chars!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self.max_output_chars = max_output_chars
        self.preload = list(preload) if preload is not None else ["math"]
        # JSON needs at most 6 bytes per character (\u00XX escapes); 64 KiB more for keys and warnings.
        self._frame_limit = 6 * (max_output_chars + _worker.error_budget(max_output_chars) + 256) + 65536
        self._mirror_size = _worker.mirror_size(max_output_chars)
        self._sessions: dict[str, _Session] = {}
        self._warned: set[str] = set()
        # Every running worker with its scratch directory, for the finalizer: it holds no reference to self.
        self._live: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
        self._finalizer = weakref.finalize(self, _kill_all, self._live)

    async def execute(self, code: str, session: str) -> ExecutionResult:
        """Run ``code`` in ``session``'s worker (started on first use) and report what happened.

        ``wall_s`` includes the start of the worker when the cell needs one (about 30 ms, plus the preloads).
        """
        state = self._sessions.setdefault(session, _Session())
        async with state.lock:  # one session's cells run one after another
            start = time.monotonic()
            try:
                result = await self._execute_locked(state, code)
            except asyncio.CancelledError:
                # The caller gave up on the cell: stop it now, it must not keep running unobserved.
                worker, state.worker = state.worker, None
                if worker is not None:
                    state.restarted = True
                    _kill(worker.proc)
                    _spawn_task(self._cleanup(worker))
                raise
            except Exception as exc:  # a bug or an OS limit here must not take the trainer down
                logger.exception("LocalSandbox failed to run a cell")
                await self._discard(state)
                state.restarted = True
                result = ExecutionResult(error=f"SandboxError: {exc!r}", stop_reason="crash")
            return replace(result, wall_s=time.monotonic() - start)

    async def close_session(self, session: str) -> None:
        """Kill ``session``'s worker (even mid-cell) and remove its scratch directory; unknown names are ignored."""
        state = self._sessions.pop(session, None)
        if state is None:
            return
        if state.worker is not None:
            _kill(state.worker.proc)  # a running cell ends now instead of at its timeout
        async with state.lock:
            await self._discard(state)

    async def aclose(self) -> None:
        """Close every session; safe to call twice."""
        await asyncio.gather(*(self.close_session(name) for name in list(self._sessions)))

    async def _execute_locked(self, state: _Session, code: str) -> ExecutionResult:
        restarted = state.restarted
        if state.worker is not None and not _alive(state.worker.proc):
            await self._discard(state)  # it died between cells (e.g. a thread the cell started called os._exit)
            state.restarted = restarted = True
        if state.worker is None:
            try:
                state.worker = await self._start()
            except _WorkerLost as exc:
                return ExecutionResult(error=str(exc), stop_reason="crash", session_restarted=restarted)
        state.restarted = False
        worker = state.worker
        assert worker.write_transport is not None
        worker.seq += 1
        worker.write_transport.write(_frame({"seq": worker.seq, "code": code}))
        try:
            reply = await asyncio.wait_for(self._recv(worker), self.timeout_s)
            if reply.get("seq") != worker.seq:
                raise _WorkerLost("sent a reply out of turn", closed=False)
        except asyncio.TimeoutError:
            error = f"TimeoutError: the cell ran longer than {self.timeout_s:g} s and was stopped"
            return await self._stopped(state, restarted, error, timed_out=True, stop_reason="timeout")
        except _WorkerLost as exc:
            how = await _exit_status(worker.proc) if exc.closed else None
            error = f"InterpreterCrash: the Python interpreter crashed ({how or exc})"
            return await self._stopped(state, restarted, error, stop_reason="crash")
        return ExecutionResult(
            stdout=reply["stdout"] if isinstance(reply.get("stdout"), str) else "",
            stderr=reply["stderr"] if isinstance(reply.get("stderr"), str) else "",
            error=reply["error"] if isinstance(reply.get("error"), str) else None,
            truncated=bool(reply.get("truncated")),
            stop_reason="memory" if reply.get("memory") else None,
            session_restarted=restarted,
        )

    async def _stopped(self, state: _Session, restarted: bool, error: str, **fields: Any) -> ExecutionResult:
        """End a cell stopped from outside: kill its worker, keep what it printed, restart the session next time."""
        assert state.worker is not None
        _kill(state.worker.proc)  # first, so that its output no longer changes while we read it
        stdout, stderr, truncated = self._partial_output(state.worker)
        await self._discard(state)
        state.restarted = True
        error += "; the session's variables were lost"
        return ExecutionResult(stdout, stderr, error, truncated=truncated, session_restarted=restarted, **fields)

    async def _start(self) -> _Worker:
        """Start a worker in a fresh scratch directory and wait until it is ready; raises ``_WorkerLost``."""
        loop = asyncio.get_running_loop()
        scratch = tempfile.mkdtemp(prefix="retool-sandbox-")
        mirror_fd = _make_mirror(self._mirror_size)
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        limits = {"memory_mb": self.memory_mb, "fsize": _FSIZE_BYTES, "nofile": _NOFILE}
        config = {"parent_pid": os.getpid(), "max_output_chars": self.max_output_chars, "preload": self.preload}
        passed = [req_r, rep_w] + ([] if mirror_fd is None else [mirror_fd])
        argv = [sys.executable, "-I", str(_WORKER), str(req_r), str(rep_w), str(-1 if mirror_fd is None else mirror_fd)]
        try:
            # Popen runs on the loop's thread, as asyncio's own subprocess support does: the worker asks to be
            # killed when the thread that forked it ends (PR_SET_PDEATHSIG), and this thread lives with the loop.
            # No preexec_fn (unsafe in a threaded parent): the worker sets its own rlimits.
            proc = subprocess.Popen(
                [*argv, json.dumps({**config, **limits})],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=scratch,
                env=_worker_env(scratch),
                pass_fds=passed,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except Exception as exc:
            for fd in (*passed, req_w, rep_r):
                os.close(fd)
            shutil.rmtree(scratch, ignore_errors=True)
            raise _WorkerLost(f"SandboxError: could not start the Python worker: {exc}") from exc
        os.close(req_r)  # the child's ends: with them closed here, the worker's death shows as EOF
        os.close(rep_w)
        files = (os.fdopen(rep_r, "rb", buffering=0), os.fdopen(req_w, "wb", buffering=0))
        worker = _Worker(proc, scratch, asyncio.StreamReader(limit=_READ_LIMIT), files, mirror_fd)
        self._live[id(proc)] = (proc, scratch)
        try:
            worker.read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(worker.reader), files[0]
            )
            worker.write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, files[1])
            ready = await asyncio.wait_for(self._recv(worker), _START_TIMEOUT_S)
            if not ready.get("ready"):
                raise _WorkerLost("sent no ready message", closed=False)
        except asyncio.CancelledError:
            _kill(proc)
            _spawn_task(self._cleanup(worker))
            raise
        except (asyncio.TimeoutError, _WorkerLost, OSError) as exc:
            how = await _exit_status(proc) if isinstance(exc, _WorkerLost) and exc.closed else None
            _kill(proc)
            await self._cleanup(worker)
            how = how or str(exc) or f"no answer in {_START_TIMEOUT_S:g} s"
            raise _WorkerLost(f"SandboxError: the Python worker failed to start ({how})") from exc
        for warning in ready.get("warnings") or []:
            if warning not in self._warned:  # once per executor, not once per session
                self._warned.add(warning)
                logger.warning("LocalSandbox: %s", warning)
        return worker

    async def _recv(self, worker: _Worker) -> dict[str, Any]:
        try:
            header = await worker.reader.readexactly(4)
            size = int.from_bytes(header, "big")
            if size > self._frame_limit:
                raise _WorkerLost(f"sent a {size}-byte reply, over the {self._frame_limit}-byte limit", closed=False)
            message = json.loads(await worker.reader.readexactly(size))
        except asyncio.IncompleteReadError as exc:
            raise _WorkerLost("closed its reply pipe") from exc
        except ValueError as exc:
            raise _WorkerLost("sent an invalid reply", closed=False) from exc
        if not isinstance(message, dict):
            raise _WorkerLost("sent an invalid reply", closed=False)
        return message

    def _partial_output(self, worker: _Worker) -> tuple[str, str, bool]:
        """What a killed or crashed cell had printed: the heads of its streams, from the shared mirror."""
        if worker.mirror_fd is None:
            return "", "", False
        data = os.pread(worker.mirror_fd, self._mirror_size, 0)
        out, err, lost = _worker.read_mirror(data, self.max_output_chars)
        budget = self.max_output_chars
        stdout, stderr, cut = _worker.fit(_worker.clip_text(out, budget), _worker.clip_text(err, budget), budget)
        return stdout, stderr, cut or lost

    async def _discard(self, state: _Session) -> None:
        worker, state.worker = state.worker, None
        if worker is not None:
            _kill(worker.proc)
            await self._cleanup(worker)

    async def _cleanup(self, worker: _Worker) -> None:
        """Release a killed worker: its pipes, its process entry (reaped, no zombie) and its scratch directory."""
        with contextlib.suppress(Exception):  # e.g. the loop that made them is closed
            if worker.read_transport is not None:
                worker.read_transport.close()
            if worker.write_transport is not None:
                worker.write_transport.abort()  # drop unsent code rather than wait on a dead reader
        for file in worker.files:
            file.close()  # idempotent; covers a start that failed before the transports existed
        if worker.mirror_fd is not None:
            os.close(worker.mirror_fd)
            worker.mirror_fd = None
        await _reap(worker.proc)
        self._live.pop(id(worker.proc), None)
        await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, worker.scratch, True)


def _worker_env(scratch: str) -> dict[str, str]:
    """The worker's whole environment: nothing of the trainer's (tokens, keys) leaks into a cell."""
    # One BLAS/OpenMP thread per session: a trainer runs many sessions at once on a few cores.
    threads = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    text = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    # TMPDIR too, so that tempfile's files go away with the session.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, **text, **threads}


def _frame(message: dict[str, Any]) -> bytes:
    data = json.dumps(message).encode("utf-8")  # ASCII escapes: even lone surrogates in the code survive
    return len(data).to_bytes(4, "big") + data


def _make_mirror(size: int) -> int | None:
    """A memfd for the worker's output heads, or ``None`` where the platform has none (then no partial output)."""
    try:
        fd = os.memfd_create("retool-sandbox-output")  # Linux only: AttributeError elsewhere
    except (AttributeError, OSError):
        return None
    os.ftruncate(fd, size)
    return fd


def _spawn_task(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.add(task)  # a task nobody references can be garbage-collected before it finishes
    task.add_done_callback(_TASKS.discard)


_TASKS: set[asyncio.Task[Any]] = set()


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the worker still runs, without reaping it (a reaped pid could be reused, and we kill by pid)."""
    if proc.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


async def _exit_status(proc: subprocess.Popen[bytes]) -> str | None:
    """How a worker that closed its pipe ended, after a short wait for it to exit; ``None`` if it still runs."""
    deadline = time.monotonic() + _EXIT_GRACE_S
    while _alive(proc):
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.005)
    _kill(proc)  # its children may live on in its process group
    await _reap(proc)
    code = proc.returncode
    if code is None or code >= 0:
        return None if code is None else f"exit code {code}"
    names = {number.value: number.name for number in signal.Signals}
    return f"killed by signal {names.get(-code, -code)}"


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a killed worker without blocking the loop; a zombie left past the timeout is reaped by Popen."""
    deadline = time.monotonic() + _REAP_TIMEOUT_S
    delay = 0.001
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.05)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker, its process group, and its descendants that left the group."""
    if proc.returncode is not None:
        return  # already reaped: its pid may belong to another process by now
    victims = _descendants(proc.pid)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in (proc.pid, *victims):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _descendants(root: int) -> list[int]:
    """Pids below ``root`` (Linux /proc; elsewhere none): a cell may start processes in a new session."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat.rsplit(b")", 1)[1].split()[1])  # the command name may itself contain ")"
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_all(live: dict[int, tuple[subprocess.Popen[bytes], str]]) -> None:
    """Finalizer (garbage collection or interpreter exit without ``aclose``): kill, reap and clean up everything."""
    for proc, scratch in list(live.values()):
        _kill(proc)
        with contextlib.suppress(Exception):
            proc.wait(timeout=2)
        shutil.rmtree(scratch, ignore_errors=True)
    live.clear()
