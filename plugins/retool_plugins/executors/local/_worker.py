"""The code that runs cells inside a LocalSandbox worker, and the helpers the parent shares with it.

A worker is forked from the sandbox's zygote (see ``_zygote.py``), which has already imported this module and
the preloaded modules; :func:`serve` is then its whole life. Requests arrive and replies leave on one private
socket, each a 4-byte big-endian length followed by UTF-8 JSON; never pickle, so nothing a cell writes can make
the parent run code. The protocol lives on a private fd, so a cell that writes to fd 1 or 2 directly
(``os.write``, C code, child processes) cannot corrupt it: that output goes to ``/dev/null``, and a process a
cell forks loses the socket at once.

A cell's ``sys.stdout`` and ``sys.stderr`` keep only the head and a rolling tail of what it prints, so a flood
costs bounded memory. The head is also mirrored into shared memory (a memfd of the parent), so that when the
parent has to kill a cell that hangs or crashes it can still show what the cell printed; the same memfd ends
with a slot where the session's init process records how the worker ended.

The module imports only the standard library, and the parent imports it too for :func:`fit`,
:func:`read_mirror` and :func:`read_status`.
"""

from __future__ import annotations

import ast
import builtins
import codecs
import contextlib
import io
import json
import linecache
import mmap
import os
import struct
import sys
import traceback
import types
from _thread import get_ident
from collections.abc import Callable
from typing import Any

from retool_plugins.executors._output import Clip, clip_text, error_budget, fit

_FRAME = struct.Struct(">I")
_MIRROR = struct.Struct("<IIBB")  # bytes used by the stdout and stderr heads; whether each ran past its head
_LOST = "\n...[more output was not kept]...\n"
_STATUS = struct.Struct("<ii")  # after the heads: 1 once the worker ended, then its wait status

# Bound now: a cell may rebind os.write or json.dumps, and the reply of its cell must still go out.
_read = os.read
_write = os.write
_encode = json.JSONEncoder(ensure_ascii=False).encode
_decode = json.JSONDecoder().decode


def mirror_size(cap: int) -> int:
    """Bytes of the shared memfd for ``cap`` characters per stream (UTF-8 needs at most 4 per character)."""
    return _MIRROR.size + 2 * 4 * cap + _STATUS.size


def write_status(fd: int, cap: int, status: int) -> None:
    """Record the worker's wait status (written by the session's init process when the worker ends)."""
    os.pwrite(fd, _STATUS.pack(1, status), mirror_size(cap) - _STATUS.size)


def read_status(data: bytes, cap: int) -> int | None:
    """The wait status :func:`write_status` recorded in ``data`` (the whole memfd), or ``None``."""
    done, status = _STATUS.unpack_from(data, mirror_size(cap) - _STATUS.size)
    return status if done else None


def read_mirror(data: bytes, cap: int) -> tuple[str, str, bool]:
    """Decode ``(stdout, stderr, truncated)`` from a head mirror; a stream that ran past its head gets a marker."""
    region = 4 * cap
    n_out, n_err, over_out, over_err = _MIRROR.unpack_from(data)
    texts = []
    for start, used, over in ((_MIRROR.size, n_out, over_out), (_MIRROR.size + region, n_err, over_err)):
        texts.append(data[start : start + min(used, region)].decode("utf-8", "replace") + (_LOST if over else ""))
    return texts[0], texts[1], bool(over_out or over_err)


class Mirror:
    """Writes each stream's head into the parent's memfd: slot 0 is stdout, slot 1 is stderr.

    Args:
        fd: The memfd, already sized by the parent to :func:`mirror_size`.
        cap: Characters per stream.
    """

    def __init__(self, fd: int, cap: int) -> None:
        self.region = 4 * cap
        self.map = mmap.mmap(fd, mirror_size(cap))
        self.used = [0, 0]
        self.over = [0, 0]
        self.enabled = True  # off in a process a cell forks: only the worker itself writes the heads

    def reset(self) -> None:
        """Forget the previous cell's heads."""
        self.used = [0, 0]
        self.over = [0, 0]
        _MIRROR.pack_into(self.map, 0, 0, 0, 0, 0)

    def writer(self, slot: int) -> Callable[[str | None], None]:
        """The ``Clip.mirror`` callback for ``slot``."""

        def add(text: str | None) -> None:
            if not self.enabled:
                return
            if text is None:
                self.over[slot] = 1
                _MIRROR.pack_into(self.map, 0, *self.used, *self.over)
                return
            data = text.encode("utf-8", "replace")[: self.region - self.used[slot]]
            start = _MIRROR.size + slot * self.region + self.used[slot]
            self.map[start : start + len(data)] = data
            self.used[slot] += len(data)
            # The header after the data: the parent never reads bytes that are not written yet.
            _MIRROR.pack_into(self.map, 0, *self.used, *self.over)

        return add


class Capture(io.TextIOBase):
    """The worker's persistent ``sys.stdout`` / ``sys.stderr``; each cell gets a fresh :class:`Clip` inside it.

    The object stays the same across cells, so a logging handler a cell creates keeps writing into the output
    of later cells, as in a notebook. Bytes written to its ``buffer`` are decoded as UTF-8, invalid ones replaced.
    What threads that an earlier cell started write is dropped: a thread left printing in the background must
    not leak into the output of the cells after it.
    """

    encoding = "utf-8"
    errors = "replace"

    def __init__(self) -> None:
        super().__init__()
        self.clip = Clip(0)
        self.stale: frozenset[int] = frozenset()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.buffer = types.SimpleNamespace(write=self._write_bytes, flush=self.flush, writable=self.writable)

    def _write_bytes(self, data: Any) -> int:
        data = memoryview(data).tobytes()  # rejects str and int, like a real binary stream
        self.write(self.decoder.decode(data))
        return len(data)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: Any) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self.stale and get_ident() in self.stale:
            return len(text)
        self.clip.add(text)
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # a cell that closes sys.stdout must not silence every later cell

    def start(self, cap: int, mirror: Callable[[str | None], None] | None) -> None:
        """Begin capturing a cell; the threads alive now, other than this one, are not the cell's."""
        self.clip = Clip(cap, mirror)
        self.stale = frozenset(sys._current_frames()) - {get_ident()}
        self.decoder.reset()

    def stop(self) -> Clip:
        """End the cell and return what it wrote; output from stray threads is then discarded."""
        rest = self.decoder.decode(b"", final=True)
        if rest:
            self.clip.add(rest)
        clip, self.clip = self.clip, Clip(0)
        return clip


def _report(exc: BaseException, tb: types.TracebackType | None, err: Capture) -> str:
    """Write the traceback to the cell's stderr and return its last line (``"NameError: ..."``)."""
    try:
        te = traceback.TracebackException(type(exc), exc, tb, compact=True)
        err.write("".join(te.format()))
        # The exception line is the first one not indented (a SyntaxError puts the code and caret before it).
        lines = [line for line in te.format_exception_only() if not line[:1].isspace()]
        return lines[0].strip() if lines else type(exc).__name__
    except BaseException:  # an exception whose formatting fails must still be reported
        return type(exc).__name__


def run_cell(
    code: str, namespace: dict[str, Any], number: int, out: Capture, err: Capture, cap: int, mirror: Mirror | None
) -> dict[str, Any]:
    """Run one cell in ``namespace`` and return the reply (without its ``seq``)."""
    if mirror is not None:
        mirror.reset()
    out.start(cap, mirror.writer(0) if mirror else None)
    err.start(cap, mirror.writer(1) if mirror else None)
    sys.stdout, sys.stderr = out, err  # a previous cell may have replaced them
    filename = f"<cell-{number}>"
    error: str | None = None
    memory = False
    try:
        # Registered so that tracebacks show the cell's source lines.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not code.rstrip().endswith(";"):
            last = ast.Expression(tree.body.pop().value)
        # dont_inherit: this module's own `from __future__` imports must not change the cell's semantics.
        body = compile(tree, filename, "exec", dont_inherit=True)
        expr = compile(last, filename, "eval", dont_inherit=True) if last is not None else None
    except BaseException as exc:  # SyntaxError, or MemoryError/RecursionError on absurd input
        error, memory = _report(exc, None, err), isinstance(exc, MemoryError)
    else:
        try:
            exec(body, namespace)
            if expr is not None:
                # Like a notebook: a bare last expression shows its value (small models write `x`, not `print(x)`).
                value = eval(expr, namespace)
                if value is not None:
                    out.write(repr(value) + "\n")
        except BaseException as exc:  # KeyboardInterrupt and SystemExit too: they end the cell, not the worker
            tb = exc.__traceback__
            error, memory = _report(exc, tb.tb_next if tb else None, err), isinstance(exc, MemoryError)
    stdout, stderr, truncated = fit(out.stop(), err.stop(), cap)
    if error is not None:
        error, cut = clip_text(error, error_budget(cap)).render(error_budget(cap))
        truncated = truncated or cut
    return {"stdout": stdout, "stderr": stderr, "error": error, "truncated": truncated, "memory": memory}


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = _read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(fd: int) -> dict[str, Any] | None:
    header = _read_exact(fd, _FRAME.size)
    if header is None:
        return None
    payload = _read_exact(fd, _FRAME.unpack(header)[0])
    return None if payload is None else _decode(payload.decode("utf-8"))


def _send(fd: int, message: dict[str, Any]) -> None:
    # ensure_ascii=False leaves lone surrogates (print("\ud800")) raw; "replace" turns them into "?".
    data = _encode(message).encode("utf-8", "replace")
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        view = view[_write(fd, view) :]


class _Forked:
    """Set in a process that a cell forks from the worker: it must never speak the protocol."""

    value = False


def serve(fd: int, mirror_fd: int, cap: int, preloaded: dict[str, Any]) -> None:
    """Serve cells on the socket ``fd`` until the parent closes it; ``preloaded`` is bound in the cells' namespace.

    Args:
        fd: The protocol socket (requests in, replies out).
        mirror_fd: The parent's memfd for the output heads, or -1.
        cap: Characters of output kept per cell (``max_output_chars``).
        preloaded: Names bound in the namespace before the first cell (the zygote's preloaded modules).
    """
    os.set_inheritable(fd, False)  # programs a cell runs must not hold the protocol socket
    mirror = None
    if mirror_fd >= 0:
        mirror = Mirror(mirror_fd, cap)

    def forked() -> None:
        # A cell called os.fork() (or multiprocessing did): the child keeps running the cell's code, but the
        # socket and the output heads belong to the worker alone.
        _Forked.value = True
        if mirror is not None:
            mirror.enabled = False
        with contextlib.suppress(OSError):
            os.close(fd)

    os.register_at_fork(after_in_child=forked)
    # A fresh __main__ for the cells, as in a notebook: the worker's own globals stay out of their way.
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    module.__dict__.update(preloaded)
    sys.modules["__main__"] = module
    sys.argv = [""]
    sys.path.insert(0, "")  # the scratch directory, so a cell can import a module it wrote
    out, err = Capture(), Capture()
    sys.stdout, sys.stderr = out, err
    _send(fd, {"seq": 0, "ready": True, "pid": os.getpid()})
    number = 0
    while True:
        request = _recv(fd)
        if request is None:  # the parent closed the session or is gone
            return
        number += 1
        reply = run_cell(request["code"], module.__dict__, number, out, err, cap, mirror)
        if _Forked.value:  # a child the cell forked came back here: it ends now, silently
            os._exit(0)
        reply["seq"] = request["seq"]
        _send(fd, reply)
