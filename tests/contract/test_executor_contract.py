"""The Executor contract, checked against every executor (see ``conftest.py``: one run per factory).

Each test builds a fresh executor with its factory (timeouts of about 2 s), drives it with ``asyncio.run`` and
closes it. What only holds for an executor that keeps state between cells is marked with a ``stateful``
check, so a stateless executor (the tutorial's) is held to everything else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from retool import ExecutionResult, Executor

T = TypeVar("T")
Factory = Callable[[], Executor]


def drive(make_executor: Factory, body: Callable[[Executor], Awaitable[T]]) -> T:
    """Run ``body(executor)`` on a fresh event loop, then close the executor."""

    async def main() -> T:
        executor = make_executor()
        try:
            return await body(executor)
        finally:
            await executor.aclose()

    return asyncio.run(main())


def cells(make_executor: Factory, *codes: str, session: str = "s") -> list[ExecutionResult]:
    async def body(executor: Executor) -> list[ExecutionResult]:
        return [await executor.execute(code, session) for code in codes]

    return drive(make_executor, body)


def stateful(make_executor: Factory) -> bool:
    return bool(getattr(make_executor(), "stateful", True))


def test_print_goes_to_stdout_and_state_persists(make_executor: Factory) -> None:
    assign, shown = cells(make_executor, "x = 6 * 7\nprint('assigned')", "print(x)")
    assert assign.ok and assign.stdout == "assigned\n" and assign.wall_s > 0
    if stateful(make_executor):
        assert shown.ok and shown.stdout == "42\n"
    else:
        assert shown.error == "NameError: name 'x' is not defined"


def test_sessions_do_not_see_each_other(make_executor: Factory) -> None:
    async def body(executor: Executor) -> ExecutionResult:
        await executor.execute("secret = 'a'", "a")
        return await executor.execute("print(secret)", "b")

    assert drive(make_executor, body).error == "NameError: name 'secret' is not defined"


def test_an_exception_is_reported_by_its_last_line(make_executor: Factory) -> None:
    failed, after = cells(make_executor, "print('before')\n1 / 0", "print('after')")
    assert failed.error == "ZeroDivisionError: division by zero"
    assert failed.stdout == "before\n" and failed.stop_reason is None and not failed.timed_out and not failed.ok
    assert after.ok and after.stdout == "after\n" and not after.session_restarted


def test_stderr_is_kept_apart_from_stdout(make_executor: Factory) -> None:
    (result,) = cells(make_executor, "import sys\nsys.stderr.write('to stderr\\n')\nprint('to stdout')")
    assert result.ok and result.stdout == "to stdout\n" and "to stderr" in result.stderr


def test_a_timeout_stops_the_cell_and_the_session_restarts(make_executor: Factory) -> None:
    started = time.monotonic()
    _, stopped, after = cells(make_executor, "x = 1", "while True:\n    pass", "print('x' in globals())")
    assert stopped.timed_out and stopped.stop_reason == "timeout" and stopped.error is not None
    assert 1.0 <= stopped.wall_s < 10 and time.monotonic() - started < 20
    assert after.ok and after.stdout == "False\n"
    if stateful(make_executor):
        assert after.session_restarted  # its state was lost, and the result says so


def test_a_huge_print_is_truncated(make_executor: Factory) -> None:
    (result,) = cells(make_executor, "print('x' * 10**6)\nprint('end')")
    assert result.ok and result.truncated
    assert result.stdout.startswith("xxx") and len(result.stdout) < 10**5


def test_close_session_then_reuse_starts_fresh(make_executor: Factory) -> None:
    async def body(executor: Executor) -> ExecutionResult:
        await executor.execute("x = 1", "a")
        await executor.close_session("a")
        await executor.close_session("never-used")  # unknown sessions are ignored
        return await executor.execute("print('x' in globals())", "a")

    reused = drive(make_executor, body)
    assert reused.ok and reused.stdout == "False\n"


def test_aclose_twice_is_safe(make_executor: Factory) -> None:
    async def body() -> ExecutionResult:
        executor = make_executor()
        result = await executor.execute("print('once')", "a")
        await executor.aclose()
        await executor.aclose()
        return result

    assert asyncio.run(body()).stdout == "once\n"


def test_concurrent_sessions_run_side_by_side(make_executor: Factory) -> None:
    n, nap = 6, 0.5

    async def body(executor: Executor) -> tuple[list[ExecutionResult], float]:
        await asyncio.gather(*(executor.execute("pass", f"s{i}") for i in range(n)))  # sessions up first
        started = time.monotonic()
        code = "import time\ntime.sleep({nap})\nprint({i})"
        results = await asyncio.gather(*(executor.execute(code.format(nap=nap, i=i), f"s{i}") for i in range(n)))
        return list(results), time.monotonic() - started

    results, elapsed = drive(make_executor, body)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(n)]
    assert elapsed < n * nap / 2  # not one after another


def test_unicode_output_round_trips(make_executor: Factory) -> None:
    (result,) = cells(make_executor, "print('h\\u00e9llo \\u2713 \\U0001f600 \\u05e9\\u05dc\\u05d5\\u05dd')")
    assert result.ok and result.stdout == "héllo ✓ 😀 שלום\n"


def test_a_syntax_error_is_an_error_not_a_crash(make_executor: Factory) -> None:
    (result,) = cells(make_executor, "def broken(:\n    pass")
    assert result.error is not None and result.error.startswith("SyntaxError")
    assert result.stop_reason is None and not result.timed_out


def test_a_dead_interpreter_is_reported_not_raised(make_executor: Factory) -> None:
    crashed, after = cells(make_executor, "import os\nos._exit(3)", "print('alive')")
    assert not crashed.ok and crashed.error is not None
    assert after.ok and after.stdout == "alive\n"
