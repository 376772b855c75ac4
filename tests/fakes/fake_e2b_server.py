"""A local stand-in for E2B: the control plane and the code-interpreter server, on 127.0.0.1 only.

It speaks the HTTP the real SDK (e2b 2.x, e2b-code-interpreter 2.x) sends, so that tests drive
:class:`~retool_plugins.executors.e2b.E2BExecutor` through the SDK's own request and parsing code:

* control plane (the SDK's ``api_url``): ``POST /v2/sandboxes`` (create; honours ``Idempotency-Key``),
  ``DELETE /sandboxes/{id}`` (kill), ``POST /sandboxes/{id}/timeout``;
* code interpreter and envd (the SDK's ``sandbox_url``; the sandbox is named by the ``E2b-Sandbox-Id``
  header): ``POST /execute`` (newline-delimited JSON events, chunked), ``POST /contexts``,
  ``DELETE /contexts/{id}``, ``GET /health``.

In debug mode the SDK skips the control plane and names every sandbox ``debug_sandbox_id``; that sandbox
always exists here. Each context is a real Python process (a tiny kernel: this file run as a script), so
that hangs, crashes and floods behave as they would in a sandbox and never touch the test process. A kernel
buffers what a cell prints and sends it every 50 ms or 64 KiB, as ipykernel does.

Faults are queued per route with :meth:`FakeE2BServer.inject` and consumed one per request: an HTTP status
(``429``, ``500``, ``502``, ``503``), ``"drop"`` (close the connection without answering), ``"drop_after"`` (do
the work, then close without answering), ``"drop_mid"`` (execute only: send the headers and one event, then
close), or ``"slow:SECONDS"`` (wait, then answer).

Test-only code: it runs the code it is sent.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEBUG_SANDBOX_ID = "debug_sandbox_id"  # the id the SDK uses in debug mode
KERNEL_MEMORY_BYTES = 1024**3  # like a sandbox's RAM: a bigger allocation fails with MemoryError


@dataclass(eq=False)
class _Kernel:
    """One context: a Python process started on first use; one cell at a time."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    proc: subprocess.Popen[bytes] | None = None
    scratch: str | None = None
    dead: bool = False  # died during a cell: the next cell gets a fresh process

    def start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.dead:
            self.stop()
            self.scratch = tempfile.mkdtemp(prefix="fake-e2b-")
            self.proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "--kernel"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=self.scratch,
                start_new_session=True,
            )
            self.dead = False
        return self.proc

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()  # type: ignore[union-attr]
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


@dataclass(eq=False)
class _Sandbox:
    id: str
    body: dict[str, Any]
    contexts: dict[str, _Kernel] = field(default_factory=lambda: {"default": _Kernel()})


class FakeE2BServer:
    """The fake, with counters the tests read.

    Args:
        max_live: Sandboxes allowed at once, as an E2B account limit: one more create gets a 429.
    """

    def __init__(self, max_live: int | None = None) -> None:
        self.max_live = max_live
        self._lock = threading.Lock()
        self._sandboxes: dict[str, _Sandbox] = {}
        self._idempotent: dict[str, str] = {}
        self._faults: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self._connections: set[socket.socket] = set()
        self.reset()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-e2b", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget faults, counters and every sandbox (a test starts from a clean account)."""
        with self._lock:
            kernels = [k for s in self._sandboxes.values() for k in s.contexts.values()]
            self._sandboxes.clear()
            self._faults.clear()
            self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []  # (route, body, headers)
            self.created: list[str] = []
            self.killed: list[str] = []
            self.contexts_created = 0
            self.contexts_deleted = 0
            self.peak_live = 0
            self.peak_contexts = 0
        for kernel in kernels:
            kernel.stop()

    def inject(self, route: str, *faults: str | int) -> None:
        """Queue faults for ``route`` (create, kill, set_timeout, execute, context_create, context_delete)."""
        with self._lock:
            self._faults[route].extend(str(f) for f in faults)

    def count(self, route: str) -> int:
        with self._lock:
            return sum(1 for r, _, _ in self.requests if r == route)

    def bodies(self, route: str) -> list[dict[str, Any]]:
        with self._lock:
            return [b for r, b, _ in self.requests if r == route]

    def headers(self, route: str) -> list[dict[str, str]]:
        with self._lock:
            return [h for r, _, h in self.requests if r == route]

    @property
    def live(self) -> list[str]:
        with self._lock:
            return self._live()

    def live_contexts(self) -> int:
        with self._lock:
            return self._context_count()

    def expire(self, sandbox_id: str) -> None:
        """End a sandbox behind the client's back, as E2B does at its lifetime timeout."""
        with self._lock:
            sandbox = self._sandboxes.pop(sandbox_id)
        for kernel in sandbox.contexts.values():
            kernel.stop()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
            kernels = [k for s in self._sandboxes.values() for k in s.contexts.values()]
            self._sandboxes.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for kernel in kernels:
            kernel.stop()

    # -- internals (called from the handler threads) ---------------------------------------------------------

    def _live(self) -> list[str]:
        return [i for i in self._sandboxes if i != DEBUG_SANDBOX_ID]

    def _context_count(self) -> int:
        return sum(len(s.contexts) - 1 for s in self._sandboxes.values())

    def _take_fault(self, route: str) -> str | None:
        with self._lock:
            queue = self._faults.get(route)
            return queue.popleft() if queue else None

    def _sandbox(self, sandbox_id: str | None) -> _Sandbox | None:
        with self._lock:
            if sandbox_id == DEBUG_SANDBOX_ID and sandbox_id not in self._sandboxes:
                self._sandboxes[sandbox_id] = _Sandbox(sandbox_id, {})
            return self._sandboxes.get(sandbox_id or "")

    def handle(self, h: _Handler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else {}
        path = h.path.split("?")[0]
        route, arg = _route(method, path)
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self.requests.append((route, body, headers))
        fault = self._take_fault(route)
        if fault is not None and fault.startswith("slow:"):
            time.sleep(float(fault.split(":", 1)[1]))
            fault = None
        if fault == "drop":
            h.drop()
            return
        if fault == "drop_after":  # do the work, lose the answer (a create whose reply never arrives)
            h.drop_replies = True
        if fault is not None and fault.isdigit():
            status = int(fault)
            message = "maximum number of concurrent E2B sandboxes (20)" if status == 429 else "injected fault"
            h.reply(status, {"code": status, "message": message})
            return
        getattr(self, f"_do_{route}", self._do_unknown)(h, arg, body, headers, fault)

    def _do_unknown(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        h.reply(404, {"code": 404, "message": f"no route {h.command} {h.path}"})

    def _do_create(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        if not headers.get("x-api-key"):
            h.reply(401, {"code": 401, "message": "missing API key"})
            return
        key = headers.get("idempotency-key")
        with self._lock:
            known = self._idempotent.get(key) if key else None
            if known is not None:  # a replay has no further effect, even once that sandbox was killed
                sandbox_id = known
            elif self.max_live is not None and len(self._live()) >= self.max_live:
                h.reply(429, {"code": 429, "message": f"maximum number of concurrent E2B sandboxes ({self.max_live})"})
                return
            else:
                sandbox_id = f"sbx{len(self.created)}-{uuid.uuid4().hex[:6]}"
                self._sandboxes[sandbox_id] = _Sandbox(sandbox_id, body)
                self.created.append(sandbox_id)
                if key:
                    self._idempotent[key] = sandbox_id
                self.peak_live = max(self.peak_live, len(self._live()))
        reply = {
            "templateID": body.get("templateID", ""),
            "sandboxID": sandbox_id,
            "clientID": "fake",
            "envdVersion": "0.4.0",
        }
        h.reply(201, reply)

    def _do_kill(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        with self._lock:
            sandbox = self._sandboxes.pop(arg, None)
            if sandbox is not None:
                self.killed.append(arg)
        if sandbox is None:
            h.reply(404, {"code": 404, "message": f"sandbox {arg} not found"})
            return
        for kernel in sandbox.contexts.values():
            kernel.stop()
        h.reply(204, None)

    def _do_set_timeout(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        found = self._sandbox(arg) is not None
        h.reply(204 if found else 404, None if found else {"code": 404, "message": "not found"})

    def _do_health(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        h.reply(204 if self._sandbox(headers.get("e2b-sandbox-id")) else 502, None)

    def _do_context_create(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        sandbox = self._sandbox(headers.get("e2b-sandbox-id"))
        if sandbox is None:
            h.reply(502, None)
            return
        context_id = uuid.uuid4().hex
        with self._lock:
            sandbox.contexts[context_id] = _Kernel()
            self.contexts_created += 1
            self.peak_contexts = max(self.peak_contexts, self._context_count())
        h.reply(201, {"id": context_id, "language": body.get("language", "python"), "cwd": "/home/user"})

    def _do_context_delete(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        sandbox = self._sandbox(headers.get("e2b-sandbox-id"))
        with self._lock:
            kernel = sandbox.contexts.pop(arg, None) if sandbox is not None and arg != "default" else None
            if kernel is not None:
                self.contexts_deleted += 1
        if kernel is None:
            h.reply(404, {"code": 404, "message": f"context {arg} not found"})
            return
        kernel.stop()
        h.reply(204, None)

    def _do_execute(self, h: _Handler, arg: str, body: dict, headers: dict, fault: str | None) -> None:
        sandbox = self._sandbox(headers.get("e2b-sandbox-id"))
        if sandbox is None:  # E2B's proxy answers 502 for a sandbox that is gone
            h.reply(502, None)
            return
        kernel = sandbox.contexts.get(body.get("context_id") or "default")
        if kernel is None:
            h.reply(404, {"code": 404, "message": "context not found"})
            return
        h.start_stream()
        if fault == "drop_mid":
            h.chunk(_event("stdout", text="partial\n"))
            h.drop()
            return
        with kernel.lock:  # like a Jupyter kernel: one cell at a time, the next waits
            try:
                proc = kernel.start()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps({"code": body.get("code", "")}).encode() + b"\n")
                proc.stdin.flush()
            except (OSError, ValueError):  # killed meanwhile (sandbox killed or context deleted)
                h.chunk(_event("error", name="ContextRestarting", value="Context was restarted", traceback=""))
                h.end_stream()
                return
            client_gone = False
            for line in iter(proc.stdout.readline, b""):
                if not line.endswith(b"\n"):  # cut short: the kernel died while writing
                    continue
                if json.loads(line).get("type") == "end_of_execution":
                    break
                if not client_gone:
                    client_gone = not h.chunk(line)  # a client that left: keep draining, as Jupyter runs on
            else:  # the kernel died during the cell: Jupyter restarts it and E2B reports this
                kernel.dead = True
                if not client_gone:
                    h.chunk(_event("error", name="ContextRestarting", value="Context was restarted", traceback=""))
        if not client_gone:
            h.end_stream()


def _route(method: str, path: str) -> tuple[str, str]:
    for pattern, name in (
        (r"POST /v2/sandboxes", "create"),
        (r"DELETE /sandboxes/([^/]+)", "kill"),
        (r"POST /sandboxes/([^/]+)/timeout", "set_timeout"),
        (r"GET /health", "health"),
        (r"POST /contexts", "context_create"),
        (r"DELETE /contexts/([^/]+)", "context_delete"),
        (r"POST /execute", "execute"),
    ):
        match = re.fullmatch(pattern, f"{method} {path}")
        if match:
            return name, match.group(1) if match.groups() else ""
    return "unknown", ""


def _event(kind: str, **fields: Any) -> bytes:
    if kind in ("stdout", "stderr"):
        fields["timestamp"] = time.time_ns()
    return json.dumps({"type": kind, **fields}).encode() + b"\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams for /execute

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls
        with self.server.fake._lock:  # type: ignore[attr-defined]
            self.server.fake._connections.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.fake._lock:  # type: ignore[attr-defined]
            self.server.fake._connections.discard(self.connection)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.fake.handle(self, "GET")  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        self.server.fake.handle(self, "POST")  # type: ignore[attr-defined]

    def do_DELETE(self) -> None:
        self.server.fake.handle(self, "DELETE")  # type: ignore[attr-defined]

    drop_replies = False

    def reply(self, status: int, payload: Any) -> None:
        if self.drop_replies:
            self.drop()
            return
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> bool:
        """Send one chunk; False when the client has gone."""
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False

    def end_stream(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def drop(self) -> None:
        """Close the connection at once (an RST, as a crashed proxy would)."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


# -- the kernel: this file run as a script --------------------------------------------------------------------


def _kernel_main() -> None:
    """Run cells read as JSON lines on stdin; answer with E2B's NDJSON events on the original stdout."""
    import ast
    import builtins
    import io
    import resource
    import traceback

    resource.setrlimit(resource.RLIMIT_AS, (KERNEL_MEMORY_BYTES, KERNEL_MEMORY_BYTES))
    requests = os.fdopen(os.dup(0), "rb")
    proto = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # a cell that writes to fd 1 or reads fd 0 cannot touch the protocol
        os.dup2(null, fd)
    lock = threading.RLock()

    def emit(data: bytes) -> None:
        with lock:
            proto.write(data)
            proto.flush()

    class Stream(io.TextIOBase):
        def __init__(self, name: str) -> None:
            self.name, self.parts, self.size = name, [], 0

        def writable(self) -> bool:
            return True

        def write(self, text: str) -> int:
            with lock:
                self.parts.append(text)
                self.size += len(text)
                if self.size >= 64 * 1024:
                    self.flush()
            return len(text)

        def flush(self) -> None:
            with lock:
                text, self.parts, self.size = "".join(self.parts), [], 0
                for start in range(0, len(text), 1 << 20):  # events of at most 1 MiB
                    emit(_event(self.name, text=text[start : start + (1 << 20)]))

    out, err = Stream("stdout"), Stream("stderr")

    def flusher() -> None:
        while True:
            time.sleep(0.05)
            out.flush()
            err.flush()

    threading.Thread(target=flusher, daemon=True).start()
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    for count, line in enumerate(requests, 1):
        code = json.loads(line)["code"]
        sys.stdout, sys.stderr = out, err
        value: Any = None
        try:
            tree = ast.parse(code, "<cell>")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<cell>", "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are cell errors, as in Jupyter
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            out.flush()
            err.flush()
            emit(_event("error", name=type(exc).__name__, value=str(exc), traceback=text))
        else:
            out.flush()
            err.flush()
            if value is not None and not code.rstrip().endswith(";"):
                emit(_event("result", text=repr(value), is_main_result=True))
        emit(_event("number_of_executions", execution_count=count))
        emit(_event("end_of_execution"))


if __name__ == "__main__" and sys.argv[1:] == ["--kernel"]:
    _kernel_main()
