"""LocalSandbox: each session is a persistent, confined Python worker forked from a warm zygote on this machine.

How it works: on first use the sandbox starts one *zygote* process (``sys.executable``, never the trainer
forked) that imports the preloaded modules once. Each session's worker is forked from it in a few
milliseconds, already warm, and confines itself before it runs a cell (see ``_isolation.py`` for the layers:
network, PID, mount, IPC and UTS namespaces, a file system view that holds only the interpreter, a uid of its
own, rlimits, seccomp; and the sandbox's cgroups over all sessions together). Cells and replies cross a
private socket as length-prefixed JSON, never pickle.

How it holds its limits against hostile code:

* time: the parent measures wall-clock time and SIGKILLs the session's PID-namespace init, which makes the
  kernel kill every process the cell started (or, without that namespace, the worker's process tree), so
  nothing inside has to cooperate (ignored signals, one long C call and busy loops are all stopped);
* memory: ``RLIMIT_AS`` in the worker, so a large allocation fails with ``MemoryError``; the sandbox's memory
  cgroup caps all sessions together, so the trainer is never the one the OOM killer picks;
* processes: ``RLIMIT_NPROC`` on the session's own uid (a fork bomb stops at ``max_processes``);
* output: the worker keeps only the head and a rolling tail of what a cell prints, and the parent never reads
  more than one bounded reply.

A layer the machine does not support (not Linux, not root, a container that forbids namespaces) is skipped
with one loud warning listing what is missing; ``strict=True`` refuses to run instead. ``retool sandbox
check`` shows the layers and attacks each one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from retool.executor import Executor
from retool.types import CheckResult, ExecutionResult
from retool_plugins.executors.local._cgroups import Cgroups, make_cgroups
from retool_plugins.executors.local._host import Zygote, ZygoteLost
from retool_plugins.executors.local._pool import Pool, Worker, WorkerLost, describe, finalize, spawn_task, worker_env

logger = logging.getLogger("retool_plugins.executors.local")

DEFAULT_PRELOAD = ["math", "fractions", "itertools", "numpy", "sympy"]
_FSIZE_BYTES = 64 * 1024 * 1024  # largest file a cell may write
_NOFILE = 256  # open files per worker


class SandboxUnavailable(RuntimeError):
    """``strict=True`` and an isolation layer is not available on this machine; the message lists them."""


@dataclass(eq=False)
class _Session:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    worker: Worker | None = None
    restarted: bool = False  # state was lost; the next cell's result says so


class LocalSandbox(Executor):
    """Runs each session's cells in its own persistent, confined Python process on this machine.

    Variables, imports and functions persist between the cells of a session, as in a notebook, and a bare
    expression on a cell's last line shows its value. Workers are forked from a warm zygote that runs this
    interpreter (``sys.executable``) and has imported ``preload``, so a session starts in milliseconds. Each
    worker has no network but its own loopback, sees of the host only what the interpreter needs (``/usr``,
    the interpreter's prefixes and packages, a minimal ``/etc``; read-only: no dataset, recipe or home folder
    is there to read), writes only to a private tmpfs at ``/tmp`` (its working and home folder), runs as a uid
    of its own in PID, mount, network, IPC and UTS namespaces of its own under a seccomp filter, with rlimits
    it cannot raise, and an environment holding nothing of the trainer's. A cell that runs too long or crashes
    the interpreter kills only its session; the next cell starts a fresh worker and reports
    ``session_restarted``.

    Args:
        timeout_s: Wall-clock limit of one cell, in seconds; the session's processes are killed when it is
            exceeded. Each worker also has ``max(60, 10 * timeout_s)`` s of CPU time in all (``RLIMIT_CPU``).
        memory_mb: Memory one worker process may allocate beyond the preloaded interpreter, in MiB
            (``RLIMIT_AS``), or ``None`` for no limit. A larger allocation raises ``MemoryError`` in the cell
            (``stop_reason="memory"``).
        max_output_chars: Characters of stdout and stderr kept per cell, together; longer output keeps its
            head and tail with a marker in between (``truncated=True``).
        preload: Modules the zygote imports once, bound in every session's namespace, so that cells do not pay
            for slow imports. Defaults to ``["math", "fractions", "itertools", "numpy", "sympy"]``, skipping
            any that is not installed; a module named here that fails to import is warned about.
        max_processes: Processes and threads one session may have at once (``RLIMIT_NPROC`` on its own uid).
        scratch_mb: Size of the session's private tmpfs at ``/tmp``, in MiB (and of its ``/dev/shm``).
        total_memory_mb: Memory of all sessions together (the sandbox's memory cgroup), in MiB; ``None`` is
            half of this machine's RAM. The kernel's OOM killer then picks a worker, never the trainer.
        isolation: ``False`` turns the namespaces, the separate uid, seccomp and the cgroups off (limits,
            timeouts and the scrubbed environment stay), e.g. to debug a cell with host tools.
        strict: Refuse to start (raise :class:`SandboxUnavailable` naming them) unless every isolation layer is
            available; without it, missing layers are skipped with one loud warning.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int | None = 1024,
        max_output_chars: int = 2000,
        preload: list[str] | None = None,
        max_processes: int = 64,
        scratch_mb: int = 64,
        total_memory_mb: int | None = None,
        isolation: bool = True,
        strict: bool = False,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if memory_mb is not None and memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, or None for no limit; got {memory_mb!r}")
        if max_output_chars < 0:
            raise ValueError(f"max_output_chars must be >= 0, got {max_output_chars!r}")
        if max_processes < 1:
            raise ValueError(f"max_processes must be at least 1, got {max_processes!r}")
        if scratch_mb < 1:
            raise ValueError(f"scratch_mb must be at least 1, got {scratch_mb!r}")
        if total_memory_mb is not None and total_memory_mb <= 0:
            raise ValueError(f"total_memory_mb must be positive, or None for half the RAM; got {total_memory_mb!r}")
        if strict and not isolation:
            raise ValueError("strict=True requires isolation=True: strict refuses to run without every layer")
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self.max_output_chars = max_output_chars
        self.preload = list(preload) if preload is not None else list(DEFAULT_PRELOAD)
        self._preload_optional = preload is None  # missing default modules are skipped silently
        self.max_processes = max_processes
        self.scratch_mb = scratch_mb
        self.total_memory_mb = total_memory_mb
        self.isolation = isolation
        self.strict = strict
        if strict:
            missing = missing_layers()
            if missing:
                raise SandboxUnavailable(
                    "LocalSandbox(strict=True) refuses to start: these isolation layers are not available here: "
                    + "; ".join(f"{name} ({why})" for name, why in missing.items())
                    + ". Run `retool sandbox check` for details, or drop strict=True to run with what there is."
                )
        self._sessions: dict[str, _Session] = {}
        self._refused: str | None = None  # why strict refuses every cell (a layer went missing after the probe)
        self._warned: set[str] = set()
        self._oom_seen = 0
        memory = total_memory_mb * 2**20 if total_memory_mb else _half_the_ram()
        self._pool = Pool(max_output_chars, self._zygote_config, memory, isolation, self._on_zygote)
        self._finalizer = weakref.finalize(self, finalize, self._pool.live)

    # ---- the Executor contract ------------------------------------------------------------------------

    async def execute(self, code: str, session: str) -> ExecutionResult:
        """Run ``code`` in ``session``'s worker (started on first use) and report what happened.

        ``wall_s`` includes the start of the worker when the cell needs one (a few milliseconds; the first
        session also waits for the zygote's preloads, about a second with numpy and sympy).
        """
        return await self._execute(code, session, self.timeout_s)

    async def close_session(self, session: str) -> None:
        """Kill ``session``'s processes (even mid-cell) and drop its state; unknown names are ignored."""
        state = self._sessions.pop(session, None)
        if state is None:
            return
        if state.worker is not None:
            self._pool.kill(state.worker)  # a running cell ends now instead of at its timeout
        async with state.lock:
            await self._discard(state)

    async def aclose(self) -> None:
        """Close every session and stop the zygote; safe to call twice. The sandbox may be used again after."""
        await asyncio.gather(*(self.close_session(name) for name in list(self._sessions)))
        await self._pool.close()

    async def self_check(self) -> list[CheckResult]:
        """Report each isolation layer and attack it from a cell (see ``retool sandbox check``)."""
        from retool_plugins.executors.local._checks import run_checks

        return await run_checks(self)

    async def layers(self) -> dict[str, tuple[bool, str]]:
        """``{layer: (active, detail)}`` as the zygote found them on this machine (starts the zygote)."""
        self._ensure_loop()
        return (await self._pool.zygote()).layers

    # ---- running a cell -----------------------------------------------------------------------------------

    async def _execute(self, code: str, session: str, timeout_s: float) -> ExecutionResult:
        self._ensure_loop()
        if self._refused is not None:
            return ExecutionResult(error=self._refused, stop_reason="crash")
        state = self._sessions.setdefault(session, _Session())
        async with state.lock:  # one session's cells run one after another
            start = time.monotonic()
            try:
                result = await self._execute_locked(state, code, timeout_s)
            except asyncio.CancelledError:
                # The caller gave up on the cell: stop it now, it must not keep running unobserved.
                worker, state.worker = state.worker, None
                if worker is not None:
                    state.restarted = True
                    self._pool.kill(worker)
                    spawn_task(self._pool.release(worker))
                raise
            except Exception as exc:  # a bug or an OS limit here must not take the trainer down
                logger.exception("LocalSandbox failed to run a cell")
                await self._discard(state)
                state.restarted = True
                result = ExecutionResult(error=f"SandboxError: {exc}", stop_reason="crash")
            return replace(result, wall_s=time.monotonic() - start)

    async def _execute_locked(self, state: _Session, code: str, timeout_s: float) -> ExecutionResult:
        restarted = state.restarted
        if state.worker is not None and state.worker.gone():
            await self._discard(state)  # it died between cells (e.g. a thread the cell started called os._exit)
            state.restarted = restarted = True
        if state.worker is None:
            try:
                state.worker = await self._pool.start()
            except WorkerLost as exc:
                error = self._refused or str(exc)
                return ExecutionResult(error=error, stop_reason="crash", session_restarted=restarted)
        state.restarted = False
        worker = state.worker
        worker.seq += 1
        self._pool.send(worker, {"seq": worker.seq, "code": code})
        try:
            reply = await asyncio.wait_for(self._pool.recv(worker), timeout_s)
            if reply.get("seq") != worker.seq:
                raise WorkerLost("sent a reply out of turn", closed=False)
        except asyncio.TimeoutError:
            error = f"TimeoutError: the cell ran longer than {timeout_s:g} s and was stopped"
            return await self._stopped(state, restarted, error, timed_out=True, stop_reason="timeout")
        except WorkerLost as exc:
            status = await self._pool.exit_status(worker) if exc.closed else None
            error, reason = self._explain_death(status, exc)
            return await self._stopped(state, restarted, error, stop_reason=reason)
        return ExecutionResult(
            stdout=reply["stdout"] if isinstance(reply.get("stdout"), str) else "",
            stderr=reply["stderr"] if isinstance(reply.get("stderr"), str) else "",
            error=reply["error"] if isinstance(reply.get("error"), str) else None,
            truncated=bool(reply.get("truncated")),
            stop_reason="memory" if reply.get("memory") else None,
            session_restarted=restarted,
        )

    def _explain_death(self, status: int | None, exc: Exception) -> tuple[str, Any]:
        """The error line and stop reason of a worker that died on its own (``status`` is its wait status)."""
        if status is None:
            return f"InterpreterCrash: the Python interpreter crashed ({exc})", "crash"
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
            cpu = self._cpu_seconds()
            return f"TimeoutError: the session used up its {cpu} s of CPU time and was stopped", "timeout"
        cgroups = self._pool.live.cgroups
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and cgroups is not None:
            kills = cgroups.oom_kills()
            if kills > self._oom_seen:
                self._oom_seen = kills
                return "MemoryError: the sandbox ran out of memory and the kernel killed the worker", "memory"
        return f"InterpreterCrash: the Python interpreter crashed ({describe(status)})", "crash"

    async def _stopped(self, state: _Session, restarted: bool, error: str, **fields: Any) -> ExecutionResult:
        """End a cell stopped from outside: kill its worker, keep what it printed, restart the session next time."""
        assert state.worker is not None
        self._pool.kill(state.worker)  # first, so that its output no longer changes while we read it
        stdout, stderr, truncated = self._pool.partial_output(state.worker)
        await self._discard(state)
        state.restarted = True
        error += "; the session's variables were lost"
        return ExecutionResult(stdout, stderr, error, truncated=truncated, session_restarted=restarted, **fields)

    async def _discard(self, state: _Session) -> None:
        worker, state.worker = state.worker, None
        if worker is not None:
            self._pool.kill(worker)
            await self._pool.release(worker)

    # ---- the zygote ---------------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        """Sessions, locks and the zygote belong to one event loop; a call from another starts afresh."""
        if self._pool.loop_changed():
            finalize(self._pool.live)  # kills every process tied to the other (possibly closed) loop
            self._sessions = {}

    def _zygote_config(self, cgroups: Cgroups) -> dict[str, Any]:
        return {
            "isolation": self.isolation,
            "cgroups": cgroups.procs,
            "cgroups_detail": cgroups.detail,
            "preload": self.preload,
            "preload_optional": self._preload_optional,
            "scratch_mb": self.scratch_mb,
            "limits": {
                "as": None if self.memory_mb is None else self.memory_mb * 2**20,
                "cpu": self._cpu_seconds(),
                "fsize": _FSIZE_BYTES,
                "nofile": _NOFILE,
                "nproc": self.max_processes,
                "core": 0,
            },
            "max_output_chars": self.max_output_chars,
        }

    def _on_zygote(self, zygote: Zygote) -> None:
        """Refuse (strict) or warn, loudly and once, about missing layers; pass on the zygote's warnings."""
        missing = {name: why for name, (active, why) in zygote.layers.items() if not active}
        listed = "; ".join(f"{name} ({why})" for name, why in missing.items())
        if missing and self.strict:
            # The constructor's probe passed but the zygote found less: refuse every cell from now on, at once
            # (no zygote restart per cell), with the reason in each result.
            self._refused = f"SandboxUnavailable: strict=True and these isolation layers are missing: {listed}"
            logger.error("LocalSandbox: %s; every cell is refused", self._refused)
            raise ZygoteLost(self._refused)
        if missing and "layers" not in self._warned:
            self._warned.add("layers")
            logger.warning(
                "LocalSandbox: ISOLATION IS INCOMPLETE on this machine; model-written code runs WITHOUT these "
                "layers: %s. Run `retool sandbox check` for details.",
                listed,
            )
        for warning in zygote.warnings:
            if warning not in self._warned:  # once per executor, not once per session
                self._warned.add(warning)
                logger.warning("LocalSandbox: %s", warning)

    def _cpu_seconds(self) -> int:
        return int(max(60, 10 * self.timeout_s))


def missing_layers() -> dict[str, str]:
    """The isolation layers this machine lacks, ``{layer: why}``, found by probing in a fresh interpreter."""
    command = [sys.executable, "-I", "-m", "retool_plugins.executors.local._isolation"]
    try:
        done = subprocess.run(command, capture_output=True, timeout=60, check=True, env=worker_env(), cwd="/")
        found = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"all": f"the probe failed: {exc}"}
    missing = {name: str(why) for name, (active, why) in found.items() if not active}
    cgroups = make_cgroups(2**30, enabled=True)
    if cgroups.folders:
        cgroups.remove()
    else:
        missing["cgroups"] = cgroups.detail
    return missing


def _half_the_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
