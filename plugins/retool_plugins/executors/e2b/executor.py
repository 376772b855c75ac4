"""E2BExecutor: each session's cells run in an E2B cloud sandbox (a Firecracker microVM with a Jupyter kernel).

E2B is a hosted service, so its failures are those of a network API: rate limits (429 "maximum number of
concurrent E2B sandboxes (20)" at an account's limit), 5xx answers, dropped connections, and sandboxes that
still count against the limit for a while after they were closed. Hence a semaphore on live sandboxes that is
released only once a sandbox is really killed, retries with exponential backoff and jitter (and a random delay
before each creation: bursts of creations get dropped), and kills on ``close_session``, on ``aclose`` and,
synchronously, when the executor is collected or the interpreter exits.

A request that failed before the code reached the kernel (429, 5xx, a refused connection) is sent again. One
that failed after (a stream dropped mid-cell, a 502 or 404 for a sandbox that is gone) leaves the session's
state unknown: that sandbox is killed, the cell reruns in a fresh one, and its result says ``session_restarted``
when earlier cells' state was lost on the way.

One file, because sessions, retries and the live-sandbox limit act on the same state: a retry decides whether
a session's sandbox survives, and only a confirmed kill frees its place under the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from retool.executor import Executor
from retool.types import ExecutionResult, StopReason
from retool_plugins.executors._output import Clip, clip_text, error_budget, fit
from retool_plugins.executors.e2b._support import (
    FATAL,
    LOST,
    RETRY,
    accepts,
    classify,
    is_running,
    kill_leftovers,
    logger,
    sdk,
)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # Jupyter tracebacks are colored
_CRASHES = {"ContextRestarting", "UnexpectedEndOfExecution"}  # the kernel died; E2B restarted it empty


@dataclass(eq=False)
class _Handle:
    """Where one session runs: its own sandbox, or a context (a kernel) in the shared sandbox."""

    sandbox: Any
    context: Any = None
    cells: int = 0  # cells that ran to their end here: losing the handle loses their state


@dataclass(eq=False)
class _Session:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    handle: _Handle | None = None
    restarted: bool = False  # state was lost; the next cell's result says so
    create_key: str | None = None  # reused by the retries of one sandbox creation, so it makes one sandbox


class E2BExecutor(Executor):
    """Runs each session's cells in its own E2B sandbox, a hosted microVM with a Jupyter kernel.

    Variables, imports and functions persist between the cells of a session and the value of a bare last
    expression is shown, as in a notebook (E2B's ``results`` are appended to stdout as text). Sessions never
    share a kernel. With ``isolation="sandbox"`` (the default) each session gets a sandbox of its own: nothing,
    not even the file system or processes a cell leaves behind, is shared. ``isolation="context"`` gives each
    session a context (its own kernel) in one shared sandbox instead: cheaper and faster to start, but sessions
    share that sandbox's file system, CPU and memory. Sandboxes have no internet access unless allowed.

    The API key comes from ``api_key`` or the environment variable ``E2B_API_KEY``; it is checked when the first
    cell runs, so a recipe is parsed without one. With ``debug=True`` (or ``E2B_DEBUG=true``) the SDK needs no
    key and talks to one local code-interpreter server (``http://localhost:49999``) instead of the cloud; every
    session then gets its own context there.

    A session keeps its sandbox until ``close_session``, so at most ``max_sandboxes`` sessions run cells at
    once; the others wait for a sandbox to be killed. A request that fails (429, 5xx, a dropped connection) is
    retried up to ``max_retries`` times; after that, and for any other failure of the service, the cell's result
    is an error ``"SandboxError: ..."`` with ``stop_reason="crash"``. ``execute`` raises only for a missing SDK
    or key, which no retry can fix.

    Args:
        timeout_s: Wall-clock limit of one cell, in seconds, measured here. A cell past it is stopped, its
            sandbox killed, and the next cell of the session starts fresh (``session_restarted``).
        template: E2B template (name or id) of the sandboxes; ``None`` for the SDK's code-interpreter template.
        api_key: E2B API key; ``None`` to read ``E2B_API_KEY`` (better: a key in a recipe is saved with the run).
        isolation: ``"sandbox"`` (one sandbox per session) or ``"context"`` (one kernel per session in a
            shared sandbox).
        max_sandboxes: Most sandboxes alive at once (contexts, with ``isolation="context"``). E2B's default
            account limit is 20 concurrent sandboxes; set this to your plan's limit, minus what else uses it.
        sandbox_timeout_s: Lifetime of a sandbox in seconds, after which E2B kills it even if it was never
            closed (a backstop for crashed trainers). Longer than any session should last.
        request_timeout_s: Timeout of one API request (creating or killing a sandbox, connecting to it).
        allow_internet_access: Whether code in the sandboxes may reach the internet. Off by default: code a
            model wrote has no business downloading things, and a reward should not depend on the network.
        max_output_chars: Characters of stdout and stderr kept per cell, together; longer output keeps its head
            and tail with a marker in between (``truncated=True``).
        max_stream_chars: Characters a cell may print before it is stopped (``stop_reason="output_limit"``):
            the SDK holds everything a cell prints in memory, so a print loop must not run to its timeout.
        max_retries: Retries of a failed request (a sandbox creation or a cell) before the cell is given up.
        backoff_base_s: First retry delay in seconds; each retry doubles it, up to ``backoff_max_s``. Each delay
            is drawn at random between half and all of it, so sessions that failed together retry apart.
        backoff_max_s: Longest retry delay in seconds.
        start_jitter_s: Each sandbox creation first waits a random time up to this many seconds, so that the
            sessions of a new batch do not all hit the API at one instant.
        debug: Use E2B's debug mode (a local server, no key); ``None`` to read ``E2B_DEBUG``.
        sdk_options: More connection options for the E2B SDK (its ``ApiParams``: ``domain``, ``proxy``,
            ``api_headers``, ...), passed to every request that creates or kills a sandbox.
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        template: str | None = None,
        api_key: str | None = None,
        isolation: Literal["sandbox", "context"] = "sandbox",
        max_sandboxes: int = 20,
        sandbox_timeout_s: int = 600,
        request_timeout_s: float = 30.0,
        allow_internet_access: bool = False,
        max_output_chars: int = 2000,
        max_stream_chars: int = 32_000_000,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        start_jitter_s: float = 0.25,
        debug: bool | None = None,
        sdk_options: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("timeout_s", timeout_s), ("sandbox_timeout_s", sandbox_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if isolation not in ("sandbox", "context"):
            raise ValueError(f"isolation must be 'sandbox' or 'context', got {isolation!r}")
        if max_sandboxes < 1 or max_retries < 0 or max_output_chars < 0 or max_stream_chars < max_output_chars:
            raise ValueError(
                "need max_sandboxes >= 1, max_retries >= 0 and 0 <= max_output_chars <= max_stream_chars; got "
                f"{max_sandboxes!r}, {max_retries!r}, {max_output_chars!r}, {max_stream_chars!r}"
            )
        if min(request_timeout_s, backoff_base_s, backoff_max_s, start_jitter_s) < 0:
            raise ValueError("request_timeout_s, backoff_base_s, backoff_max_s and start_jitter_s must be >= 0")
        self.timeout_s = float(timeout_s)
        self.template = template
        self.api_key = api_key
        self.isolation = isolation
        self.max_sandboxes = max_sandboxes
        self.sandbox_timeout_s = int(sandbox_timeout_s)
        self.request_timeout_s = float(request_timeout_s)
        self.allow_internet_access = allow_internet_access
        self.max_output_chars = max_output_chars
        self.max_stream_chars = max_stream_chars
        self.max_retries = max_retries
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.start_jitter_s = float(start_jitter_s)
        self.debug = debug
        self.sdk_options = dict(sdk_options or {})
        self._sessions: dict[str, _Session] = {}
        self._slots = asyncio.Semaphore(max_sandboxes)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()
        self._options: dict[str, Any] = {}  # SDK connection options, resolved at first use
        self._shared: Any = None  # the sandbox every context lives in (context isolation, debug mode)
        self._shared_lock = asyncio.Lock()
        self._shared_refreshed = 0.0
        self._shared_key: str | None = None
        # Sandbox ids not killed yet, for the finalizer: it must hold no reference to self.
        self._live: dict[str, None] = {}
        self._finalizer = weakref.finalize(self, kill_leftovers, self._live, self._options)

    async def execute(self, code: str, session: str) -> ExecutionResult:
        """Run ``code`` in ``session``'s sandbox (created on first use) and report what happened.

        ``wall_s`` includes waiting for a free sandbox, creating it and the retries.
        """
        start = time.monotonic()
        state = self._sessions.setdefault(session, _Session())
        async with state.lock:  # one session's cells run one after another
            if state.closed.is_set():
                result = ExecutionResult(error="SandboxError: the session was closed", stop_reason="crash")
            else:
                try:
                    result = await self._execute_locked(state, code)
                except asyncio.CancelledError:
                    self._lose(state)  # the caller gave up: the cell must not keep running unobserved
                    raise
        return replace(result, wall_s=time.monotonic() - start)

    async def close_session(self, session: str) -> None:
        """Stop ``session``'s running cell, kill its sandbox and wait until it is gone; unknown names are ignored."""
        state = self._sessions.pop(session, None)
        if state is None:
            return
        state.closed.set()  # a running cell ends now instead of at its timeout
        async with state.lock:
            handle, state.handle = state.handle, None
            if handle is not None:
                await self._close_handle(handle)

    async def aclose(self) -> None:
        """Close every session and kill every sandbox; safe to call twice."""
        await asyncio.gather(*(self.close_session(name) for name in list(self._sessions)))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        async with self._shared_lock:
            shared, self._shared = self._shared, None
            if shared is not None:
                await self._kill(shared)

    async def _execute_locked(self, state: _Session, code: str) -> ExecutionResult:
        self._resolve_options()  # a missing SDK or key raises here: no retry can fix it
        restarted = state.restarted
        failures = 0
        while True:
            if state.closed.is_set():  # closed during a retry: close_session is waiting for this cell to end
                return ExecutionResult(error="SandboxError: the session was closed", stop_reason="crash")
            handle = state.handle
            try:
                if handle is None:
                    handle = state.handle = await self._open(state, first=failures == 0)
                result = await self._run_cell(state, handle, code)
            except Exception as exc:
                kind = classify(exc)
                if handle is not None and kind != RETRY:  # the kernel may have run part of the cell, or be gone
                    state.handle = None
                    state.restarted = restarted = restarted or handle.cells > 0
                    self._spawn(self._close_handle(handle, gone=kind == LOST))
                if kind == FATAL or failures >= self.max_retries:
                    logger.warning("E2B request failed, giving up after %d retries: %r", failures, exc)
                    state.restarted = restarted
                    error = f"SandboxError: {type(exc).__name__}: {exc}"
                    return ExecutionResult(error=error, stop_reason="crash", session_restarted=restarted)
                logger.info("E2B request failed (%r); retrying", exc)
                await asyncio.sleep(self._backoff_delay(failures))
                failures += 1
                continue
            if state.handle is not None:  # else the cell was stopped and the next one starts fresh
                state.restarted = False
            return replace(result, session_restarted=restarted)

    async def _open(self, state: _Session, first: bool) -> _Handle:
        """A fresh sandbox, or a context in the shared one; takes a slot, given back by ``_close_handle``."""
        await self._slots.acquire()
        try:
            if self.isolation == "context" or self._options.get("debug"):
                sandbox = await self._shared_sandbox(first)
                try:
                    context = await sandbox.create_code_context(
                        language="python", request_timeout=self.request_timeout_s
                    )
                except Exception as exc:
                    if classify(exc) != RETRY:
                        await self._forget_shared(sandbox)
                    raise
                return _Handle(sandbox, context)
            state.create_key = state.create_key or str(uuid.uuid4())
            sandbox = await self._create(state.create_key, first)
            state.create_key = None
            return _Handle(sandbox)
        except BaseException:
            self._slots.release()
            raise

    async def _shared_sandbox(self, first: bool) -> Any:
        """The sandbox all contexts live in; new sessions keep it alive (its lifetime starts over for them)."""
        async with self._shared_lock:
            if self._shared is not None and time.monotonic() - self._shared_refreshed > self.sandbox_timeout_s / 4:
                try:
                    await self._shared.set_timeout(self.sandbox_timeout_s)
                    self._shared_refreshed = time.monotonic()
                except Exception as exc:
                    if classify(exc) == RETRY:
                        raise
                    self._spawn(self._kill(self._shared))  # gone, or in a state we cannot know: a new one
                    self._shared = None
            if self._shared is None:
                self._shared_key = self._shared_key or str(uuid.uuid4())
                self._shared = await self._create(self._shared_key, first)
                self._shared_key, self._shared_refreshed = None, time.monotonic()
            return self._shared

    async def _create(self, key: str, first: bool) -> Any:
        module = sdk()
        if first and self.start_jitter_s:
            await asyncio.sleep(self._rng.uniform(0, self.start_jitter_s))
        kwargs: dict[str, Any] = {
            "timeout": self.sandbox_timeout_s,
            "allow_internet_access": self.allow_internet_access,
        }
        if self.template is not None:
            kwargs["template"] = self.template
        if accepts(module.AsyncSandbox.create, "idempotency_key"):  # a retry after a lost answer makes no second one
            kwargs["idempotency_key"] = key
        sandbox = await module.AsyncSandbox.create(**kwargs, **self._options)
        if not self._options.get("debug"):
            self._live[sandbox.sandbox_id] = None
        return sandbox

    async def _run_cell(self, state: _Session, handle: _Handle, code: str) -> ExecutionResult:
        out, err = Clip(self.max_output_chars), Clip(self.max_output_chars)
        streamed = 0

        def take(clip: Clip, text: str | None) -> None:
            nonlocal streamed
            if text:
                streamed += len(text)
                if streamed > self.max_stream_chars:
                    raise _Flood  # ends the stream: the SDK must not hold a flood in memory
                clip.add(text)

        run = asyncio.ensure_future(
            handle.sandbox.run_code(
                code,
                context=handle.context,
                on_stdout=lambda m: take(out, m.line),
                on_stderr=lambda m: take(err, m.line),
                on_result=lambda r: take(out, f"{r.text}\n" if r.text else None),
                timeout=self.timeout_s + self.request_timeout_s,  # the SDK's limit is a backstop; ours is below
                request_timeout=self.request_timeout_s,
            )
        )
        closed = asyncio.ensure_future(state.closed.wait())
        try:
            done, _ = await asyncio.wait({run, closed}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            run.cancel()  # a no-op when it is done; else the request is dropped and the kernel left to us
        if run not in done:
            if closed in done:  # close_session kills the sandbox once we return
                return self._result(out, err, "SandboxError: the session was closed while its cell ran", "crash")
            self._lose(state)
            error = f"TimeoutError: the cell ran longer than {self.timeout_s:g} s and was stopped"
            return self._result(out, err, error, "timeout", timed_out=True)
        try:
            execution = run.result()
        except _Flood:
            self._lose(state)
            error = f"OutputLimitError: the cell printed more than {self.max_stream_chars} characters and was stopped"
            return self._result(out, err, error, "output_limit", truncated=True)
        handle.cells += 1
        failure = execution.error
        if failure is None:
            return self._result(out, err, None, None)
        if failure.name in _CRASHES:
            self._lose(state)
            return self._result(
                out, err, f"InterpreterCrash: the Python interpreter crashed ({failure.name}: {failure.value})", "crash"
            )
        if failure.traceback:
            err.add(_ANSI.sub("", failure.traceback).rstrip("\n") + "\n")
        error = f"{failure.name}: {failure.value}" if failure.value else failure.name
        return self._result(out, err, error, "memory" if failure.name == "MemoryError" else None)

    def _result(
        self, out: Clip, err: Clip, error: str | None, stop_reason: StopReason | None, **fields: Any
    ) -> ExecutionResult:
        stdout, stderr, truncated = fit(out, err, self.max_output_chars)
        if error is not None:  # a message can be huge: raise ValueError("x" * 10**8)
            budget = error_budget(self.max_output_chars)
            error, cut = clip_text(error, budget).render(budget)
            truncated = truncated or cut
        truncated = fields.pop("truncated", False) or truncated
        return ExecutionResult(stdout, stderr, error, truncated=truncated, stop_reason=stop_reason, **fields)

    def _lose(self, state: _Session) -> None:
        """Drop the session's sandbox after a cell was stopped: its state is unknown, the next cell starts fresh."""
        handle, state.handle = state.handle, None
        if handle is not None:
            state.restarted = True
            self._spawn(self._close_handle(handle))

    async def _close_handle(self, handle: _Handle, gone: bool = False) -> None:
        """Kill the handle's sandbox (or remove its context), then give its slot back: only now is it gone."""
        try:
            if handle.context is None:
                await self._kill(handle.sandbox)
                return
            with contextlib.suppress(Exception):  # a context whose sandbox is gone is gone too
                await handle.sandbox.remove_code_context(handle.context)
            if gone:
                await self._forget_shared(handle.sandbox)
        finally:
            self._slots.release()

    async def _forget_shared(self, sandbox: Any) -> None:
        """After a failure in the shared sandbox: if it is gone, the next contexts go to a new one."""
        async with self._shared_lock:
            if self._shared is sandbox and not await is_running(sandbox):
                self._shared = None
                self._spawn(self._kill(sandbox))

    async def _kill(self, sandbox: Any) -> None:
        for attempt in range(self.max_retries + 1):
            try:
                await sandbox.kill(request_timeout=self.request_timeout_s)  # False when it was already gone
                self._live.pop(sandbox.sandbox_id, None)
                return
            except Exception as exc:
                if attempt == self.max_retries or classify(exc) == FATAL:
                    what = f"could not kill E2B sandbox {sandbox.sandbox_id} ({exc!r}); it ends at its lifetime timeout"
                    logger.warning("%s (%d s) or at exit", what, self.sandbox_timeout_s)
                    return
                await asyncio.sleep(self._backoff_delay(attempt))

    def _backoff_delay(self, attempt: int) -> float:
        """Exponential backoff, each delay drawn between half and all of it so that retries spread out."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return delay * (0.5 + 0.5 * self._rng.random())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resolve_options(self) -> dict[str, Any]:
        """The SDK's connection options; checked at the first cell, without any network call."""
        if not self._options:
            module = sdk()
            debug = self.debug if self.debug is not None else os.getenv("E2B_DEBUG", "false").lower() == "true"
            key = self.api_key or os.getenv("E2B_API_KEY")
            if not key and not debug:
                raise RuntimeError(
                    "E2BExecutor needs an E2B API key: set the environment variable E2B_API_KEY, or pass api_key in "
                    "the executor's init_args (keys: https://e2b.dev/dashboard?tab=keys)"
                )
            options: dict[str, Any] = {"api_key": key, "debug": debug, "request_timeout": self.request_timeout_s}
            if accepts(module.ConnectionConfig.__init__, "retries"):
                options["retries"] = 0  # one retry policy, ours: the SDK's would multiply the attempts
            self._options.update({**options, **self.sdk_options})  # in place: the finalizer holds this dict
        return self._options


class _Flood(Exception):
    """A cell printed more than ``max_stream_chars``."""
