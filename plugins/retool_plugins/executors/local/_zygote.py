"""The zygote: a warm Python process that forks one sandboxed worker per LocalSandbox session.

The trainer starts it once per sandbox as ``python -I -m retool_plugins.executors.local._zygote CTRL_FD CONFIG``, with
a scrubbed environment and fds 0-2 on ``/dev/null``; it never forks the trainer itself, whose threads make
``fork`` unsafe. The zygote joins the sandbox's cgroups, probes which isolation layers the machine supports,
imports the preloaded modules (numpy, sympy, ...) and warms them up, then serves the trainer on ``CTRL_FD``, a
``SOCK_SEQPACKET`` socket: each message is one JSON object, with fds passed beside it (``SCM_RIGHTS``).

* the zygote says hello: ``{"hello": pid, "layers": {name: [active, detail]}, "warnings": [...]}``;
* the trainer asks for a worker: ``{"spawn": id, "uid": uid or null, "scratch": path or null}`` with the fds of
  the worker's protocol socket and of its output memfd;
* the zygote answers ``{"spawned": id, "pid": pid}`` with a pidfd of the new process (or ``{"spawned": id,
  "error": text}``), and later ``{"exited": id, "status": wait status}`` once it has reaped it.

With the PID-namespace layer the zygote's child is the *init* of a fresh PID namespace: it enters the other
namespaces, builds the private file system, forks the worker, reaps every orphan, records the worker's wait
status in the memfd when it ends, and exits, which makes the kernel kill whatever the session left running.
Without it the zygote's child is the worker itself, and the zygote makes itself the child subreaper: a process
that a cell detaches (``setsid`` and a double fork) is then reparented to the zygote rather than to the host's
init, and the zygote kills it (it has no session to live with, and nothing else would ever end it).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from retool_plugins.executors.local import _isolation as iso
from retool_plugins.executors.local import _worker

ALWAYS_ON = {
    "environment": "the worker's environment is built from nothing: 8 fixed variables, none of the trainer's",
    "timeout": "past timeout_s the trainer SIGKILLs {victim}",
    "output-cap": "the worker keeps the head and tail of max_output_chars; the trainer reads bounded replies",
}

# How often the zygote, as subreaper (no PID namespace), looks for detached processes to kill.
_SWEEP_EVERY_S = 0.25

# Small calls that pull in each module's lazily imported parts, so that a session's first cell does not pay.
_WARMUPS = {
    "numpy": "numpy.linalg.solve(numpy.eye(2), numpy.ones(2)); numpy.random.default_rng(0).random(3)",
    "sympy": (
        "_x = sympy.Symbol('x'); sympy.solve(_x**2 - 4, _x); sympy.simplify(sympy.sin(_x)**2 + sympy.cos(_x)**2);"
        "sympy.factorint(360); sympy.Rational(1, 3) + sympy.Rational(1, 6); sympy.integrate(_x**2, _x);"
        "sympy.latex(_x**2); sympy.nsimplify(0.5); sympy.isprime(97)"
    ),
}


class Zygote:
    """The zygote's state: its configuration, the layers in force, and the workers it has not reaped yet."""

    def __init__(self, ctrl: socket.socket, config: dict[str, Any]) -> None:
        self.ctrl = ctrl
        self.config = config
        self.layers: dict[str, tuple[bool, str]] = {}
        self.warnings: list[str] = []
        self.preloaded: dict[str, Any] = {}
        self.children: dict[int, int] = {}  # pid -> worker id
        self.seccomp: bytes | None = None  # the compiled filter, loaded by each worker
        self.view: list[str] = []  # the host paths a cell sees, besides the system trees
        self.own_pidns = -1
        self.subreaper = False  # without a PID namespace: orphans of the sessions become ours, to be killed
        self._last_sweep = 0.0

    def active(self, layer: str) -> bool:
        return self.layers.get(layer, (False, ""))[0]

    def start(self) -> None:
        """Everything before serving: cgroups, probe, preloads, warm-up; then the hello message."""
        self.layers.update(self._join_cgroups())
        _one_malloc_arena()
        if self.config["isolation"]:
            self.layers.update(iso.probe())
            if not self.active("pid-namespace") and self.active("filesystem"):
                # A fresh /proc needs a PID namespace of its own; the host's would show every process.
                self.layers["filesystem"] = (False, "needs the PID namespace for a private /proc")
        else:
            off = "off (isolation=False)"
            self.layers.update({name: (False, off) for name in (*iso.NAMESPACE_LAYERS, *iso.PRIVILEGE_LAYERS)})
            self.layers["cgroups"] = (False, off)
        victim = "the session's PID-namespace init (the kernel kills the rest)"
        if not self.active("pid-namespace"):
            victim = "the worker, its process group and its descendants"
        for name, detail in ALWAYS_ON.items():
            self.layers[name] = (True, detail.format(victim=victim))
        self._preload()
        if self.active("seccomp"):
            try:
                built = iso.build_seccomp()
            except Exception as exc:
                self.layers["seccomp"] = (False, f"unavailable: {exc}")
            else:
                self.seccomp = built.program  # loaded even when a rule failed: a partial filter beats none
                self.layers["seccomp"] = built.layer()
        if self.active("pid-namespace"):
            self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        if self.active("filesystem"):
            self._build_view()
        elif sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                iso.prctl(iso.PR_SET_CHILD_SUBREAPER, 1)
                self.subreaper = True
        if threading.active_count() > 1 or _thread_count() > 1:
            self.warnings.append("a preloaded module started threads in the zygote; forking it is not safe")
        gc.collect()
        gc.freeze()  # workers' garbage collections then leave the zygote's objects (and their pages) alone
        self.send({"hello": os.getpid(), "layers": self.layers, "warnings": self.warnings})

    def _build_view(self) -> None:
        """Become the root of the view every session copies (see :func:`iso.build_view`), once, after the preloads."""
        self.view = iso.interpreter_paths(self.preloaded.values())
        try:
            iso.build_view(self.view)
        except OSError as exc:
            self.layers["filesystem"] = (False, f"could not build the sandbox's file system view: {exc}")
            return
        trees = [tree for tree in iso.SYSTEM_TREES if os.path.exists(tree)]
        self.layers["filesystem"] = (
            True,
            "a root of its own holding only " + ", ".join([*trees, *self.view]) + " (read-only), a minimal /etc "
            f"(hostname {iso.HOSTNAME!r}, no host users), /dev and /proc; writable: a private tmpfs at /tmp and "
            "/dev/shm",
        )

    def _join_cgroups(self) -> dict[str, tuple[bool, str]]:
        paths = self.config["cgroups"]
        if not paths:
            return {"cgroups": (False, self.config["cgroups_detail"])}
        try:
            for path in paths:  # "0" moves the writer itself; every process it forks stays inside
                with open(path, "w") as file:
                    file.write("0")
        except OSError as exc:
            return {"cgroups": (False, f"could not join the sandbox's cgroup: {exc}")}
        return {"cgroups": (True, self.config["cgroups_detail"])}

    def _preload(self) -> None:
        for name in self.config["preload"]:
            try:
                module = __import__(name)
            except ModuleNotFoundError as exc:
                if self.config["preload_optional"] and exc.name == name:
                    continue  # a default module that is not installed here
                self.warnings.append(f"preload of {name!r} failed: {type(exc).__name__}: {exc}"[:500])
                continue
            except BaseException as exc:
                self.warnings.append(f"preload of {name!r} failed: {type(exc).__name__}: {exc}"[:500])
                continue
            self.preloaded[name.partition(".")[0]] = module  # binds like `import name` would
            if name in _WARMUPS:
                try:
                    exec(_WARMUPS[name], {name: module})
                except Exception as exc:
                    self.warnings.append(f"warm-up of {name!r} failed: {type(exc).__name__}: {exc}"[:500])

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode()
        if fds:
            socket.send_fds(self.ctrl, [data], fds)
        else:
            self.ctrl.send(data)

    def serve(self) -> None:
        """Answer spawn requests and report reaped workers until the trainer closes the socket."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake the select below
        parent = self.config["parent_pid"]
        while True:
            ready, _, _ = select.select([self.ctrl, wake_r], [], [], _SWEEP_EVERY_S if self.subreaper else 1.0)
            if os.getppid() != parent:  # the trainer is gone (where no parent-death signal told us)
                self.sweep(everything=True)
                return
            if wake_r in ready:
                os.read(wake_r, 4096)
            if self.ctrl in ready:
                data, fds, _, _ = socket.recv_fds(self.ctrl, 65536, 4)
                if not data:  # the trainer is gone or closed the sandbox
                    self.sweep(everything=True)
                    return
                self.spawn(json.loads(data), fds)
            self.reap()
            self.sweep()

    def reap(self) -> None:
        while True:  # workers, and (as the subreaper) the orphans that sweep() killed
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = self.children.pop(pid, None)
            if wid is not None:
                self.send({"exited": wid, "status": status})

    def sweep(self, everything: bool = False) -> None:
        """As the subreaper, SIGKILL every child that is not a worker: a process some session detached.

        Throttled to one /proc scan per ``_SWEEP_EVERY_S`` (a busy sandbox wakes the zygote often); the
        trainer's kill of a session still reaches the worker and what it left below it at once.
        """
        now = time.monotonic()
        if not self.subreaper or (not everything and now - self._last_sweep < _SWEEP_EVERY_S):
            return
        self._last_sweep = now
        for pid in _children_of(os.getpid()):
            if everything or pid not in self.children:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.reap()

    def spawn(self, request: dict[str, Any], fds: list[int]) -> None:
        wid = request["spawn"]
        data_fd, mirror_fd = fds[0], (fds[1] if len(fds) > 1 else -1)
        pidns = self.active("pid-namespace")
        try:
            if pidns:
                iso.unshare(iso.CLONE_NEWPID)  # the next child is the first process (PID 1) of a new namespace
            try:
                pid = os.fork()
                if pid == 0:  # pragma: no cover - runs in the child
                    self._child(request, data_fd, mirror_fd)
            finally:
                if pidns:
                    iso.setns(self.own_pidns, iso.CLONE_NEWPID)  # later children: our own namespace again
        except OSError as exc:
            self.send({"spawned": wid, "error": f"could not fork a worker: {exc}"})
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = wid
        pidfd = -1
        with contextlib.suppress(AttributeError, OSError):  # not reaped yet, so the pid is still ours
            pidfd = os.pidfd_open(pid)
        try:
            self.send({"spawned": wid, "pid": pid}, [pidfd] if pidfd >= 0 else None)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _child(self, request: dict[str, Any], data_fd: int, mirror_fd: int) -> None:  # pragma: no cover
        """The zygote's child: the session's init process, or the worker itself. Never returns."""
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # A cell's own SIGINT is its KeyboardInterrupt, however the trainer was started: a trainer started in
            # the background of a script inherits SIGINT ignored, and Python then installs no handler of its own.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _close_all_but({0, 1, 2, data_fd, mirror_fd})
            os.setsid()  # out of the zygote's process group: a cell's kill(0, ...) reaches only the session
            iso.die_with_parent(os.getppid() if not self.active("pid-namespace") else 0)
            if not self.active("pid-namespace"):
                self._become_worker(request, data_fd, mirror_fd)
            self._init(request, data_fd, mirror_fd)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                traceback.print_exc(file=sys.__stderr__)  # /dev/null, unless the trainer sets RETOOL_SANDBOX_DEBUG
            with contextlib.suppress(BaseException):
                _worker._send(data_fd, {"seq": 0, "error": f"the sandbox could not be set up: {exc!r}"[:2000]})
        finally:
            os._exit(code)

    def _init(self, request: dict[str, Any], data_fd: int, mirror_fd: int) -> None:  # pragma: no cover
        flags = 0
        if self.active("network"):
            flags |= iso.CLONE_NEWNET
        if self.active("ipc"):
            flags |= iso.CLONE_NEWIPC | iso.CLONE_NEWUTS
        if self.active("filesystem"):
            flags |= iso.CLONE_NEWNS
        if flags:
            iso.unshare(flags)
        if self.active("ipc"):
            iso.set_hostname()
        if self.active("network"):
            iso.loopback_up()
        uid = request["uid"]
        if self.active("filesystem"):
            iso.enter_filesystem(self.config["scratch_mb"], uid, self.view)
        worker = os.fork()
        if worker == 0:
            self._become_worker(request, data_fd, mirror_fd)
        os.close(data_fd)  # the worker's death must show as EOF to the trainer
        while True:  # PID 1: every orphan of the session is ours to reap
            pid, status = os.waitpid(-1, 0)
            if pid == worker:
                break
        if mirror_fd >= 0:
            _worker.write_status(mirror_fd, self.config["max_output_chars"], status)
        os._exit(0)  # the kernel now kills whatever is left in the namespace

    def _become_worker(self, request: dict[str, Any], data_fd: int, mirror_fd: int) -> None:  # pragma: no cover
        """Finish the worker's confinement (limits, uid, seccomp) and serve cells; never returns."""
        config = self.config
        parent = os.getppid()
        if self.active("pid-namespace"):
            os.setsid()
        scratch = iso.SCRATCH if self.active("filesystem") else request["scratch"]
        uid = request["uid"] if self.active("user") else None
        if not self.active("filesystem"):
            if uid is not None:
                os.chown(scratch, uid, uid)
            os.chdir(scratch)
        os.environ.clear()
        os.environ.update(config["env"], HOME=scratch, TMPDIR=scratch)
        # Under memory pressure a cell dies before the trainer does.
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as file:
            file.write("1000")
        limits = dict(config["limits"])
        if limits.get("as") is not None:
            # The budget is what a cell may add to the preloaded interpreter it starts from.
            limits["as"] = int(limits["as"]) + _vm_size()
        if uid is None:
            limits.pop("nproc", None)  # not enforced for root, and shared by every process of the user
        iso.apply_limits(limits)
        if uid is not None:
            iso.drop_privileges(uid)
            iso.prctl(iso.PR_SET_DUMPABLE, 1)  # the cell owns its /proc/self again (setuid made it root's)
        iso.die_with_parent(parent)  # after setuid, which clears the parent-death signal
        if sys.platform.startswith("linux"):
            iso.no_new_privs()
        if self.seccomp is not None:
            iso.load_seccomp(self.seccomp)
        code = 0
        try:
            _worker.serve(data_fd, mirror_fd, config["max_output_chars"], self.preloaded)
        except BaseException:
            code = 1
            with contextlib.suppress(BaseException):
                os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(code)


def _children_of(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (Linux /proc)."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as file:
                    if int(file.read().rsplit(b")", 1)[1].split()[1]) == parent:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _one_malloc_arena() -> None:
    """Make glibc's malloc share one arena between threads (inherited by every worker).

    By default each new thread reserves a 64 MiB arena of address space, so under ``RLIMIT_AS`` a cell could
    start only a handful of threads; one arena costs a little lock contention instead.
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX


def _close_all_but(keep: set[int]) -> None:
    """Close every fd except ``keep`` (the zygote's socket, other sessions' fds in flight, its pidns handle)."""
    low = 0
    for fd in sorted(k for k in keep if k >= 0):
        if fd > low:  # closerange(n, n) would close everything from n up (it passes high - 1 to close_range)
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _vm_size() -> int:
    """This process's address space in bytes (VmSize), or 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def main(argv: list[str]) -> None:
    ctrl = socket.socket(fileno=int(argv[1]))
    config = json.loads(argv[2])
    iso.die_with_parent(config["parent_pid"])
    zygote = Zygote(ctrl, config)
    zygote.start()
    zygote.serve()


if __name__ == "__main__":
    main(sys.argv)
