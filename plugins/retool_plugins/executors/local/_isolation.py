"""Linux isolation primitives for LocalSandbox's workers: namespaces, mounts, a dedicated uid, rlimits, seccomp.

Everything here runs inside the sandbox's own processes (the zygote and the processes it forks), never in the
trainer, and imports only the standard library (``pyseccomp`` lazily). Each function either does its job or
raises ``OSError``; which layers a machine supports is decided once, by :func:`probe`, in a throwaway child.

The layers, by name (the same names ``retool sandbox check`` prints):

* ``network``: a network namespace of its own, holding only its own loopback interface (up, so that local
  sockets work) and no route to anything else;
* ``filesystem``: an allow-list. The zygote builds, once, a root of its own that holds only the system trees
  (``/usr`` and the ``/lib``, ``/bin`` links), the interpreter's prefixes and package folders, and a minimal
  ``/etc`` (see :func:`build_view`); every session's mount namespace is a copy of it, read-only, where the only
  writable places are a private, size-limited tmpfs at ``/tmp`` (and one at ``/dev/shm``), with ``/proc``,
  ``/sys`` and ``/dev`` fresh and minimal. Nothing else on the host (datasets, recipes, checkpoints, home
  folders) can be read or listed: a model cannot learn to read its answers from disk;
* ``pid-namespace``: the session's processes live in a PID namespace of their own (killing its first process
  kills them all) and see only each other in ``/proc``;
* ``ipc``: IPC and UTS namespaces of their own (no System V IPC shared with the host; the hostname is
  ``sandbox``, not the host's);
* ``user``: the cell runs as a uid of its own, not root, so it cannot raise its rlimits back, and
  ``RLIMIT_NPROC`` bounds the session's processes (``process-limit``);
* ``seccomp``: a syscall filter denies the calls a cell has no use for (ptrace, mount, new namespaces, keyrings,
  bpf, io_uring, ...).

One file, because the layers are applied in one order (the zygote's view first; then, in each session's
forked init, namespaces, the session's mounts over the view, the uid and limits, seccomp) and :func:`probe`
tries them in that same order: split up, the order would live in no single place. The file-system view is
most of the file; it is built by :func:`build_view` and finished per session by :func:`enter_filesystem`,
and those two share the mount helpers below, so they stay with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import shutil
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any, NamedTuple

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
MS_MOVE = 0x2000
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

# The system's programs and libraries: in a cell's view, as the host has them (a folder, or a merged-/usr link).
SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The few /etc files that the C library, Python and the preloaded modules read (dynamic linking, time zone,
# name-service order, MIME types, service names), copied in; passwd, group, hostname and hosts are written anew.
ETC_COPIED = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "mime.types", "alternatives",
    "protocols", "services", "matplotlibrc",
)  # fmt: skip
HOSTNAME = "sandbox"
SANDBOX_USER = "sandbox"
_DEVICES = ("null", "zero", "full", "random", "urandom")
SCRATCH = "/tmp"
# Where the zygote assembles the view before it becomes its root; covered in the zygote's namespace only.
_STAGE = "/tmp"
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217}
MNT_DETACH = 2

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


def _outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without those inside another one (binding a parent brings its children), sorted."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(p != q and _under(p, q) for q in unique)]


def interpreter_paths(modules: Iterable[Any] = ()) -> list[str]:
    """What the interpreter needs besides :data:`SYSTEM_TREES`: its prefixes, and the ``sys.path`` entries inside
    them or holding installed packages (``site-packages``, ``dist-packages``, the standard library's zip).

    A ``sys.path`` entry of another kind (an editable install's source folder, a ``PYTHONPATH`` folder, the
    trainer's working folder) is a project's tree, which may hold data and answers: only the package folders of
    ``modules`` (the preloaded ones) that live in such an entry are added, so that their lazy imports work.
    """
    prefixes = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)]
    found = [p for p in prefixes if p != "/"]
    for entry in sys.path:
        if not entry or not os.path.isabs(entry) or not os.path.exists(entry):
            continue
        real = os.path.realpath(entry)
        base = os.path.basename(real)
        if any(_under(real, p) for p in found) or base in ("site-packages", "dist-packages") or real.endswith(".zip"):
            found.append(real)
    for module in modules:
        origin = getattr(module, "__file__", None)
        if not origin:
            continue
        origin = os.path.realpath(origin)
        if os.path.basename(origin) == "__init__.py":
            origin = os.path.dirname(origin)
        if not any(_under(origin, p) for p in found):
            found.append(origin)
    return [p for p in _outermost(found) if not any(_under(p, tree) for tree in SYSTEM_TREES)]


def build_view(paths: list[str], tmpfs_mb: int = 8) -> None:
    """Make this process's root a new tree that holds only the system trees, ``paths`` and a minimal ``/etc``,
    ``/dev``, ``/proc`` and ``/sys``, every mount read-only (run once, in the zygote, as root).

    Each session's mount namespace is then a copy of this one: a cell sees nothing of the host but what the
    interpreter needs (an allow-list, like a bubblewrap or nsjail profile), so a dataset, a recipe or a
    checkpoint anywhere else on the host cannot be read or listed. On failure the process is back in the
    mount namespace it started in, and the error is raised.
    """
    original = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare(CLONE_NEWNS)
        try:
            _assemble(paths, tmpfs_mb)
        except BaseException:
            setns(original, CLONE_NEWNS)  # the half-built namespace goes with its last user
            os.chdir("/")
            raise
    finally:
        os.close(original)


def _assemble(paths: list[str], tmpfs_mb: int) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates back to the host
    new = _STAGE
    links = {tree: os.readlink(tree) for tree in SYSTEM_TREES if os.path.islink(tree)}  # merged /usr: lib -> usr/lib
    trees = [tree for tree in SYSTEM_TREES if tree not in links and os.path.isdir(tree)]
    # Handles on every source, taken before the stage covers /tmp: a checkout in /tmp (a CI clone) has its
    # interpreter there, which the stage's tmpfs would hide.
    sources = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in (*trees, *paths)]
    try:
        mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={tmpfs_mb}m")
        for tree, target in links.items():
            os.symlink(target, new + tree)
        for path, fd in sources:
            _bind(f"/proc/self/fd/{fd}", new + path, os.path.isdir(f"/proc/self/fd/{fd}"))
    finally:
        for _, fd in sources:
            os.close(fd)
    _write_etc(new + "/etc")
    for folder in ("proc", "sys", "dev", "tmp"):
        os.makedirs(f"{new}/{folder}", mode=0o755, exist_ok=True)
    os.chmod(f"{new}/tmp", 0o1777)
    # Fresh instances, mounted while the host's are still in view (a user namespace may require that); each
    # session mounts its own over them.
    mount("proc", f"{new}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", f"{new}/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _fresh_dev(f"{new}/dev")
    _switch_root(new)
    for target, flags in _mounts():
        if target in ("/proc", "/sys") or _under(target, "/dev"):
            continue  # fresh ones, mounted with their own flags
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | flags)


def _bind(source: str, target: str, folder: bool | None = None) -> None:
    if folder if folder is not None else os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)


def _switch_root(new: str) -> None:
    """Make ``new`` the root and drop the old one from the namespace (pivot_root, then a lazy unmount)."""
    number = _PIVOT_ROOT.get(os.uname().machine)
    os.chdir(new)
    if number is None:  # an architecture missing from the table: the old root stays, covered and unreachable
        mount(new, "/", None, MS_MOVE)
        os.chroot(".")
        os.chdir("/")
        return
    os.mkdir(".old-root")
    _check(libc().syscall(number, b".", b".old-root"), "pivot_root")
    os.chdir("/")
    _check(libc().umount2(b"/.old-root", MNT_DETACH), "umount /.old-root")
    os.rmdir("/.old-root")


def _write_etc(etc: str) -> None:
    """A minimal /etc: :data:`ETC_COPIED` as the host has them, and neutral identity files."""
    os.makedirs(etc, mode=0o755)
    for name in ETC_COPIED:
        source = f"/etc/{name}"
        with contextlib.suppress(OSError):
            if os.path.islink(source):
                os.symlink(os.readlink(source), f"{etc}/{name}")
            elif os.path.isdir(source):
                shutil.copytree(source, f"{etc}/{name}", symlinks=True)
            elif os.path.isfile(source):
                shutil.copyfile(source, f"{etc}/{name}")
    files = {
        "passwd": passwd(None),
        "group": group(None),
        "hostname": f"{HOSTNAME}\n",
        "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    }
    for name, text in files.items():
        with open(f"{etc}/{name}", "w") as file:
            file.write(text)


def passwd(uid: int | None) -> str:
    """/etc/passwd of a cell: root, the session's own user (``uid``) and nobody; no host user."""
    own = f"{SANDBOX_USER}:x:{uid}:{uid}:{SANDBOX_USER}:{SCRATCH}:/usr/sbin/nologin\n" if uid is not None else ""
    return f"root:x:0:0:root:/root:/usr/sbin/nologin\n{own}nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"


def group(gid: int | None) -> str:
    own = f"{SANDBOX_USER}:x:{gid}:\n" if gid is not None else ""
    return f"root:x:0:\n{own}nogroup:x:65534:\n"


def enter_filesystem(scratch_mb: int, uid: int | None, view: list[str]) -> None:
    """Finish a session's file system in its new mount namespace (a copy of the zygote's view, see
    :func:`build_view`): its own ``/proc`` and ``/sys``, a private size-limited tmpfs at :data:`SCRATCH` and at
    ``/dev/shm`` (the only writable places), and ``/etc/passwd`` naming the session's user.

    Must run as root right after ``unshare(CLONE_NEWNS)``, in the new PID and network namespaces. ``view`` is
    what :func:`build_view` was given: a part of it under :data:`SCRATCH` (a checkout in ``/tmp``) would be
    covered by the scratch tmpfs, so it is bound back inside it, read-only.
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    _fresh_proc_sys()
    keep = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in view if _under(path, SCRATCH)]
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    try:
        mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={scratch_mb}m{owner}")
        for path, fd in keep:  # the bind keeps the flags of its read-only source
            _bind(f"/proc/self/fd/{fd}", path, os.path.isdir(f"/proc/self/fd/{fd}"))
    finally:
        for _, fd in keep:
            os.close(fd)
    # POSIX shared memory and semaphores (multiprocessing's locks) live here: private too.
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=0700,size={scratch_mb}m{owner}")
    if uid is not None:  # getpwuid() of the cell finds its own user (some libraries need a name)
        for name, text in (("passwd", passwd(uid)), ("group", group(uid))):
            _bind_text(text, f"/etc/{name}")
    os.chdir(SCRATCH)


def _bind_text(text: str, target: str) -> None:
    """Cover ``target`` with a read-only file holding ``text``, root's and mode 0444.

    The file is made in the session's scratch tmpfs and unlinked once bound (a memfd cannot be bound: it is on
    no mount of this namespace), so the cell neither sees nor can change it.
    """
    source = f"{SCRATCH}/.retool-{os.path.basename(target)}"
    fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    try:
        mount(source, target, None, MS_BIND)
    finally:
        os.unlink(source)


def set_hostname(name: str = HOSTNAME) -> None:
    """Name this UTS namespace ``name`` (the host's name is a fact about the host)."""
    data = name.encode()
    _check(libc().sethostname(data, len(data)), "sethostname")


def loopback_up() -> None:
    """Bring up ``lo`` in this (new) network namespace: local sockets work, nothing else is reachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _fresh_proc_sys() -> None:
    # A /proc of the new PID namespace shows only the session's processes; a sysfs mounted in the new network
    # namespace shows only its interfaces. Mounted over the host's ones, not after unmounting them: an unmount
    # waits for an RCU grace period (milliseconds), and a covered mount cannot be reached by any path.
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _fresh_dev(dev: str) -> None:
    """At ``dev``, a read-only /dev with only the harmless character devices (no disks, no kernel log)."""
    devices = [(name, os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)) for name in _DEVICES]
    try:
        mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
        for name, fd in devices:
            open(f"{dev}/{name}", "w").close()
            mount(f"/proc/self/fd/{fd}", f"{dev}/{name}", None, MS_BIND)
            mount(None, f"{dev}/{name}", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    finally:
        for _, fd in devices:
            os.close(fd)
    os.mkdir(f"{dev}/shm")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")):
        os.symlink(target, f"{dev}/{name}")
    os.symlink("/proc/self/fd/2", f"{dev}/stderr")
    mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")


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


class SeccompFilter(NamedTuple):
    """A compiled filter and the rules it lacks: ``absent`` calls this architecture does not have (nothing to
    deny), ``failed`` rules that could not be added (``"name: error"``), which leave that call open."""

    program: bytes
    absent: list[str]
    failed: list[str]

    def layer(self) -> tuple[bool, str]:
        """The ``seccomp`` layer's ``(active, detail)``: not active when any rule failed, so ``strict`` refuses."""
        detail = "syscall filter (built with pyseccomp): ptrace, mount, namespaces, keyrings, bpf, io_uring, ... denied"
        if self.absent:
            detail += f"; not on this architecture (nothing to deny): {', '.join(self.absent)}"
        if self.failed:
            return False, f"partly installed: these rules failed, their calls stay open: {'; '.join(self.failed)}"
        return True, detail


def build_seccomp() -> SeccompFilter:
    """The compiled BPF program of the filter (allow by default, deny :data:`_DENIED`), and what it lacks.

    Built once with pyseccomp (raises ``ImportError`` without it) and loaded into each worker with
    :func:`load_seccomp`, which costs microseconds where compiling the filter again would cost a millisecond.
    """
    import pyseccomp as sc

    flt = sc.SyscallFilter(sc.ALLOW)
    absent: list[str] = []
    failed: list[str] = []

    def deny(name: str, *args: Any, code: int = errno.EPERM) -> None:
        if sc.resolve_syscall(sc.system_arch(), name) < 0:
            absent.append(name)
            return
        try:
            flt.add_rule(sc.ERRNO(code), name, *args)
        except Exception as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")

    for name in _DENIED:
        deny(name)
    # clone with any namespace flag is refused; clone3 (whose flags a filter cannot read) reports ENOSYS, so
    # that the C library falls back to clone.
    for flag in _NAMESPACE_FLAGS:  # rules on one call are alternatives: one per flag
        deny("clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    deny("clone3", code=errno.ENOSYS)
    fd = os.memfd_create("retool-seccomp")
    try:
        with os.fdopen(os.dup(fd), "wb") as file:
            flt.export_bpf(file)
        size = os.lseek(fd, 0, os.SEEK_END)
        return SeccompFilter(os.pread(fd, size, 0), absent, sorted(set(failed)))
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
    report["network"] = _try(lambda: unshare(CLONE_NEWNET) or "network namespace: its own loopback only; no route")
    uts = f"IPC and UTS namespaces (hostname {HOSTNAME!r})"
    report["ipc"] = _try(lambda: unshare(CLONE_NEWIPC | CLONE_NEWUTS) or uts)

    def filesystem() -> str:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("tmpfs", "/mnt" if os.path.isdir("/mnt") else "/tmp", "tmpfs", MS_NOSUID, "size=64k")
        return "mount namespace (the view is built by the zygote)"

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
        load_seccomp(build_seccomp().program)
        return "a syscall filter loads"

    if "seccomp" not in report:
        report["seccomp"] = _try(seccomp)
    return report


if __name__ == "__main__":  # `python -m retool_plugins.executors.local._isolation` prints what probe() finds
    print(json.dumps(probe()))
