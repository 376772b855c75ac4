"""LocalSandbox's self-check: each isolation layer, and an attack on it from a cell (``retool sandbox check``).

Every test runs hostile code in a session of the sandbox being checked and looks at the outcome from both
sides: what the cell saw, and that the host is unchanged (the listening port, the file that must not appear,
the processes that must be gone). Nothing here sends traffic off this machine or makes a DNS lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retool.types import CheckResult, ExecutionResult
from retool_plugins.executors.local import _isolation as iso

if TYPE_CHECKING:
    from retool_plugins.executors.local.sandbox import LocalSandbox

ORDER = (
    "network", "loopback", "filesystem", "pid-namespace", "ipc", "uts", "user", "process-limit", "seccomp",
    "cgroups", "memory-limit", "rlimits", "environment", "timeout", "output-cap",
)  # fmt: skip
_SECRET_VAR = "RETOOL_SANDBOX_CHECK_SECRET"


async def run_checks(sandbox: LocalSandbox) -> list[CheckResult]:
    """One :class:`CheckResult` per layer, in :data:`ORDER`; the sessions it opens are closed again."""
    secret = secrets.token_hex(8)
    saved = os.environ.get(_SECRET_VAR)
    os.environ[_SECRET_VAR] = secret  # a secret of the trainer's that no cell may find
    try:
        layers = await sandbox.layers()
        layers["memory-limit"] = (sandbox.memory_mb is not None, _memory_detail(sandbox))
        layers["rlimits"] = (True, "RLIMIT_FSIZE 64 MiB, RLIMIT_NOFILE 256, RLIMIT_CPU, no core files")
        # Parts of the network and IPC/UTS layers, checked on their own.
        layers["loopback"] = (layers.get("network", (False, ""))[0], "the session's own lo interface, up")
        uts = f"the UTS namespace named {iso.HOSTNAME!r}; /etc/passwd lists root, {iso.SANDBOX_USER}, nobody"
        layers["uts"] = (layers.get("ipc", (False, ""))[0] and layers.get("filesystem", (False, ""))[0], uts)
        tests: dict[str, Callable[[Check], Awaitable[tuple[bool, str]]]] = {
            "network": _network,
            "loopback": _loopback,
            "uts": _uts,
            "filesystem": _filesystem,
            "pid-namespace": _pid_namespace,
            "ipc": _ipc,
            "user": _user,
            "process-limit": _process_limit,
            "seccomp": _seccomp,
            "cgroups": _cgroups,
            "memory-limit": _memory,
            "rlimits": _rlimits,
            "environment": _environment,
            "timeout": _timeout,
            "output-cap": _output_cap,
        }
        results = []
        for name in ORDER:
            active, detail = layers.get(name, (False, "unknown"))
            passed: bool | None = None
            if active:
                check = Check(sandbox, name, secret)
                try:
                    passed, seen = await tests[name](check)
                except Exception as exc:  # a check that breaks is a failed check, not a crash of the command
                    passed, seen = False, f"the check itself failed: {type(exc).__name__}: {exc}"
                finally:
                    await check.close()
                detail = f"{detail}; test: {seen}"
            results.append(CheckResult(name, active, passed, detail))
        return results
    finally:
        if saved is None:
            os.environ.pop(_SECRET_VAR, None)
        else:
            os.environ[_SECRET_VAR] = saved


def _memory_detail(sandbox: LocalSandbox) -> str:
    if sandbox.memory_mb is None:
        return "off (memory_mb=None)"
    return f"RLIMIT_AS: {sandbox.memory_mb} MiB per process beyond the preloaded interpreter"


class Check:
    """Runs the cells of one check in sessions of its own, and closes them afterwards."""

    def __init__(self, sandbox: LocalSandbox, name: str, secret: str) -> None:
        self.sandbox = sandbox
        self.name = name
        self.secret = secret
        self.sessions: set[str] = set()

    async def run(self, code: str, session: str = "main", timeout_s: float | None = None) -> ExecutionResult:
        name = f"retool-self-check-{self.name}-{session}"
        self.sessions.add(name)
        return await self.sandbox._execute(code, name, timeout_s or max(self.sandbox.timeout_s, 10.0))

    async def json(self, code: str, session: str = "main") -> Any:
        """Run a cell whose last line prints JSON, and parse it; raises if the cell failed."""
        result = await self.run(code, session)
        if not result.ok:
            raise RuntimeError(f"the probe cell failed: {result.error}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    async def close(self) -> None:
        for name in self.sessions:
            await self.sandbox.close_session(name)


async def _network(check: Check) -> tuple[bool, str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the port really is open on the host
        seen = await check.json(
            "import json, socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).close(); conn = 'connected'\n"
            "except OSError as exc:\n"
            "    conn = f'{type(exc).__name__}: {exc.strerror}'\n"
            "routes = open('/proc/net/route').read().splitlines()[1:]\n"
            "print(json.dumps([conn, [n for _, n in socket.if_nameindex()], routes]))"
        )
    conn, interfaces, routes = seen
    passed = conn != "connected" and interfaces == ["lo"] and routes == []
    return passed, f"connect to the host's 127.0.0.1:{port}: {conn}; interfaces {interfaces}; {len(routes)} routes"


async def _loopback(check: Check) -> tuple[bool, str]:
    seen = await check.json(
        "import json, socket\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "with socket.create_connection(server.getsockname(), timeout=2) as client:\n"
        "    conn, _ = server.accept(); client.sendall(b'ping'); echoed = conn.recv(4).decode()\n"
        "print(json.dumps(echoed))"
    )
    return seen == "ping", f"a server the cell opened on 127.0.0.1 answered its own connection: {seen!r}"


async def _uts(check: Check) -> tuple[bool, str]:
    seen = await check.json(
        "import json, os, pwd, socket\n"
        "print(json.dumps([socket.gethostname(), sorted(p.pw_name for p in pwd.getpwall()), os.path.expanduser('~')]))"
    )
    hostname, users, home = seen
    with open("/etc/passwd", encoding="utf-8", errors="replace") as file:
        host_users = {line.split(":")[0] for line in file if line.strip()} - {"root", "nobody"}
    leaked = sorted(set(users) & host_users)
    passed = hostname == iso.HOSTNAME != socket.gethostname() and not leaked and home == iso.SCRATCH
    return passed, (
        f"hostname {hostname!r} (the host's is not shown); users {users}"
        + (f" (host users {leaked})" if leaked else "")
        + f"; ~ is {home}"
    )


async def _filesystem(check: Check) -> tuple[bool, str]:
    probe = Path(sys.prefix, f"retool-check-{check.secret}")
    # Answers where a trainer keeps its data: beside the working folder, and in a folder at the root.
    planted = []
    for parent in (Path.cwd(), Path("/")):
        with contextlib.suppress(OSError):
            folder = Path(tempfile.mkdtemp(prefix="retool-check-", dir=parent))
            (folder / "answers.jsonl").write_text(f'{{"answer": "{check.secret}"}}\n')
            planted.append(folder)
    try:
        with tempfile.NamedTemporaryFile("w", prefix="retool-check-", suffix=".key") as key:
            key.write(check.secret)
            key.flush()
            targets = [key.name, *(str(folder / "answers.jsonl") for folder in planted)]
            seen = await check.json(
                "import json, os\n"
                "def attempt(action):\n"
                "    try:\n"
                "        action(); return 'allowed'\n"
                "    except OSError as exc:\n"
                "        return f'{type(exc).__name__}: {exc.strerror}'\n"
                f"write = attempt(lambda: open({str(probe)!r}, 'w').write('x'))\n"
                f"reads = [attempt(lambda: open(t).read()) for t in {targets!r}]\n"
                f"lists = [attempt(lambda: os.listdir(os.path.dirname(t))) for t in {targets[1:]!r}]\n"
                "shadow = attempt(lambda: open('/etc/shadow').read())\n"
                "scratch = attempt(lambda: open('/tmp/ok', 'w').write('x'))\n"
                "print(json.dumps([write, reads, lists, shadow, scratch, sorted(os.listdir('/'))]))"
            )
    finally:
        for folder in planted:
            shutil.rmtree(folder, ignore_errors=True)
    write, reads, lists, shadow, scratch, top = seen
    created = probe.exists()
    if created:
        probe.unlink()
    passed = write != "allowed" and shadow != "allowed" and scratch == "allowed" and not created
    passed = passed and all(r != "allowed" for r in reads) and all(r != "allowed" for r in lists)
    where = ", ".join([str(Path(targets[0]).parent), *(str(folder.parent) for folder in planted)])
    return passed, (
        f"/ lists {top}; write into {sys.prefix}: {write}; read answers planted in {where}: "
        f"{'; '.join(sorted(set(reads)))}; list their folders: {'; '.join(sorted(set(lists))) or '-'}; "
        f"/etc/shadow: {shadow}; write in /tmp (scratch): {scratch}"
    )


async def _pid_namespace(check: Check) -> tuple[bool, str]:
    await check.run("sentinel = 1", "sentinel")
    seen = await check.json(
        "import json, os, signal\n"
        f"mine = {os.getpid()}\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "try:\n"
        "    open('/proc/1/environ', 'rb').read(); environ = 'read'\n"
        "except OSError as exc:\n"
        "    environ = exc.strerror\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL); killed = 'sent'\n"  # to every process this cell may signal
        "except OSError as exc:\n"
        "    killed = exc.strerror\n"
        "print(json.dumps([pids, environ, killed]))"
    )
    pids, environ, killed = seen
    sentinel = await check.run("print(sentinel)", "sentinel")
    alive = sentinel.stdout == "1\n" and not sentinel.session_restarted
    passed = pids == [1, 2] and environ != "read" and alive
    return passed, (
        f"/proc shows pids {pids} (the session's init and worker); /proc/1/environ: {environ}; "
        f"kill(-1, SIGKILL): {killed}, another session {'alive' if alive else 'KILLED'}"
    )


async def _ipc(check: Check) -> tuple[bool, str]:
    libc = ctypes.CDLL(None, use_errno=True)
    key = int.from_bytes(secrets.token_bytes(3), "big") + 1
    shm = libc.shmget(key, 4096, 0o1600)  # IPC_CREAT | 0600: a System V segment on the host
    if shm < 0:
        return False, f"could not create a System V segment on the host (errno {ctypes.get_errno()})"
    try:
        seen = await check.json(
            "import json\n"
            "lines = open('/proc/sysvipc/shm').read().splitlines()[1:]\n"
            f"print(json.dumps([line.split()[0] for line in lines if int(line.split()[0]) == {key}]))"
        )
    finally:
        libc.shmctl(shm, 0, None)  # IPC_RMID
    return seen == [], f"a System V segment (key {key}) made on the host: {'visible' if seen else 'not visible'}"


async def _user(check: Check) -> tuple[bool, str]:
    seen = await check.json(
        "import json, os, resource\n"
        "def attempt(action):\n"
        "    try:\n"
        "        action(); return 'allowed'\n"
        "    except (OSError, ValueError) as exc:\n"
        "        return type(exc).__name__\n"
        "inf = resource.RLIM_INFINITY\n"
        "raise_as = attempt(lambda: resource.setrlimit(resource.RLIMIT_AS, (inf, inf)))\n"
        "root = attempt(lambda: os.setuid(0))\n"
        "print(json.dumps([os.getuid(), raise_as, root]))"
    )
    uid, raise_as, root = seen
    passed = uid != 0 and raise_as != "allowed" and root != "allowed"
    return passed, f"uid {uid}; raising RLIMIT_AS back: {raise_as}; setuid(0): {root}"


async def _process_limit(check: Check) -> tuple[bool, str]:
    limit = check.sandbox.max_processes
    seen = await check.json(
        "import json, os, time\n"
        "count = 0\n"
        "try:\n"
        f"    for _ in range({4 * limit}):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        count += 1\n"
        "    outcome = 'no limit'\n"
        "except OSError as exc:\n"
        "    outcome = type(exc).__name__\n"
        "print(json.dumps([count, outcome]))"
    )
    count, outcome = seen
    await check.close()  # the sleeping children must go with their session
    passed = outcome == "BlockingIOError" and count < limit
    return passed, f"a fork loop stopped after {count} processes ({outcome}; max_processes={limit})"


async def _seccomp(check: Check) -> tuple[bool, str]:
    seen = await check.json(
        "import ctypes, json\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "out = []\n"
        "for name, call in (('unshare(CLONE_NEWUSER)', lambda: libc.unshare(0x10000000)),\n"
        "                   ('ptrace(PTRACE_TRACEME)', lambda: libc.ptrace(0, 0, 0, 0))):\n"
        "    ctypes.set_errno(0)\n"
        "    out.append([name, call(), ctypes.get_errno()])\n"
        "print(json.dumps(out))"
    )
    passed = all(result == -1 and error == 1 for _, result, error in seen)  # EPERM
    return passed, "; ".join(f"{name}: {'EPERM' if error == 1 else f'errno {error}'}" for name, _, error in seen)


async def _cgroups(check: Check) -> tuple[bool, str]:
    sandbox = check.sandbox
    await check.run("pass")
    cgroups = sandbox._pool.live.cgroups
    zygote = sandbox._pool.live.zygote
    if cgroups is None or zygote is None or not cgroups.folders:
        return False, "no cgroup folders"
    inside = [str(zygote.proc.pid) in Path(folder, "cgroup.procs").read_text().split() for folder in cgroups.folders]
    return all(inside), f"the zygote is in {len(inside)} cgroups: {', '.join(cgroups.folders)}"


async def _memory(check: Check) -> tuple[bool, str]:
    size = 2 * (check.sandbox.memory_mb or 0) + 64
    result = await check.run(f"block = bytearray({size} * 1024 * 1024)")
    passed = result.stop_reason == "memory" and (result.error or "").startswith("MemoryError")
    after = await check.run("print('alive')")
    passed = passed and after.stdout == "alive\n" and not after.session_restarted
    return passed, f"bytearray of {size} MiB: {result.error}; the session went on"


async def _rlimits(check: Check) -> tuple[bool, str]:
    seen = await check.json(
        "import json\n"
        "def attempt(action):\n"
        "    try:\n"
        "        action(); return 'allowed'\n"
        "    except OSError as exc:\n"
        "        return exc.strerror\n"
        "def big():\n"
        "    with open('big', 'wb') as f:\n"
        "        f.seek(100 * 2**20); f.write(b'x')\n"
        "files = []\n"
        "def many():\n"
        "    for i in range(1000):\n"
        "        files.append(open('/dev/null'))\n"
        "print(json.dumps([attempt(big), attempt(many)]))"
    )
    fsize, nofile = seen
    return fsize != "allowed" and nofile != "allowed", f"a 100 MiB file: {fsize}; 1000 open files: {nofile}"


async def _environment(check: Check) -> tuple[bool, str]:
    seen = await check.json(
        "import json, os\n"
        "found = []\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:\n"
        "    try:\n"
        f"        found += [pid] if {check.secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read() else []\n"
        "    except OSError:\n"
        "        pass\n"
        "print(json.dumps([sorted(os.environ), found]))"
    )
    names, found = seen
    passed = not found and _SECRET_VAR not in names
    return (
        passed,
        f"a secret in the trainer's environment: {'FOUND' if not passed else 'not found'}; the cell sees {names}",
    )


async def _timeout(check: Check) -> tuple[bool, str]:
    limit = 1.0
    sleep = 900 + secrets.randbelow(99)  # a command line to find among the host's processes afterwards
    started = time.monotonic()
    result = await check.run(
        "import signal, subprocess\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        f"subprocess.Popen(['sleep', '{sleep}'], start_new_session=True)\n"
        "pow(10**9, 10**9)",  # one long C call: the interpreter never gets back to checking for signals
        timeout_s=limit,
    )
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.05)
    left = [pid for pid, command in _descendants().items() if command == f"sleep {sleep}"]
    passed = result.timed_out and result.stop_reason == "timeout" and elapsed < limit + 2 and not left
    return passed, (
        f"a signal-ignoring cell stuck in one C call stopped after {elapsed:.2f} s (limit {limit:g} s); "
        f"the process it started {'survived' if left else 'was killed with it'}"
    )


async def _output_cap(check: Check) -> tuple[bool, str]:
    cap = check.sandbox.max_output_chars
    result = await check.run("import os\nprint('x' * 10**7)\nos.write(1, b'y' * 10**6)")
    passed = result.truncated and len(result.stdout) <= cap + 60
    return passed, f"10^7 characters printed: {len(result.stdout)} kept (max_output_chars={cap})"


def _descendants() -> dict[int, str]:
    """This process's descendants -> their command lines (for checking that nothing survived)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(name)] = int(Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    found: dict[int, str] = {}
    todo = [os.getpid()]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                with contextlib.suppress(OSError):
                    found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                todo.append(pid)
    return found
