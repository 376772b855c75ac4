"""Failures of the executor itself, told apart from the code's: logged, counted, and a stop when they persist.

A sandbox that cannot start or a lost connection is reported as a cell result (the contract: ``execute`` never
raises), so the model is shown the error text and the run goes on. That is right for one failure and wrong for
a hundred: a run whose every cell fails for the executor's reasons trains the model on error text for hours.
"""

from __future__ import annotations

import logging

from retool.types import ExecutionResult

logger = logging.getLogger("retool.rollout")


class ExecutorFailing(RuntimeError):
    """The executor failed on ``max_executor_failures`` cells in a row: the run stops rather than go on."""


class ExecutorFailures:
    """Counts the executor's failures across the cells of every rollout, in the order the cells end.

    Each kind of failure (its error text) is logged once, with the traceback where ``execute`` raised; a cell
    the executor runs, whatever the code did, ends a streak.

    Args:
        limit: Failures in a row that stop the run (:class:`ExecutorFailing`); 0 never stops.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.kinds: dict[str, int] = {}

    def record(self, result: ExecutionResult, raised: BaseException | None = None) -> None:
        if not result.executor_failed:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        kind = (result.error or "").splitlines()[0][:300]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if self.kinds[kind] == 1:
            logger.error(
                "the executor failed on a cell: %s (each kind is logged once; tools/executor_errors counts them)",
                kind,
                exc_info=raised,
            )
        if self.limit and self.in_a_row >= self.limit:
            raise ExecutorFailing(
                f"the executor failed on {self.in_a_row} cells in a row (the last: {kind}); the run stops "
                "rather than train on error text. Check the executor (`retool sandbox check` for LocalSandbox), "
                "or raise rollout.max_executor_failures (0: never stop)"
            )
