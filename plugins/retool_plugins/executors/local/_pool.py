"""LocalSandbox's workers: starting them from the zygote, talking to them, killing and releasing them.

A :class:`Pool` belongs to one LocalSandbox and owns its zygote, its cgroups and the uids of its workers. It
knows nothing about cells or results beyond the protocol's frames; ``local.py`` gives them their meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from retool_plugins.executors.local import _host, _worker
from retool_plugins.executors.local._cgroups import Cgroups, UidPool, make_cgroups
from retool_plugins.executors.local._host import Zygote, ZygoteLost

logger = logging.getLogger("retool_plugins.executors.local")

_START_TIMEOUT_S = 60.0  # the zygote's start, preloads included (numpy + sympy take ~1 s)
_WORKER_START_TIMEOUT_S = 30.0
_EXIT_GRACE_S = 2.0  # after the reply socket closes, how long a dying worker gets to be reported
_REAP_TIMEOUT_S = 10.0
_ZYGOTE_STOP_S = 1.0  # how long a zygote asked to stop gets to kill its children and exit before SIGKILL
_READ_LIMIT = 64 * 1024  # bytes the reply stream buffers before it stops reading the socket


class WorkerLost(Exception):
    """The worker closed its socket (``closed``) or sent something that is not a valid reply."""

    def __init__(self, message: str, closed: bool = True) -> None:
        super().__init__(message)
        self.closed = closed


@dataclass(eq=False)
class Worker:
    """One session's worker as the trainer sees it."""

    zygote: Zygote
    wid: int
    pid: int  # the zygote's child: the session's PID-namespace init, or the worker itself without one
    pidfd: int | None
    pidns: bool
    uid: int | None
    scratch: str | None  # a host folder to remove, where the worker has no private tmpfs
    sock: socket.socket
    mirror_fd: int | None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    seq: int = 0
    victims: list[int] = field(default_factory=list)  # without a PID namespace: what a kill signalled

    @property
    def exited(self) -> asyncio.Future[int | None]:
        return self.zygote.exited(self.wid)

    def gone(self) -> bool:
        """It ended (or closed its socket) while no cell ran."""
        return self.exited.done() or self.reader is None or self.reader.at_eof()


@dataclass(eq=False)
class Live:
    """What the finalizer must clean up; it holds no reference to the sandbox."""

    owner: int = field(default_factory=os.getpid)  # a forked copy of the trainer must not kill its parent's
    zygote: Zygote | None = None
    workers: dict[int, Worker] = field(default_factory=dict)
    cgroups: Cgroups | None = None


class Pool:
    """Starts, watches and kills one sandbox's workers.

    Args:
        cap: ``max_output_chars`` (sizes the memfd and the largest reply).
        config: Builds the zygote's configuration, given the sandbox's cgroups.
        memory_bytes: The memory cgroup's limit for all sessions together.
        isolation: Whether to make cgroups at all.
        on_zygote: Called with each new zygote before it is used (warnings; may raise ``ZygoteLost``).
    """

    def __init__(
        self,
        cap: int,
        config: Callable[[Cgroups], dict[str, Any]],
        memory_bytes: int,
        isolation: bool,
        on_zygote: Callable[[Zygote], None],
    ) -> None:
        self.cap = cap
        self.config = config
        self.memory_bytes = memory_bytes
        self.isolation = isolation
        self.on_zygote = on_zygote
        # JSON needs at most 6 bytes per character (\u00XX escapes); 64 KiB more for keys and warnings.
        self.frame_limit = 6 * (cap + _worker.error_budget(cap) + 256) + 65536
        self.mirror_size = _worker.mirror_size(cap)
        self.live = Live()
        self.uids = UidPool()
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    # ---- the zygote -------------------------------------------------------------------------------------

    def loop_changed(self) -> bool:
        """The zygote belongs to another event loop than the running one."""
        zygote = self.live.zygote
        return zygote is not None and zygote.loop is not asyncio.get_running_loop()

    async def zygote(self) -> Zygote:
        """The running zygote, started (or restarted after a crash) on first use."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        async with self._lock[1]:
            zygote = self.live.zygote
            if zygote is not None and zygote.lost:
                zygote.kill()
                await zygote.reap()
                self.live.zygote = zygote = None
            if zygote is None:
                if self.live.cgroups is None:
                    self.live.cgroups = make_cgroups(self.memory_bytes, self.isolation)
                env = worker_env()
                zygote = await Zygote.start({**self.config(self.live.cgroups), "env": env}, env, _START_TIMEOUT_S)
                try:
                    self.on_zygote(zygote)
                except BaseException:
                    zygote.kill()
                    await zygote.reap()
                    raise
                self.live.zygote = zygote
            return zygote

    async def close(self) -> None:
        """Stop the zygote (its workers die with it) and remove the cgroups."""
        zygote, self.live.zygote = self.live.zygote, None
        if zygote is not None:
            # Asked to stop, it kills what sessions detached (it is their subreaper without a PID namespace)
            # and exits; SIGKILL only if it does not, since its orphans would then pass to the host's init.
            zygote.shutdown()
            await zygote.reap(timeout_s=_ZYGOTE_STOP_S)
            zygote.kill()
            await zygote.reap()
        if self.live.cgroups is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.live.cgroups.remove)
            self.live.cgroups = None

    # ---- workers ------------------------------------------------------------------------------------------

    async def start(self) -> Worker:
        """Fork a confined worker from the zygote and wait until it is ready; raises :class:`WorkerLost`."""
        try:
            zygote = await self.zygote()
        except ZygoteLost as exc:
            raise WorkerLost(f"SandboxError: {exc}") from exc
        uid = self.uids.take() if zygote.active("user") else None
        scratch = None if zygote.active("filesystem") else tempfile.mkdtemp(prefix="retool-sandbox-")
        mirror_fd = make_mirror(self.mirror_size)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno()] + ([] if mirror_fd is None else [mirror_fd])
        try:
            wid, pid, pidfd = await zygote.spawn(uid, scratch, fds)
        except BaseException as exc:
            mine.close()
            if mirror_fd is not None:
                os.close(mirror_fd)
            self.uids.give_back(uid)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(exc, (ZygoteLost, OSError)):
                raise WorkerLost(f"SandboxError: could not start a worker: {exc}") from exc
            raise
        finally:
            theirs.close()
        worker = Worker(zygote, wid, pid, pidfd, zygote.active("pid-namespace"), uid, scratch, mine, mirror_fd)
        self.live.workers[id(worker)] = worker
        try:
            worker.reader, worker.writer = await asyncio.open_unix_connection(sock=mine, limit=_READ_LIMIT)
            ready = await asyncio.wait_for(self.recv(worker), _WORKER_START_TIMEOUT_S)
            if not ready.get("ready"):
                raise WorkerLost(str(ready.get("error") or "sent no ready message"), closed=False)
        except asyncio.CancelledError:
            self.kill(worker)
            spawn_task(self.release(worker))
            raise
        except (asyncio.TimeoutError, WorkerLost, OSError) as exc:
            status = await self.exit_status(worker) if isinstance(exc, WorkerLost) and exc.closed else None
            self.kill(worker)
            await self.release(worker)
            how = describe(status) if status is not None else str(exc) or "timed out"
            raise WorkerLost(f"SandboxError: the Python worker failed to start ({how})") from exc
        return worker

    def send(self, worker: Worker, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode("utf-8")  # ASCII escapes: even lone surrogates in the code survive
        assert worker.writer is not None
        worker.writer.write(len(data).to_bytes(4, "big") + data)

    async def recv(self, worker: Worker) -> dict[str, Any]:
        """The worker's next frame, checked for size and shape; raises :class:`WorkerLost`."""
        assert worker.reader is not None
        try:
            header = await worker.reader.readexactly(4)
            size = int.from_bytes(header, "big")
            if size > self.frame_limit:
                raise WorkerLost(f"sent a {size}-byte reply, over the {self.frame_limit}-byte limit", closed=False)
            message = json.loads(await worker.reader.readexactly(size))
        except asyncio.IncompleteReadError as exc:
            raise WorkerLost("closed its reply pipe") from exc
        except ValueError as exc:
            raise WorkerLost("sent an invalid reply", closed=False) from exc
        if not isinstance(message, dict):
            raise WorkerLost("sent an invalid reply", closed=False)
        return message

    def partial_output(self, worker: Worker) -> tuple[str, str, bool]:
        """What a killed or crashed cell had printed: the heads of its streams, from the shared memfd."""
        if worker.mirror_fd is None:
            return "", "", False
        out, err, lost = _worker.read_mirror(os.pread(worker.mirror_fd, self.mirror_size, 0), self.cap)
        stdout, stderr, cut = _worker.fit(_worker.clip_text(out, self.cap), _worker.clip_text(err, self.cap), self.cap)
        return stdout, stderr, cut or lost

    async def exit_status(self, worker: Worker) -> int | None:
        """The worker's wait status, after a short wait for it to end; ``None`` if it still runs or is unknown."""
        if not worker.pidns:  # the worker is the zygote's child: the zygote reports its status
            try:
                return await asyncio.wait_for(asyncio.shield(worker.exited), _EXIT_GRACE_S)
            except asyncio.TimeoutError:
                return None
        # The session's init records the status in the memfd as soon as it has reaped the worker.
        deadline = time.monotonic() + _EXIT_GRACE_S
        delay = 0.001
        while worker.mirror_fd is not None:
            status = _worker.read_status(os.pread(worker.mirror_fd, self.mirror_size, 0), self.cap)
            if status is not None or time.monotonic() > deadline or worker.exited.done():
                return status
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.02)
        return None

    def kill(self, worker: Worker) -> None:
        """SIGKILL everything of the worker's session; nothing inside has to cooperate."""
        _kill(worker)

    async def release(self, worker: Worker) -> None:
        """Release a killed worker: its socket, its process (reaped by the zygote), its uid and scratch folder."""
        with contextlib.suppress(Exception):  # e.g. the loop that made them is closed
            if worker.writer is not None:
                worker.writer.transport.abort()  # drop unsent code rather than wait on a dead reader
        with contextlib.suppress(OSError):
            worker.sock.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(worker.exited), _REAP_TIMEOUT_S)
        deadline = time.monotonic() + _REAP_TIMEOUT_S
        while worker.victims and time.monotonic() < deadline:  # without a PID namespace nobody else waits
            worker.victims = _host.running(worker.victims)
            await asyncio.sleep(0.002)
        dead = worker.exited.done() and not worker.victims
        if not dead:
            logger.warning("LocalSandbox: worker %s did not end within %s s of SIGKILL", worker.pid, _REAP_TIMEOUT_S)
        for fd in (worker.mirror_fd, worker.pidfd):
            if fd is not None:
                os.close(fd)
        worker.mirror_fd = worker.pidfd = None
        worker.zygote.forget(worker.wid)
        if dead:  # a uid whose processes might live on is not handed out again
            self.uids.give_back(worker.uid)
        self.live.workers.pop(id(worker), None)
        if worker.scratch is not None:
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, worker.scratch, True)


def _kill(worker: Worker) -> None:
    if worker.exited.done():
        return  # reaped already: its pid may belong to another process by now
    if worker.pidns:
        _host.signal_pidfd(worker.pidfd, worker.pid)  # the init: the kernel kills the whole namespace
    else:
        worker.victims += _host.kill_tree(worker.pid)


def describe(status: int) -> str:
    """``exit code N`` or ``killed by signal NAME`` for a wait status."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        names = {s.value: s.name for s in signal.Signals}
        return f"killed by signal {names.get(number, number)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def worker_env() -> dict[str, str]:
    """The zygote's and workers' whole environment: nothing of the trainer's (tokens, keys) leaks into a cell."""
    # One BLAS/OpenMP thread per session: a trainer runs many sessions at once on a few cores, and a zygote
    # with threads could not fork safely.
    threads = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    text = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", **text, **threads}


def make_mirror(size: int) -> int | None:
    """A memfd for the worker's output heads, or ``None`` where the platform has none (then no partial output)."""
    try:
        fd = os.memfd_create("retool-sandbox-output")  # Linux only: AttributeError elsewhere
    except (AttributeError, OSError):
        return None
    os.ftruncate(fd, size)
    return fd


def spawn_task(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.add(task)  # a task nobody references can be garbage-collected before it finishes
    task.add_done_callback(_TASKS.discard)


_TASKS: set[asyncio.Task[Any]] = set()


def finalize(live: Live) -> None:
    """Kill and clean up everything (garbage collection, interpreter exit, a change of event loop)."""
    if os.getpid() != live.owner:
        return  # a forked copy of the trainer: these processes are its parent's
    for worker in list(live.workers.values()):
        with contextlib.suppress(Exception):
            _kill(worker)
        with contextlib.suppress(OSError):
            worker.sock.close()
        for fd in (worker.mirror_fd, worker.pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        worker.mirror_fd = worker.pidfd = None
        if worker.scratch is not None:
            shutil.rmtree(worker.scratch, ignore_errors=True)
    live.workers.clear()
    zygote, live.zygote = live.zygote, None
    if zygote is not None:
        with contextlib.suppress(Exception):
            zygote.kill()
        with contextlib.suppress(Exception):
            zygote.proc.wait(timeout=5)
    if live.cgroups is not None:
        live.cgroups.remove()
        live.cgroups = None
