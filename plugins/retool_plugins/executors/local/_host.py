"""The trainer's side of LocalSandbox's machinery: the zygote process, and killing a process tree.

Nothing here runs model code; it all runs in the trainer, on the event loop's thread, and never blocks it for
more than a few system calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any


class ZygoteLost(Exception):
    """The zygote is gone (it crashed, or the trainer closed it); its sessions are gone with it."""


# ---- the zygote ----------------------------------------------------------------------------------------------


class Zygote:
    """The trainer's handle on a zygote process: start it, ask it for workers, hear when they end.

    Bound to the event loop that started it (its socket is registered there).
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self.sock = sock
        self.loop = loop
        self.hello: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.pending: dict[int, asyncio.Future[tuple[int, int | None]]] = {}
        self.exits: dict[int, asyncio.Future[int | None]] = {}
        self.lost = False
        self.next_id = 0
        loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def start(cls, config: dict[str, Any], env: dict[str, str], timeout_s: float) -> Zygote:
        """Start a zygote and wait for its hello (preloads included); raises :class:`ZygoteLost`."""
        loop = asyncio.get_running_loop()
        # Message boundaries and fds in one call; SOCK_SEQPACKET also reports the zygote's death as EOF.
        # macOS has no AF_UNIX SOCK_SEQPACKET: datagrams keep the boundaries, and spawn() times out instead.
        kind = socket.SOCK_SEQPACKET if sys.platform.startswith("linux") else socket.SOCK_DGRAM
        mine, theirs = socket.socketpair(socket.AF_UNIX, kind)
        argv = [sys.executable, "-I", "-m", "retool_plugins.executors.local._zygote", str(theirs.fileno())]
        try:
            # Started from the loop's thread, as asyncio's own subprocesses are: the zygote asks to be killed
            # when the thread that started it ends (PR_SET_PDEATHSIG), and this thread lives with the loop.
            proc = subprocess.Popen(
                [*argv, json.dumps({**config, "parent_pid": os.getpid()})],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # RETOOL_SANDBOX_DEBUG=1 lets the zygote (and the workers' fd 2) write to the trainer's stderr.
                stderr=None if os.environ.get("RETOOL_SANDBOX_DEBUG") else subprocess.DEVNULL,
                cwd="/",
                env=env,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
            )
        except Exception as exc:
            mine.close()
            raise ZygoteLost(f"could not start the sandbox's zygote process: {exc}") from exc
        finally:
            theirs.close()
        mine.setblocking(False)
        zygote = cls(proc, mine, loop)
        try:
            await asyncio.wait_for(asyncio.shield(zygote.hello), timeout_s)
        except (asyncio.TimeoutError, ZygoteLost) as exc:
            zygote.kill()
            await zygote.reap()
            reason = f"no answer in {timeout_s:g} s"
            if proc.returncode is not None:
                reason = f"exit status {proc.returncode}"
            raise ZygoteLost(f"the sandbox's zygote process failed to start ({reason})") from exc
        return zygote

    @property
    def layers(self) -> dict[str, tuple[bool, str]]:
        return {name: (bool(v[0]), str(v[1])) for name, v in self.hello.result()["layers"].items()}

    @property
    def warnings(self) -> list[str]:
        return [str(w) for w in self.hello.result().get("warnings") or []]

    def active(self, layer: str) -> bool:
        return self.layers.get(layer, (False, ""))[0]

    async def spawn(self, uid: int | None, scratch: str | None, fds: list[int]) -> tuple[int, int, int | None]:
        """Ask for a worker; returns ``(worker id, pid, pidfd or None)``. The fds are the worker's to keep."""
        if self.lost:
            raise ZygoteLost("the sandbox's zygote process is gone")
        self.next_id += 1
        wid = self.next_id
        reply = self.loop.create_future()
        self.pending[wid] = reply
        self.exits[wid] = self.loop.create_future()
        data = json.dumps({"spawn": wid, "uid": uid, "scratch": scratch}).encode()
        try:
            await self._send(data, fds)
            pid, pidfd = await self._reply(reply)
        except BaseException:
            self.pending.pop(wid, None)
            if reply.done() and not reply.cancelled() and reply.exception() is None:
                _close_quietly(reply.result()[1])
            self.exits.pop(wid, None)
            raise
        return wid, pid, pidfd

    async def _reply(self, reply: asyncio.Future[tuple[int, int | None]]) -> tuple[int, int | None]:
        """Wait for a spawn's answer, checking now and then that the zygote still lives."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(reply), 1.0)
            except asyncio.TimeoutError:
                if self.proc.poll() is not None:
                    self._lose()
                    raise ZygoteLost(f"the sandbox's zygote process died ({self.proc.returncode})") from None

    def exited(self, wid: int) -> asyncio.Future[int | None]:
        """Resolved with the wait status of worker ``wid``'s process once the zygote has reaped it."""
        future = self.exits.get(wid)
        if future is None:  # already reported and forgotten
            future = self.loop.create_future()
            future.set_result(None)
        return future

    def forget(self, wid: int) -> None:
        self.exits.pop(wid, None)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        while True:
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:
                writable = self.loop.create_future()
                self.loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self.loop.remove_writer(self.sock.fileno())
            except OSError as exc:
                self._lose()
                raise ZygoteLost(f"the sandbox's zygote process is gone ({exc})") from exc

    def _readable(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lose()
                return
            try:
                message = json.loads(data)
            except ValueError:
                message = {}
            self._handle(message, fds)

    def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        if "hello" in message:
            if not self.hello.done():
                self.hello.set_result(message)
        elif "spawned" in message:
            future = self.pending.pop(message["spawned"], None)
            if future is not None and not future.done():
                if "error" in message:
                    future.set_exception(ZygoteLost(str(message["error"])))
                else:
                    future.set_result((int(message["pid"]), fds[0] if fds else None))
                    fds = fds[1:]
        elif "exited" in message:
            future = self.exits.pop(message["exited"], None)
            if future is not None and not future.done():
                future.set_result(int(message["status"]))
        for fd in fds:  # fds nobody asked for
            _close_quietly(fd)

    def _lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        with contextlib.suppress(Exception):  # the loop may be closed already
            self.loop.remove_reader(self.sock.fileno())
        error = ZygoteLost("the sandbox's zygote process is gone")
        # Its children die with it (parent-death signal): their exits will never be reported.
        for future, outcome in (
            *((f, error) for f in (self.hello, *self.pending.values())),
            *((f, None) for f in self.exits.values()),
        ):
            with contextlib.suppress(Exception):  # a closed loop cannot schedule the callbacks
                if not future.done():
                    if outcome is None:
                        future.set_result(None)
                    else:
                        future.set_exception(outcome)
                        future.exception()  # retrieved: nobody may be waiting on it
        self.pending.clear()
        self.exits.clear()

    def shutdown(self) -> None:
        """Ask the zygote to stop: it reads end-of-file, kills its children and exits."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        """Stop the zygote now; every worker dies with it (parent-death signal)."""
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        self._lose()
        with contextlib.suppress(OSError):
            self.sock.close()

    async def reap(self, timeout_s: float = 10.0) -> None:
        """Wait for the killed zygote without blocking the loop."""
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.05)


def _close_quietly(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---- killing ---------------------------------------------------------------------------------------------


def signal_pidfd(pidfd: int | None, pid: int) -> None:
    """SIGKILL through a pidfd (race-free), else by pid."""
    with contextlib.suppress(OSError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid``, its process group and its descendants (for workers without a PID namespace).

    Returns the descendants it signalled: they are not our children, so :func:`running` tells when they died.
    """
    victims = descendants(pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for victim in (pid, *victims):
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)
    return victims


def running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that have not exited yet (zombies count as exited)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                state = file.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            alive.append(pid)
    return alive


def descendants(root: int) -> list[int]:
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
            with open(f"/proc/{name}/stat", "rb") as file:
                ppid = int(file.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
