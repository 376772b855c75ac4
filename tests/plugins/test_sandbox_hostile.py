"""LocalSandbox against hostile cells: each attack gets its precise outcome, and the host is left unchanged.

One sandbox (one zygote) serves the whole module, on one event loop, with a 1 s timeout and 256 MiB of memory
per worker. After every test its sessions are closed and the process tree is checked: only the zygote may be
left. A test that needs an isolation layer is skipped, naming it, where this machine lacks that layer.
"""

from __future__ import annotations

import ast
import asyncio
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from processes import descendants

from retool.types import ExecutionResult
from retool_plugins.executors.local import LocalSandbox, missing_layers
from retool_plugins.executors.local._isolation import SCRATCH, interpreter_paths

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the isolation layers are Linux's")

T = TypeVar("T")
MISSING = missing_layers() if sys.platform.startswith("linux") else {}
TIMEOUT_S = 1.0  # for the attacks that must be stopped
ENDS_S = 10.0  # for the attacks that end on their own: they must not race the timeout on a loaded machine
MEMORY_MB = 256
CAP = 1000


def needs(*layers: str) -> pytest.MarkDecorator:
    """Skip unless every layer in ``layers`` is available here; the reason names the missing ones."""
    absent = [f"{name} ({MISSING[name]})" for name in layers if name in MISSING]
    return pytest.mark.skipif(bool(absent), reason=f"needs the isolation layer(s): {', '.join(absent)}")


class Box:
    """The module's sandbox on its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.sandbox = LocalSandbox(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, max_output_chars=CAP)
        self.session = "main"
        self.call(lambda s: s.execute("pass", "warm-up"))
        self.call(lambda s: s.close_session("warm-up"))
        zygote = self.sandbox._pool.live.zygote
        assert zygote is not None
        self.zygote = zygote.proc.pid

    def call(self, body: Callable[[LocalSandbox], Awaitable[T]]) -> T:
        return self.loop.run_until_complete(body(self.sandbox))

    def run(self, *codes: str, session: str | None = None, timeout_s: float = TIMEOUT_S) -> list[ExecutionResult]:
        """Run ``codes`` one after another in one session (the test's own by default)."""

        async def body(sandbox: LocalSandbox) -> list[ExecutionResult]:
            return [await sandbox._execute(code, session or self.session, timeout_s) for code in codes]

        return self.call(body)

    def one(self, code: str, session: str | None = None) -> ExecutionResult:
        return self.run(code, session=session)[0]

    def close(self) -> None:
        self.call(lambda s: s.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def module_box() -> Iterator[Box]:
    box = Box()
    yield box
    box.close()


def processes_of(uids: set[int]) -> list[int]:
    """Processes anywhere on this machine whose real uid is one of ``uids``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                status = Path(f"/proc/{name}/status").read_text()
            except OSError:
                continue
            uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
            if uid in uids:
                found.append(int(name))
    return found


@pytest.fixture
def box(module_box: Box, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Box]:
    """The module's sandbox; afterwards every session is closed and nothing but the zygote may be left.

    Checked twice: nothing is left below the zygote, and no process anywhere on the machine still runs as one
    of the uids this test's sessions were given (a process that escaped the tree would still have its uid).
    """
    module_box.session = request.node.name
    pool = module_box.sandbox._pool.uids
    given: set[int] = set()
    take = pool.take

    def recording_take() -> int:
        uid = take()
        given.add(uid)
        return uid

    monkeypatch.setattr(pool, "take", recording_take)
    yield module_box

    async def close_all(sandbox: LocalSandbox) -> None:
        for name in list(sandbox._sessions):
            await sandbox.close_session(name)

    module_box.call(close_all)
    assert descendants(module_box.zygote) == {}, "a process outlived its session"
    assert processes_of(given) == [], "a process escaped its session and lives on"
    zygote = module_box.sandbox._pool.live.zygote
    assert zygote is not None and zygote.proc.pid == module_box.zygote  # no attack reached the zygote


def assert_timed_out(result: ExecutionResult) -> None:
    assert result.timed_out and result.stop_reason == "timeout"
    assert (
        result.error
        == f"TimeoutError: the cell ran longer than {TIMEOUT_S:g} s and was stopped; the session's variables were lost"
    )
    assert TIMEOUT_S <= result.wall_s < TIMEOUT_S + 1.5


def assert_crashed(result: ExecutionResult, how: str) -> None:
    assert result.stop_reason == "crash" and not result.timed_out
    assert (
        result.error == f"InterpreterCrash: the Python interpreter crashed ({how}); the session's variables were lost"
    )


def assert_fresh(result: ExecutionResult) -> None:
    """The cell after a stopped one: a new worker, without the old state."""
    assert result.session_restarted and result.ok
    assert result.stdout == "False\n", "the old session's variables survived"


AFTER = "print('x' in globals())"  # run after `x = 1` and an attack: True if the state survived


# ---- infinite loops and CPU burn ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        "while True:\n    pass",
        "pow(10**9, 10**9)",  # one long C call: the interpreter never checks for signals
        "import time\ntime.sleep(100)",
        "sum(range(10**12))",
    ],
    ids=["busy-loop", "big-pow", "sleep", "long-sum"],
)
def test_cpu_burn_is_stopped_at_the_timeout(box, attack):
    _, stopped, after = box.run("x = 1", attack, AFTER)
    assert_timed_out(stopped)
    assert_fresh(after)


# ---- memory ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attack", "error"),
    [
        ("big = bytearray(8 * 1024**3)", "MemoryError"),
        ("def grow():\n    chunks = []\n    while True:\n        chunks.append(' ' * 10**6)\ngrow()", "MemoryError"),
        ("numpy.zeros((10**6, 10**6))", "numpy._core._exceptions._ArrayMemoryError: Unable to allocate 7.28 TiB"),
        ("'x' * 2**40", "MemoryError"),
    ],
    ids=["bytearray", "growing-list", "numpy", "huge-string"],
)
def test_memory_bomb_fails_in_the_cell_and_the_session_lives(box, attack, error):
    _, bomb, after = box.run("x = 1", attack, AFTER, timeout_s=ENDS_S)
    assert bomb.stop_reason == "memory" and bomb.error is not None and bomb.error.startswith(error)
    assert after.stdout == "True\n" and not after.session_restarted  # the worker and its state survived


def test_memory_is_limited_per_process_even_in_a_forked_child(box):
    (result,) = box.run(
        "import os\nr, w = os.pipe()\nif os.fork() == 0:\n    try:\n        bytearray(8 * 1024**3)\n"
        "        os.write(w, b'allocated')\n    except MemoryError:\n        os.write(w, b'MemoryError')\n"
        "    os._exit(0)\nos.wait()\nprint(os.read(r, 100).decode())",
        timeout_s=ENDS_S,
    )
    assert result.ok and result.stdout == "MemoryError\n"


# ---- processes ------------------------------------------------------------------------------------------


@needs("user", "process-limit")
def test_fork_bomb_is_bounded_and_the_worker_survives(box):
    # The children exit at once but are never reaped: their zombies hold the slots until the limit.
    bomb, after = box.run(
        "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            os._exit(0)\n        n += 1\n"
        "finally:\n    print(n)",
        "print('alive')",
        timeout_s=ENDS_S,
    )
    assert bomb.error == "BlockingIOError: [Errno 11] Resource temporarily unavailable" and bomb.stop_reason is None
    assert bomb.stdout == f"{box.sandbox.max_processes - 1}\n"
    assert after.stdout == "alive\n" and not after.session_restarted


@needs("user", "process-limit", "pid-namespace")
def test_fork_bomb_that_keeps_its_children_is_bounded_and_cleaned_up(box):
    (bomb,) = box.run(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(100)\n"
        "        n += 1\nfinally:\n    print(n, len([p for p in os.listdir('/proc') if p.isdigit()]))",
        timeout_s=ENDS_S,
    )
    children, visible = map(int, bomb.stdout.split())
    limit = box.sandbox.max_processes
    assert bomb.error == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert children == limit - 1  # the worker itself counts
    assert visible == children + 2  # and the session's init: nothing else is visible
    assert len(descendants(box.zygote)) == 2 + children  # the session: the fixture then checks it is gone


@needs("user", "process-limit")
def test_spinning_fork_bomb_is_killed_at_the_timeout(box):
    _, bomb, after = box.run(
        "x = 1", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", AFTER
    )
    assert_timed_out(bomb)
    assert_fresh(after)


@needs("user", "process-limit")
def test_thread_bomb_is_bounded(box):
    bomb, after = box.run(
        "import threading, time\nstarted = []\ntry:\n    while True:\n"
        "        t = threading.Thread(target=time.sleep, args=(30,), daemon=True); t.start(); started.append(t)\n"
        "finally:\n    print(len(started))",
        "print(threading.active_count() > 1)",
        timeout_s=ENDS_S,
    )
    assert bomb.error == "RuntimeError: can't start new thread"
    assert 0 < int(bomb.stdout) < box.sandbox.max_processes
    assert after.stdout == "True\n"  # the threads live on in their session until it closes


def test_subprocess_sleeping_past_the_timeout_dies_with_the_cell(box):
    _, stopped, after = box.run("x = 1", "import subprocess\nsubprocess.run(['sleep', '100'])", AFTER)
    assert_timed_out(stopped)
    assert_fresh(after)
    assert not [c for c in descendants(box.zygote).values() if c == "sleep 100"]


def test_subprocess_that_ignores_sigterm_dies_with_the_cell(box):
    (stopped,) = box.run("import subprocess\nsubprocess.run(['sh', '-c', 'trap \"\" TERM INT HUP; sleep 101'])")
    assert_timed_out(stopped)
    assert not [c for c in descendants(box.zygote).values() if "sleep 101" in c]


@needs("pid-namespace")
def test_daemonized_grandchild_lives_with_its_session_only(box):
    spawned, listed = box.run(
        "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
        "    if os.fork() == 0:\n        os.execvp('sleep', ['sleep', '102'])\n"
        "    os._exit(0)\nos.waitpid(pid, 0)\nprint('spawned')",
        "import time\nfor _ in range(500):  # until the daemon runs `sleep`\n"
        "    if [p for p in os.listdir('/proc') if p.isdigit() and open(f'/proc/{p}/cmdline', 'rb').read() == "
        "b'sleep\\x00102\\x00']:\n        break\n    time.sleep(0.01)\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))",
        timeout_s=ENDS_S,
    )
    assert spawned.ok and spawned.stdout == "spawned\n"
    assert len(eval(listed.stdout)) == 3  # init, worker, and the daemon reparented to the init (which reaps it)
    assert [c for c in descendants(box.zygote).values() if c == "sleep 102"]  # alive while the session is
    box.call(lambda s: s.close_session(box.session))
    assert not [c for c in descendants(box.zygote).values() if c == "sleep 102"]


# ---- the file system ------------------------------------------------------------------------------------


@needs("filesystem")
@pytest.mark.parametrize(
    "target",
    [f"{sys.prefix}/retool-hostile", "/etc/retool-hostile", "/usr/bin/retool-hostile", f"{os.getcwd()}/retool-hostile"],
    ids=["venv", "etc", "usr-bin", "trainer-cwd"],
)
def test_writes_outside_the_scratch_folder_fail_and_the_host_is_unchanged(box, target):
    (result,) = box.run(f"open({target!r}, 'w').write('owned')")
    assert result.error is not None and result.error.split(":")[0] in (
        "OSError",
        "PermissionError",
        "FileNotFoundError",
    )
    assert (
        "Read-only file system" in result.error or "Permission denied" in result.error or "No such file" in result.error
    )
    assert not Path(target).exists()


@needs("filesystem")
def test_a_host_temp_folder_is_invisible(box, tmp_path):
    (tmp_path / "secret.txt").write_text("s3cr3t")
    (result,) = box.run(f"import os\nprint(os.path.exists({str(tmp_path)!r}))\nopen({str(tmp_path / 'new')!r}, 'w')")
    assert result.stdout == "False\n" and result.error is not None and result.error.startswith("FileNotFoundError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]


def _plant(folder: Path) -> Path:
    """A dataset with answers in ``folder`` (a new one), as a trainer would keep beside its recipe."""
    folder.mkdir()
    (folder / "recipe.yaml").write_text("data:\n  path: answers.jsonl\n")
    data = folder / "answers.jsonl"
    data.write_text('{"problem": "What is 6 * 7?", "answer": "42"}\n')
    return data


PLANT_SITES = {
    "filesystem-root": Path("/"),
    "trainer-cwd": Path.cwd(),
    "beside-the-venv": Path(sys.prefix).resolve().parent,
    "var": Path("/var"),
    "opt": Path("/opt"),
}


@needs("filesystem")
@pytest.mark.parametrize(
    "parent",
    [
        pytest.param(
            folder,
            id=where,
            marks=pytest.mark.skipif(not os.access(folder, os.W_OK), reason=f"cannot plant a file in {folder}"),
        )
        for where, folder in PLANT_SITES.items()
    ],
)
def test_answers_on_the_host_cannot_be_read_or_listed(box, parent):
    # Reward hacking through the file system: a model that opens the training data and prints the ground
    # truth would earn full reward. Only what the interpreter needs is in a cell's view; nothing else.
    name = f"retool-answers-{secrets.token_hex(4)}"
    data = _plant(parent / name)
    try:
        (result,) = box.run(
            "import os\n"
            f"for action in (lambda: open({str(data)!r}).read(), lambda: os.listdir({str(data.parent)!r}),\n"
            f"               lambda: os.stat({str(data)!r})):\n"
            "    try:\n        print('allowed', action())\n"
            "    except OSError as exc:\n        print(type(exc).__name__)\n"
            f"names = os.listdir({str(parent)!r}) if os.path.isdir({str(parent)!r}) else []\n"
            "print([n for n in names if n.startswith('retool-answers-')])"
        )
    finally:
        shutil.rmtree(data.parent)
    assert result.ok, result.error
    assert result.stdout == "FileNotFoundError\nFileNotFoundError\nFileNotFoundError\n[]\n"


@needs("filesystem")
def test_the_view_holds_only_the_system_and_the_interpreter(box):
    (result,) = box.run("import json, os\nprint(json.dumps([sorted(os.listdir('/')), sorted(os.listdir('/etc'))]))")
    top, etc = ast.literal_eval(result.stdout)
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"}
    interpreter = {p.split("/")[1] for p in interpreter_paths()}
    assert set(top) <= system | interpreter | {"proc", "sys", "dev", "tmp", "etc"}
    assert {"usr", "proc", "dev", "tmp", "etc"} <= set(top)
    assert {"passwd", "group", "hostname", "hosts"} <= set(etc)
    assert not {"shadow", "gshadow", "ssh", "sudoers", "machine-id", "resolv.conf"} & set(etc)


@needs("filesystem")
def test_preloaded_and_common_standard_library_modules_import(box):
    (result,) = box.run(
        "import numpy, sympy, numpy.linalg, numpy.fft, numpy.polynomial\n"
        "import json, re, collections, decimal, fractions, statistics, datetime, random, hashlib, itertools\n"
        "import functools, heapq, bisect, string, textwrap, csv, sqlite3, ctypes, subprocess, multiprocessing\n"
        "import zoneinfo, time\n"
        "from sympy import nsolve, Symbol\n"
        "x = Symbol('x')\n"
        "print(numpy.fft.fft([1, 0]).real.tolist(), float(nsolve(x**2 - 2, x, 1)) > 1.41)\n"
        "print(sqlite3.connect(':memory:').execute('select 6 * 7').fetchone()[0])\n"
        "print(subprocess.run(['ls', '/'], capture_output=True, text=True).returncode)\n"
        "print(time.localtime().tm_year > 2000)",
        timeout_s=ENDS_S,
    )
    assert result.ok, result.error
    assert result.stdout == "[1.0, 1.0] True\n42\n0\nTrue\n"


@needs("filesystem", "ipc", "user")
def test_hostname_and_users_reveal_nothing_of_the_host(box):
    (result,) = box.run(
        "import json, os, pwd, grp, socket, subprocess\n"
        "print(json.dumps([socket.gethostname(), os.uname().nodename, sorted(p.pw_name for p in pwd.getpwall()),\n"
        "    pwd.getpwuid(os.getuid()).pw_name, os.path.expanduser('~'), sorted(g.gr_name for g in grp.getgrall()),\n"
        "    subprocess.run(['id'], capture_output=True, text=True).stdout.strip()]))"
    )
    assert result.ok, result.error
    hostname, nodename, users, me, home, groups, id_line = ast.literal_eval(result.stdout)
    assert hostname == nodename == "sandbox" != socket.gethostname()
    assert users == ["nobody", "root", "sandbox"] and me == "sandbox" and home == "/tmp"
    assert groups == ["nogroup", "root", "sandbox"]
    assert id_line.startswith("uid=") and "(sandbox)" in id_line
    host_users = {line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines() if line} - set(users)
    assert not any(name in id_line for name in host_users)


@needs("filesystem")
def test_ssh_keys_in_home_folders_are_not_readable(box):
    home = Path("/home") / f"retool-hostile-{secrets.token_hex(4)}"
    key = home / ".ssh" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_text("PRIVATE KEY")
    root_secret = Path("/root") / f".retool-hostile-{secrets.token_hex(4)}"
    root_secret.write_text("PRIVATE")
    try:
        (result,) = box.run(
            "import os\nprint(os.listdir('/home') if os.path.exists('/home') else [])\n"
            f"for path in ({str(key)!r}, {str(root_secret)!r}, os.path.expanduser('~/.ssh/id_rsa')):\n"
            "    try:\n        print(open(path).read())\n    except OSError as exc:\n        print(type(exc).__name__)"
        )
    finally:
        shutil.rmtree(home)
        root_secret.unlink()
    assert result.ok and result.stdout == "[]\nFileNotFoundError\nFileNotFoundError\nFileNotFoundError\n"


@needs("filesystem", "pid-namespace")
def test_other_processes_are_invisible_in_proc(box, monkeypatch):
    monkeypatch.setenv("RETOOL_HOSTILE_SECRET", "hunter2")
    (result,) = box.run(
        "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        f"for path in ('/proc/{os.getpid()}/environ', '/proc/1/environ', '/proc/1/root', '/proc/self/environ'):\n"
        "    try:\n        data = open(path, 'rb').read() if 'environ' in path else os.listdir(path)\n"
        "        print(path, b'hunter2' in data)\n    except OSError as exc:\n        print(path, type(exc).__name__)\n"
        "print('RETOOL_HOSTILE_SECRET' in os.environ)"
    )
    assert result.stdout.splitlines() == [
        "[1, 2]",
        f"/proc/{os.getpid()}/environ FileNotFoundError" if os.getpid() > 2 else result.stdout.splitlines()[1],
        "/proc/1/environ PermissionError",
        "/proc/1/root PermissionError",
        "/proc/self/environ False",
        "False",
    ]


@needs("filesystem")
def test_scratch_is_private_writable_and_size_limited(box):
    wrote, other, full = box.run(
        "open('/tmp/mine.txt', 'w').write('mine')\nimport os\nprint(os.getcwd(), os.listdir('.'))",
        "import os\nprint(os.listdir('/tmp'))",
        "chunks = 0\ntry:\n    while True:\n        open(f'/tmp/chunk{chunks}', 'wb').write(b'x' * 16 * 2**20)\n"
        "        chunks += 1\nfinally:\n    print(chunks)",
        timeout_s=ENDS_S,
    )
    # Where this checkout lives under /tmp (a clone in /tmp/x), the interpreter's folders are re-exposed, read-only,
    # inside the scratch, so the first folder of their path shows there; nothing else may.
    exposed = sorted(
        {os.path.relpath(p, SCRATCH).split(os.sep)[0] for p in interpreter_paths() if p.startswith("/tmp/")}
    )
    assert wrote.stdout.startswith("/tmp ") and sorted(ast.literal_eval(wrote.stdout[5:])) == sorted(
        ["mine.txt", *exposed]
    )
    empty = box.run("import os\nprint(os.listdir('/tmp'))", session="other")[0].stdout
    assert sorted(ast.literal_eval(empty)) == exposed
    assert sorted(ast.literal_eval(other.stdout)) == sorted(["mine.txt", *exposed])
    assert full.error == "OSError: [Errno 28] No space left on device"
    # About scratch_mb in all (tmpfs counts pages in per-CPU batches, so the last chunk may just fit).
    assert box.sandbox.scratch_mb // 16 - 1 <= int(full.stdout) <= box.sandbox.scratch_mb // 16


@needs("filesystem")
def test_devices_are_not_reachable_and_shared_memory_is_private(box):
    (result,) = box.run(
        "import os\nprint(sorted(os.listdir('/dev')))\n"
        "for path, mode in (('/dev/vda', 'rb'), ('/dev/kmsg', 'rb'), ('/dev/mem', 'rb'), ('/dev/shm/x', 'w'),"
        " ('/dev/null', 'w')):\n"
        "    try:\n        open(path, mode).close(); print(path, 'opened')\n"
        "    except OSError as exc:\n        print(path, exc.strerror)"
    )
    assert result.stdout.splitlines() == [
        "['fd', 'full', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']",
        "/dev/vda No such file or directory",  # the disk, the kernel log and memory are not there at all
        "/dev/kmsg No such file or directory",
        "/dev/mem No such file or directory",
        "/dev/shm/x opened",  # a private tmpfs of the session's, like /tmp
        "/dev/null opened",
    ]
    assert not Path("/dev/shm/x").exists()


@needs("seccomp")
def test_mount_and_new_namespaces_are_refused(box):
    (result,) = box.run(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno())"  # CLONE_NEWUSER: allowed to anyone without the filter
    )
    assert result.stdout == "-1 1\n-1 1\n"  # EPERM


# ---- the network ----------------------------------------------------------------------------------------


@needs("network")
def test_a_loopback_port_open_on_the_host_is_unreachable(box):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        (result,) = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the host
    # The cell's 127.0.0.1 is its own namespace's loopback, where nothing listens on that port.
    assert result.error == "ConnectionRefusedError: [Errno 111] Connection refused"


@needs("network")
def test_only_a_loopback_interface_and_no_route(box):
    (result,) = box.run(
        "import os, socket\nprint(socket.if_nameindex())\nprint(open('/proc/net/route').read().splitlines()[1:])\n"
        "print(os.listdir('/sys/class/net'))"
    )
    # No route but the loopback's own (which the kernel keeps in its local table, not in /proc/net/route):
    # a packet for any other address has nowhere to go. (Tests send nothing off loopback, so none is tried.)
    assert result.stdout == "[(1, 'lo')]\n[]\n['lo']\n"


@needs("network")
def test_local_sockets_inside_the_session_work(box):
    # Some libraries talk to themselves over 127.0.0.1 (multiprocessing managers, test servers).
    (result,) = box.run(
        "import socket, threading\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "def answer():\n    conn, _ = server.accept()\n    conn.sendall(conn.recv(5)[::-1])\n"
        "threading.Thread(target=answer).start()\n"
        "with socket.create_connection(server.getsockname(), timeout=2) as client:\n"
        "    client.sendall(b'hello')\n    print(client.recv(5))",
        timeout_s=ENDS_S,
    )
    assert result.ok, result.error
    assert result.stdout == "b'olleh'\n"


@needs("network")
def test_an_abstract_unix_socket_on_the_host_is_unreachable(box):
    name = f"\0retool-hostile-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(name)
        server.listen(1)
        (result,) = box.run(f"import socket\nsocket.socket(socket.AF_UNIX).connect({name!r})")
    assert result.error == "ConnectionRefusedError: [Errno 111] Connection refused"


@needs("filesystem")
def test_a_unix_socket_file_on_the_host_is_unreachable(box, tmp_path):
    path = str(tmp_path / "host.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        (result,) = box.run(f"import socket\nsocket.socket(socket.AF_UNIX).connect({path!r})")
    assert result.error == "FileNotFoundError: [Errno 2] No such file or directory"


# ---- output floods --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flood",
    [
        "for i in range(2 * 10**5):\n    print(i)",
        "print('x' * 10**8)",
        "import sys\nfor i in range(10**5):\n    sys.stderr.write('e' * 100)",
        "import sys\nsys.stdout.buffer.write(b'b' * 10**7)",
    ],
    ids=["print-loop", "huge-string", "stderr", "binary"],
)
def test_output_floods_are_cut_to_the_cap(box, flood):
    (result,) = box.run(flood, timeout_s=ENDS_S)
    assert result.ok and result.truncated  # it ran to its end within the timeout, holding only the cap
    assert len(result.stdout) + len(result.stderr) <= CAP + 60
    assert "chars cut]" in result.stdout + result.stderr


def test_raw_writes_to_fd_1_go_nowhere(box):
    (result,) = box.run("import os\nfor _ in range(100):\n    os.write(1, b'z' * 10**6)\nprint('ok')")
    assert result.ok and result.stdout == "ok\n" and not result.truncated


def test_flood_until_the_timeout_keeps_the_head(box):
    (result,) = box.run("print('HEAD')\nwhile True:\n    print('y' * 100)")
    assert_timed_out(result)
    assert result.truncated and result.stdout.startswith("HEAD\nyyy") and len(result.stdout) <= CAP + 60


# ---- signal tricks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        "import signal\nfor s in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}:\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
        "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))\nwhile True:\n    pass",
        "import signal, os\ndef spin(*_):\n    while True:\n        pass\nsignal.signal(signal.SIGTERM, spin)\n"
        "os.kill(os.getpid(), signal.SIGTERM)",
        "import signal\nsignal.signal(signal.SIGALRM, lambda *_: None)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)\n"
        "while True:\n    pass",
        "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)",
    ],
    ids=["ignore-all", "block-all", "handler-loops", "itimer-storm", "sigstop"],
)
def test_signal_tricks_do_not_stop_the_timeout(box, attack):
    _, stopped, after = box.run("x = 1", attack, AFTER)
    assert_timed_out(stopped)
    assert_fresh(after)


def test_a_timer_with_the_default_action_crashes_only_its_session(box):
    _, crashed, after = box.run(
        "x = 1", "import signal, time\nsignal.setitimer(signal.ITIMER_REAL, 0.05)\ntime.sleep(5)", AFTER
    )
    assert_crashed(crashed, "killed by signal SIGALRM")
    assert_fresh(after)


# ---- exit paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attack", "how"),
    [
        ("import os\nos._exit(3)", "exit code 3"),
        ("import os\nos.abort()", "killed by signal SIGABRT"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed by signal SIGKILL"),
        ("import os\nos.killpg(0, 9)", "killed by signal SIGKILL"),
    ],
    ids=["os-exit", "abort", "sigkill-self", "killpg-own-group"],
)
def test_hard_exits_are_crashes_and_the_next_cell_starts_fresh(box, attack, how):
    _, crashed, after = box.run("x = 1", attack, AFTER)
    assert_crashed(crashed, how)
    assert_fresh(after)


@pytest.mark.parametrize(
    ("attack", "error"),
    [
        ("import sys\nsys.exit(2)", "SystemExit: 2"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("try:\n    raise ValueError('first')\nfinally:\n    raise SystemExit(5)", "SystemExit: 5"),
        ("import sys\nsys.stdout.close()\nsys.stderr = None\nraise SystemExit('bye')", "SystemExit: bye"),
    ],
    ids=["sys-exit", "keyboard-interrupt", "systemexit-in-finally", "closed-streams"],
)
def test_soft_exits_are_errors_and_the_session_goes_on(box, attack, error):
    _, stopped, after = box.run("x = 1", attack, AFTER)
    assert stopped.error == error and stopped.stop_reason is None
    assert after.stdout == "True\n" and not after.session_restarted


def test_a_thread_calling_os_exit_after_the_cell_restarts_the_session(box):
    _, started, after = box.run(
        "x = 1",
        "import os, threading\ngo = threading.Event()\n"
        "threading.Thread(target=lambda: (go.wait(), os._exit(7))).start()",
        "go.set()\nimport time\ntime.sleep(5)",  # the thread, not this cell, ends the worker
        timeout_s=ENDS_S,
    )
    assert started.ok
    assert_crashed(after, "exit code 7")
    (fresh,) = box.run(AFTER)
    assert_fresh(fresh)


# ---- attacks on the parent, the protocol, other sessions ------------------------------------------------


@needs("pid-namespace", "user")
@pytest.mark.parametrize(
    ("attack", "error"),
    [
        ("import os\nos.kill(os.getppid(), 9)", "PermissionError: [Errno 1] Operation not permitted"),
        ("import os\nos.kill(-1, 9)", "ProcessLookupError: [Errno 3] No such process"),
        ("import os\nos.kill(1, 9)", "PermissionError: [Errno 1] Operation not permitted"),
    ],
    ids=["parent", "everyone", "init"],
)
def test_killing_the_parent_or_everyone_reaches_no_one_outside(box, attack, error):
    box.run("kept = 42", session="bystander")
    _, attacked, after = box.run("x = 1", attack, AFTER)
    assert attacked.error == error
    assert after.stdout == "True\n" and not after.session_restarted
    assert box.run("print(kept)", session="bystander")[0].stdout == "42\n"  # another session is untouched


FIND_SOCKET = (  # the worker's protocol socket, found the way an attacker would
    "import os, stat\nsocks = []\nfor fd in map(int, os.listdir('/proc/self/fd')):\n"
    "    try:\n        socks += [fd] if stat.S_ISSOCK(os.fstat(fd).st_mode) else []\n"
    "    except OSError:\n        pass\n"
)


@pytest.mark.parametrize(
    ("attack", "how"),
    [
        (FIND_SOCKET + "for fd in socks:\n    os.write(fd, b'\\x00\\x00\\x00\\x02{}')", "sent a reply out of turn"),
        (
            FIND_SOCKET + "for fd in socks:\n    os.write(fd, b'\\xff\\xff\\xff\\xff')\nimport time\ntime.sleep(1)",
            "over the",
        ),
        (FIND_SOCKET + "for fd in socks:\n    os.write(fd, b'\\x00\\x00\\x00\\x05[1,2]')", "sent an invalid reply"),
        (FIND_SOCKET + "for fd in socks:\n    os.close(fd)", "exit code 1"),
    ],
    ids=["forged-reply", "huge-frame", "not-a-dict", "closed-socket"],
)
def test_attacks_on_the_protocol_end_the_session_not_the_trainer(box, attack, how):
    _, attacked, after = box.run("x = 1", attack, AFTER)
    assert attacked.stop_reason == "crash" and attacked.error is not None and how in attacked.error
    assert_fresh(after)


def test_a_forked_child_cannot_speak_for_the_worker(box):
    forked, after = box.run(
        "import os\npid = os.fork()\nif pid == 0:\n    print('child')\nelse:\n"
        "    os.waitpid(pid, 0)\n    print('parent')",
        "print('next')",
        timeout_s=ENDS_S,
    )
    assert forked.ok and forked.stdout == "parent\n"  # the child's output and its return stay in the child
    assert after.ok and after.stdout == "next\n" and not after.session_restarted


# ---- threads that outlive their cell --------------------------------------------------------------------


def test_a_background_thread_does_not_leak_into_later_cells(box):
    _, clean, also_clean = box.run(
        "import threading, time\ndef chatter():\n    while True:\n        print('noise')\n        time.sleep(0.001)\n"
        "threading.Thread(target=chatter, daemon=True).start()\ntime.sleep(0.05)",
        "import time\ntime.sleep(0.05)\nprint('clean')",
        "print('also clean')",
    )
    assert clean.ok and clean.stdout == "clean\n"
    assert also_clean.stdout == "also clean\n"


def test_a_spinning_thread_dies_with_a_timed_out_cell(box):
    _, _, stopped, after = box.run(
        "x = 1",
        "import threading\nthreading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()",
        "while True:\n    pass",
        "import threading\nprint(threading.active_count(), 'x' in globals())",
    )
    assert_timed_out(stopped)
    assert after.session_restarted and after.stdout == "1 False\n"


# ---- one session's damage stays in it -------------------------------------------------------------------


def test_monkeypatched_builtins_and_modules_affect_only_their_session(box):
    box.run(
        "import builtins, sys, json, os\nbuiltins.print = None\nsys.modules['json'] = None\nos.write = None\n"
        "json.dumps = None"
    )
    broken = box.one("print('hi')")
    assert broken.error == "TypeError: 'NoneType' object is not callable"  # its own session is broken ...
    (other,) = box.run("import json\nprint(json.dumps([1]))", session="other")
    assert other.ok and other.stdout == "[1]\n"  # ... the next one is not


def test_changing_cwd_stays_in_the_session(box):
    moved, stays = box.run("import os\nos.chdir('/usr')\nprint(os.getcwd())", "print(os.getcwd())")
    assert moved.stdout == "/usr\n" and stays.stdout == "/usr\n"
    assert box.one("import os\nprint(os.getcwd())", session="other").stdout != "/usr\n"


def test_binary_and_unicode_output_arrive_intact(box):
    (result,) = box.run(
        "import sys\nsys.stdout.buffer.write(bytes(range(256)))\nsys.stdout.buffer.write(b'\\n')\n"
        "print('\\u05e9\\u05dc\\u05d5\\u05dd \\U0001f600 \\x00 nul \\ud800 lone')"
    )
    assert result.ok
    # Bytes that are not UTF-8 become U+FFFD; a lone surrogate, which UTF-8 cannot carry, becomes "?".
    assert result.stdout == bytes(range(256)).decode("utf-8", "replace") + "\nשלום 😀 \x00 nul ? lone\n"


# ---- recursion and segfaults ----------------------------------------------------------------------------


def test_runaway_recursion_is_an_error(box):
    deep, after = box.run("def f():\n    return f()\nf()", "print('alive')")
    assert deep.error == "RecursionError: maximum recursion depth exceeded" and deep.stop_reason is None
    assert after.stdout == "alive\n" and not after.session_restarted


@pytest.mark.parametrize(
    "attack",
    [
        "import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return list(map(f, [n + 1]))\nf(0)",
        "import ctypes\nctypes.string_at(0)",
    ],
    ids=["deep-c-recursion", "ctypes-null"],
)
def test_segfaults_are_crashes(box, attack):
    _, crashed, after = box.run("x = 1", attack, AFTER)
    assert_crashed(crashed, "killed by signal SIGSEGV")
    assert_fresh(after)


# ---- positive controls ----------------------------------------------------------------------------------


def test_numpy_and_sympy_are_preloaded_and_fast(box):
    preloaded, solved, array = box.run(
        "import sys\nprint([m in sys.modules and m in globals() for m in ('numpy', 'sympy', 'math', 'fractions')])",
        "x = sympy.Symbol('x')\nprint(sympy.solve(x**2 - 5*x + 6, x))",
        "print(numpy.arange(6).reshape(2, 3).sum(0))",
    )
    assert preloaded.stdout == "[True, True, True, True]\n"  # imported and bound before the first cell
    assert solved.stdout == "[2, 3]\n" and array.stdout == "[3 5 7]\n"
    assert solved.wall_s < 0.25  # importing sympy alone takes about 0.4 s; a warm solve takes 2 ms


def test_multiprocessing_works_within_the_limits(box):
    code = "import multiprocessing as mp\nwith mp.Pool(2) as p:\n    print(p.map(abs, [-1, -2, -3]))"
    (result,) = box.run(code, timeout_s=20)  # forking a pool takes a while on a loaded machine
    assert result.ok and result.stdout == "[1, 2, 3]\n"


def test_state_persists_across_cells(box):
    results = box.run("import fractions\ndef f(a):\n    return fractions.Fraction(a, 3)", "y = f(2)", "print(y + f(1))")
    assert [r.ok for r in results] == [True, True, True] and results[-1].stdout == "1\n"
