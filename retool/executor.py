"""The executor contract: where model-written code runs.

An executor runs cells of Python in *sessions*. One trajectory owns one session for its whole life: the
variables, imports and functions of its earlier cells are there for its later ones, and no other trajectory
ever sees them. Model-written code is hostile, so an executor must hold its limits (time, memory, output)
against code that fights them, and must report every failure as an :class:`~retool.ExecutionResult` rather
than raise: a cell that crashes, hangs or floods its output is a normal outcome of a rollout, not an error
of the run.

Executors are asynchronous because many trajectories wait on cells at once while the model keeps decoding
the others; an implementation must never block the event loop (run blocking work in a thread or process).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from retool.types import CheckResult, ExecutionResult


class Executor(ABC):
    """Runs code cells in isolated, stateful sessions.

    Subclass it to add a sandbox (see the docs page "Write an executor"). The subclass's ``__init__`` arguments
    are its recipe options, documented in its docstring's ``Args:`` section.

    Contract:

    * ``execute`` never raises for anything the code does: timeouts, crashes, memory or output limits and
      exceptions in the cell are all reported in the returned :class:`~retool.ExecutionResult`.
    * A failure of the executor itself (a sandbox that cannot start, a lost connection) is reported too, as
      an error ``"SandboxError: ..."`` with ``stop_reason="crash"``, so that the run can tell it from the
      code's failures (:attr:`~retool.ExecutionResult.executor_failed`): it is logged, counted
      (``tools/executor_errors``) and, after ``rollout.max_executor_failures`` in a row, stops the run.
    * Sessions are created on first use and are independent of each other.
    * After a cell is stopped from outside (timeout, crash, limit), the session's next cell starts from a
      fresh state and its result has ``session_restarted=True``.
    * ``close_session`` frees one session's resources; ``aclose`` frees everything, and is safe to call twice.

    Optional:

    * ``stateful`` (class attribute, default ``True``): whether a session keeps its variables between cells.
      An executor that runs each cell in a fresh interpreter sets it to ``False``; the contract tests then skip
      what only holds with state.
    * ``self_check()``: report each isolation layer and attack it (``retool sandbox check`` prints the result).
    """

    stateful: ClassVar[bool] = True

    @abstractmethod
    async def execute(self, code: str, session: str) -> ExecutionResult:
        """Run ``code`` in ``session`` (created on first use) and return what happened."""

    @abstractmethod
    async def close_session(self, session: str) -> None:
        """Discard ``session`` and its state; unknown sessions are ignored."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close every session and release all resources (processes, sandboxes, connections)."""

    async def self_check(self) -> list[CheckResult]:
        """Check this executor's isolation layers on this machine: one :class:`~retool.CheckResult` per layer.

        Each active layer should be tested for real, by running hostile code against it (connect to a port the
        check opened on the host, write outside the scratch folder, a fork bomb, ...). The caller closes the
        executor afterwards. The default reports nothing (an executor without layers to check).
        """
        return []
