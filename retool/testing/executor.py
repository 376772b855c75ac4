"""The executor contract as a test suite: what every :class:`~retool.Executor` must do, checked from outside.

Subclass :class:`ExecutorContract` in a test module and set ``factory`` (a zero-argument callable that returns
a fresh executor with a short timeout, about 2 s); pytest then runs every rule as a test of its own::

    class TestMyExecutor(ExecutorContract):
        factory = staticmethod(lambda: MyExecutor(timeout_s=2.0))

Or run every rule at once, from any test or script: ``executor_contract(lambda: MyExecutor(timeout_s=2.0))``
raises one ``AssertionError`` that lists each rule the executor broke. An executor whose class sets
``stateful = False`` (each cell in a fresh interpreter) is held to every rule but those about kept state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from retool.executor import Executor
from retool.types import ExecutionResult

T = TypeVar("T")
Factory = Callable[[], Executor]


class ExecutorContract:
    """The rules of the executor contract, one ``test_*`` method each (see the module docstring)."""

    factory: ClassVar[Factory]
    """Returns a fresh executor; set it with ``staticmethod`` so it is not bound to the test instance."""

    # ---- helpers --------------------------------------------------------------------------------------------

    def make(self) -> Executor:
        return type(self).factory()

    def drive(self, body: Callable[[Executor], Awaitable[T]]) -> T:
        """Run ``body(executor)`` on a fresh event loop with a fresh executor, then close it."""

        async def main() -> T:
            executor = self.make()
            try:
                return await body(executor)
            finally:
                await executor.aclose()

        return asyncio.run(main())

    def cells(self, *codes: str, session: str = "s") -> list[ExecutionResult]:
        """Run ``codes`` one after another in one session of a fresh executor."""

        async def body(executor: Executor) -> list[ExecutionResult]:
            return [await executor.execute(code, session) for code in codes]

        return self.drive(body)

    def stateful(self) -> bool:
        executor = self.make()
        try:
            return bool(getattr(executor, "stateful", True))
        finally:
            asyncio.run(executor.aclose())

    # ---- the rules --------------------------------------------------------------------------------------------

    def test_print_goes_to_stdout_and_state_persists(self) -> None:
        assign, shown = self.cells("x = 6 * 7\nprint('assigned')", "print(x)")
        assert assign.ok and assign.stdout == "assigned\n" and assign.wall_s > 0, assign
        if self.stateful():
            assert shown.ok and shown.stdout == "42\n", shown
        else:
            assert shown.error == "NameError: name 'x' is not defined", shown

    def test_sessions_do_not_see_each_other(self) -> None:
        async def body(executor: Executor) -> ExecutionResult:
            await executor.execute("secret = 'a'", "a")
            return await executor.execute("print(secret)", "b")

        result = self.drive(body)
        assert result.error == "NameError: name 'secret' is not defined", result

    def test_an_exception_is_reported_by_its_last_line(self) -> None:
        failed, after = self.cells("print('before')\n1 / 0", "print('after')")
        assert failed.error == "ZeroDivisionError: division by zero", failed
        assert failed.stdout == "before\n" and failed.stop_reason is None and not failed.timed_out, failed
        assert not failed.ok
        assert after.ok and after.stdout == "after\n" and not after.session_restarted, after

    def test_stderr_is_kept_apart_from_stdout(self) -> None:
        (result,) = self.cells("import sys\nsys.stderr.write('to stderr\\n')\nprint('to stdout')")
        assert result.ok and result.stdout == "to stdout\n" and "to stderr" in result.stderr, result

    def test_a_timeout_stops_the_cell_and_the_session_restarts(self) -> None:
        started = time.monotonic()
        _, stopped, after = self.cells("x = 1", "while True:\n    pass", "print('x' in globals())")
        assert stopped.timed_out and stopped.stop_reason == "timeout" and stopped.error is not None, stopped
        assert 1.0 <= stopped.wall_s < 10 and time.monotonic() - started < 20, stopped
        assert after.ok and after.stdout == "False\n", after
        if self.stateful():
            assert after.session_restarted, after  # its state was lost, and the result says so

    def test_a_huge_print_is_truncated(self) -> None:
        (result,) = self.cells("print('x' * 10**6)\nprint('end')")
        assert result.ok and result.truncated, result
        assert result.stdout.startswith("xxx") and len(result.stdout) < 10**5, len(result.stdout)

    def test_close_session_then_reuse_starts_fresh(self) -> None:
        async def body(executor: Executor) -> ExecutionResult:
            await executor.execute("x = 1", "a")
            await executor.close_session("a")
            await executor.close_session("never-used")  # unknown sessions are ignored
            return await executor.execute("print('x' in globals())", "a")

        reused = self.drive(body)
        assert reused.ok and reused.stdout == "False\n", reused

    def test_aclose_twice_is_safe(self) -> None:
        async def body() -> ExecutionResult:
            executor = self.make()
            result = await executor.execute("print('once')", "a")
            await executor.aclose()
            await executor.aclose()
            return result

        assert asyncio.run(body()).stdout == "once\n"

    def test_concurrent_sessions_run_side_by_side(self) -> None:
        n, nap = 6, 0.5

        async def body(executor: Executor) -> tuple[list[ExecutionResult], float]:
            await asyncio.gather(*(executor.execute("pass", f"s{i}") for i in range(n)))  # sessions up first
            started = time.monotonic()
            code = "import time\ntime.sleep({nap})\nprint({i})"
            results = await asyncio.gather(*(executor.execute(code.format(nap=nap, i=i), f"s{i}") for i in range(n)))
            return list(results), time.monotonic() - started

        results, elapsed = self.drive(body)
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(n)], results
        assert elapsed < n * nap / 2, f"{n} cells of {nap} s took {elapsed:.2f} s: they ran one after another"

    def test_unicode_output_round_trips(self) -> None:
        (result,) = self.cells("print('h\\u00e9llo \\u2713 \\U0001f600 \\u05e9\\u05dc\\u05d5\\u05dd')")
        assert result.ok and result.stdout == "héllo ✓ 😀 שלום\n", result

    def test_a_syntax_error_is_an_error_not_a_crash(self) -> None:
        (result,) = self.cells("def broken(:\n    pass")
        assert result.error is not None and result.error.startswith("SyntaxError"), result
        assert result.stop_reason is None and not result.timed_out, result

    def test_a_dead_interpreter_is_reported_not_raised(self) -> None:
        crashed, after = self.cells("import os\nos._exit(3)", "print('alive')")
        assert not crashed.ok and crashed.error is not None, crashed
        assert after.ok and after.stdout == "alive\n", after


def executor_contract(factory: Factory) -> None:
    """Check every rule of :class:`ExecutorContract` against executors made by ``factory``.

    Raises:
        AssertionError: listing each rule that failed and why.
    """
    suite = type("ExecutorUnderTest", (ExecutorContract,), {"factory": staticmethod(factory)})
    run_rules(suite())


def run_rules(suite: Any) -> None:
    """Run every ``test_*`` method of ``suite``; raise one ``AssertionError`` that lists the failures."""
    failures = []
    for name in sorted(n for n in dir(suite) if n.startswith("test_")):
        try:
            getattr(suite, name)()
        except Exception as exc:  # an AssertionError, or anything the plugin raised
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    if failures:
        raise AssertionError(f"{len(failures)} contract rule(s) broken:\n" + "\n".join(failures))
