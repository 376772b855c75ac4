"""Linux isolation primitives for LocalSandbox's workers: namespaces, mounts, a dedicated uid, rlimits, seccomp.

Everything here runs inside the sandbox's own processes (the zygote and the processes it forks), never in the
trainer, and imports only the standard library (``pyseccomp`` lazily). Each function either does its job or
raises ``OSError``; which layers a machine supports is decided once, by :func:`probe`, in a throwaway child.

The layers, by name (the same names ``retool sandbox check`` prints):

* ``network``: a network namespace of its own, holding only a loopback interface that is down, and no route;
* ``filesystem``: a mount namespace where every host mount is read-only, the folders that hold secrets or other
  processes' files (``/root``, ``/home``, ``/tmp``, ``/run``, ...) are empty, and the only writable place is a
  private, size-limited tmpfs at ``/tmp`` (and one at ``/dev/shm``); ``/proc``, ``/sys`` and ``/dev`` are fresh
  and minimal;
* ``pid-namespace``: the session's processes live in a PID namespace of their own (killing its first process
  kills them all) and see only each other in ``/proc``;
* ``ipc``: IPC and UTS namespaces of their own (no System V IPC shared with the host);
* ``user``: the cell runs as a uid of its own, not root, so it cannot raise its rlimits back, and
  ``RLIMIT_NPROC`` bounds the session's processes (``process-limit``);
* ``seccomp``: a syscall filter denies the calls a cell has no use for (ptrace, mount, new namespaces, keyrings,
  bpf, io_uring, ...).

One file, because the layers are applied in one order inside one forked child (namespaces, then mounts, then
the uid and limits, then seccomp) and :func:`probe` tries them in that same order: split up, the order
would live in no single place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import sys
from collections.abc import Iterable
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
_MOUNT_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

NAMESPACE_LAYERS = ("network", "filesystem", "pid-namespace", "ipc")
PRIVILEGE_LAYERS = ("user", "process-limit", "seccomp")

# Folders that hold secrets, other users' files or other processes' sockets: empty inside the sandbox.
HIDDEN = ("/root", "/home", "/tmp", "/var/tmp", "/run", "/mnt", "/media", "/srv")
# A trainer working directory in (or above) one of these is not hidden: the sandbox needs them to run programs.
_SYSTEM = ("/", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/var", "/boot")
_DEVICES = ("null", "zero", "full", "random", "urandom")
SCRATCH = "/tmp"

_libc: Any = None


def libc() -> Any:
    """The C library, loaded once, with errno kept for :func:`_check`."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _libc.unshare.argtypes = [ctypes.c_int]
        _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int) -> None:
    _check(libc().unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(libc().setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc().mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(libc().prctl(option, arg, 0, 0, 0), f"prctl({option})")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends; exit now if the parent is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        prctl(PR_SET_PDEATHSIG, 9)
    if os.getppid() != parent_pid:
        os._exit(0)


# ---- the file system ------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _mounts() -> list[tuple[str, int]]:
    """Mount points of this mount namespace with the flags to keep when they are remounted."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        for line in file:
            fields = line.split()
            flags = 0
            for option in fields[5].split(","):
                flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
            found.append((_unescape(fields[4]), flags))
    return found


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def hidden_folders(extra: Iterable[str]) -> list[str]:
    """The folders to hide: :data:`HIDDEN` plus ``extra`` (the trainer's working folder and home), minus system ones.

    A folder inside another hidden one is dropped: it is gone with its parent.
    """
    chosen: list[str] = []
    for path in (*HIDDEN, *extra):
        path = os.path.realpath(path)
        if path in _SYSTEM or any(_under(system, path) for system in _SYSTEM):
            continue  # hiding /usr or / would leave nothing to run
        if any(_under(path, sys_dir) for sys_dir in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc")):
            continue
        if os.path.isdir(path) and not os.path.islink(path) and path not in chosen:
            chosen.append(path)
    return [p for p in chosen if not any(p != q and _under(p, q) for q in chosen)]


def exposed_paths(hidden: list[str]) -> list[str]:
    """Paths inside hidden folders that the interpreter needs: its prefixes and ``sys.path`` (read-only)."""
    wanted = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]
    found: list[str] = []
    for path in wanted:
        if not path or not os.path.isabs(path) or not os.path.exists(path):
            continue
        path = os.path.realpath(path)
        if any(_under(path, h) for h in hidden) and path not in found:
            found.append(path)
    # A parent makes its children redundant.
    return sorted(p for p in found if not any(p != q and _under(p, q) for q in found))


def enter_filesystem(hidden: list[str], exposed: list[str], scratch_mb: int, uid: int | None) -> None:
    """Make this (new) mount namespace read-only and private; only :data:`SCRATCH` and ``/dev/shm`` are writable.

    Must run as root right after ``unshare(CLONE_NEWNS)``, in the new PID namespace (for the fresh ``/proc``).
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates back to the host
    # Handles on what must stay reachable, taken before the folders that hold them are covered.
    keep = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in exposed]
    devices = [(f"/dev/{name}", os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)) for name in _DEVICES]
    try:
        for target, flags in _mounts():
            if any(_under(target, top) for top in ("/proc", "/sys", "/dev")):
                continue  # replaced below
            with contextlib.suppress(OSError):  # a mount covered by another one cannot be reached: skip it
                mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)
        _fresh_proc_sys()
        _fresh_dev(devices)
        for folder in hidden:
            if folder == SCRATCH:
                continue
            mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        os.makedirs(SCRATCH, exist_ok=True)  # only when / itself has no /tmp (before it is read-only)
        mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={scratch_mb}m{owner}")
        # POSIX shared memory and semaphores (multiprocessing's locks) live here: private too.
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=0700,size={scratch_mb}m{owner}")
        for path, fd in keep:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)  # its source is read-only: so is the bind
        for folder in hidden:
            if folder != SCRATCH:
                mount(None, folder, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    finally:
        for _, fd in (*keep, *devices):
            os.close(fd)
    os.chdir(SCRATCH)


def _fresh_proc_sys() -> None:
    # A /proc of the new PID namespace shows only the session's processes; a sysfs mounted in the new network
    # namespace shows only its interfaces. Mounted over the host's ones, not after unmounting them: an unmount
    # waits for an RCU grace period (milliseconds), and a covered mount cannot be reached by any path.
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _fresh_dev(devices: list[tuple[str, int]]) -> None:
    """A /dev with only the harmless character devices (no disks, no kernel log), read-only."""
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for path, fd in devices:
        open(path, "w").close()
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    os.mkdir("/dev/shm")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")):
        os.symlink(target, f"/dev/{name}")
    os.symlink("/proc/self/fd/2", "/dev/stderr")
    mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")


# ---- limits and privileges ------------------------------------------------------------------------------


def apply_limits(limits: dict[str, int | None]) -> None:
    """Lower the rlimits named in ``limits`` (``as``, ``cpu``, ``fsize``, ``nofile``, ``nproc``); ``None`` skips one."""
    kinds = {
        "as": resource.RLIMIT_AS,
        "cpu": resource.RLIMIT_CPU,
        "fsize": resource.RLIMIT_FSIZE,
        "nofile": resource.RLIMIT_NOFILE,
        "nproc": getattr(resource, "RLIMIT_NPROC", None),
        "core": resource.RLIMIT_CORE,
    }
    for name, value in limits.items():
        kind = kinds[name]
        if value is None or kind is None:
            continue
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        # CPU: SIGXCPU at the soft limit, SIGKILL one second later even if the cell catches SIGXCPU.
        resource.setrlimit(kind, (value, value + 1 if name == "cpu" else value))


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (and gid ``uid``) with no supplementary groups and no capabilities, for good."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:  # pragma: no cover - the kernel would have refused
        raise OSError(errno.EPERM, "setresuid did not take effect")


def no_new_privs() -> None:
    """Setuid binaries no longer grant privileges (and seccomp may be loaded unprivileged)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# Calls a cell has no use for, each refused with EPERM. Most already need a capability the cell lacks; the
# filter also closes the ones an unprivileged process may make (user namespaces, keyrings, io_uring, ptrace).
_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "keyctl", "add_key", "request_key",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsconfig", "fsmount", "fspick",
    "open_tree", "move_mount", "mount_setattr", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "personality", "uselib", "vhangup",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
)  # fmt: skip


def build_seccomp() -> bytes:
    """The compiled BPF program of the filter (allow by default, deny :data:`_DENIED`).

    Built once with pyseccomp (raises ``ImportError`` without it) and loaded into each worker with
    :func:`load_seccomp`, which costs microseconds where compiling the filter again would cost a millisecond.
    """
    import pyseccomp as sc

    flt = sc.SyscallFilter(sc.ALLOW)
    for name in _DENIED:
        with contextlib.suppress(Exception):  # a call this architecture does not have
            flt.add_rule(sc.ERRNO(errno.EPERM), name)
    # clone with any namespace flag is refused; clone3 (whose flags a filter cannot read) reports ENOSYS, so
    # that the C library falls back to clone.
    for flag in _NAMESPACE_FLAGS:  # rules on one call are alternatives: one per flag
        flt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    with contextlib.suppress(Exception):
        flt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("retool-seccomp")
    try:
        with os.fdopen(os.dup(fd), "wb") as file:
            flt.export_bpf(file)
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(program: bytes) -> None:
    """Install a BPF program from :func:`build_seccomp` on this process (needs no_new_privs, or root)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))  # 8 bytes per instruction
    _check(libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


# ---- probing ----------------------------------------------------------------------------------------------


def probe() -> dict[str, tuple[bool, str]]:
    """Which layers this machine supports, tried for real in a forked child; ``{layer: (available, detail)}``.

    Run it in a single-threaded process (the zygote before its preloads): it forks.
    """
    if not sys.platform.startswith("linux"):
        why = f"not Linux ({sys.platform})"
        return {name: (False, why) for name in (*NAMESPACE_LAYERS, *PRIVILEGE_LAYERS)}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        try:
            report = _probe_child()
        except BaseException as exc:
            report = {"error": [False, repr(exc)]}
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    try:
        report = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        report = {}
    return {name: tuple(report.get(name, (False, "probe failed"))) for name in (*NAMESPACE_LAYERS, *PRIVILEGE_LAYERS)}


def _try(action: Any) -> tuple[bool, str]:
    try:
        detail = action()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, detail or "ok"


def _probe_child() -> dict[str, tuple[bool, str]]:  # pragma: no cover - runs in a forked child
    report: dict[str, tuple[bool, str]] = {}
    try:  # first: it may run a helper program, and forks fail once a PID namespace's first process has ended
        import pyseccomp  # noqa: F401
    except Exception as exc:
        report["seccomp"] = (False, f"unavailable: pyseccomp cannot be imported ({exc}); pip install pyseccomp")
    root = os.geteuid() == 0
    if root:
        report["user"] = (True, "cells run as a dedicated unprivileged uid per session")
        report["process-limit"] = (True, "RLIMIT_NPROC on the session's own uid")
    else:
        why = f"the trainer is not root (uid {os.geteuid()}): cells run as the trainer's user"
        report["user"] = (False, why)
        report["process-limit"] = (False, "RLIMIT_NPROC needs a uid of the session's own (" + why + ")")
    report["network"] = _try(lambda: unshare(CLONE_NEWNET) or "network namespace: loopback only, down; no route")
    report["ipc"] = _try(lambda: unshare(CLONE_NEWIPC | CLONE_NEWUTS) or "IPC and UTS namespaces")

    def filesystem() -> str:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("tmpfs", "/mnt" if os.path.isdir("/mnt") else "/tmp", "tmpfs", MS_NOSUID, "size=64k")
        return "mount namespace: host read-only, secrets hidden, private tmpfs scratch"

    report["filesystem"] = _try(filesystem)

    def pid_namespace() -> str:
        unshare(CLONE_NEWPID)
        child = os.fork()
        if child == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(child, 0)
        if status != 0:
            raise OSError("the first process of a new PID namespace is not PID 1")
        return "PID namespace with a private /proc"

    report["pid-namespace"] = _try(pid_namespace)  # last: no fork works after it

    def seccomp() -> str:
        no_new_privs()
        load_seccomp(build_seccomp())
        return "syscall filter (built with pyseccomp): ptrace, mount, namespaces, keyrings, bpf, io_uring, ... denied"

    if "seccomp" not in report:
        report["seccomp"] = _try(seccomp)
    return report


if __name__ == "__main__":  # `python -m retool_plugins.executors.local._isolation` prints what probe() finds
    print(json.dumps(probe()))
