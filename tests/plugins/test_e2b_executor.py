"""E2BExecutor through the real E2B SDK, against a local fake of E2B's HTTP API (tests/fakes/fake_e2b_server.py).

The fake speaks the control plane (create, kill) and the code-interpreter protocol (NDJSON ``/execute``,
contexts) on an ephemeral 127.0.0.1 port; the SDK is pointed at it with its ``api_url`` and ``sandbox_url``
options, so every request, retry and parse goes through the SDK's own code. Nothing leaves this machine.
"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from retool.types import ExecutionResult
from retool_plugins.executors.e2b import E2BExecutor

pytest.importorskip("e2b_code_interpreter")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from fake_e2b_server import FakeE2BServer

T = TypeVar("T")
LIVE_KEY = os.environ.get("E2B_API_KEY")  # read before the fixtures clear it


@pytest.fixture(scope="module")
def server() -> Any:
    fake = FakeE2BServer()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def fresh(server: FakeE2BServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("E2B_API_KEY", "E2B_DEBUG", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    server.reset()


def make(server: FakeE2BServer, **options: Any) -> E2BExecutor:
    """An executor wired to the fake, with test-sized timeouts and backoff."""
    defaults: dict[str, Any] = {
        "api_key": "test-key",
        "timeout_s": 2.0,
        "start_jitter_s": 0.0,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.1,
        "sdk_options": {"api_url": server.url, "sandbox_url": server.url},
    }
    return E2BExecutor(**{**defaults, **options})


def run_with(server: FakeE2BServer, body: Callable[[E2BExecutor], Awaitable[T]], **options: Any) -> T:
    """Run ``body(executor)`` on a fresh event loop and close the executor afterwards."""

    async def main() -> T:
        executor = make(server, **options)
        try:
            return await body(executor)
        finally:
            await executor.aclose()

    return asyncio.run(main())


def cells(server: FakeE2BServer, *codes: str, session: str = "s", **options: Any) -> list[ExecutionResult]:
    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        return [await executor.execute(code, session) for code in codes]

    return run_with(server, body, **options)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- running cells --------------------------------------------------------------------------------------------


def test_runs_cells_in_a_sandbox_made_as_configured(server):
    first, second = cells(server, "x = 6\nprint('hi')\nx * 7", "'a' + 'b'", template="my-template")
    assert first.ok and first.stdout == "hi\n42\n"  # the last expression's result is appended as text
    assert second.stdout == "'ab'\n" and not second.session_restarted
    (create,) = server.bodies("create")
    assert create["templateID"] == "my-template" and create["timeout"] == 600
    assert create["allow_internet_access"] is False  # internet is off unless asked for
    (headers,) = server.headers("create")
    assert headers["x-api-key"] == "test-key"
    assert server.killed == server.created and not server.live  # aclose killed it


def test_state_persists_within_a_session_and_sessions_are_isolated(server):
    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        await executor.execute("secret = 42", "a")
        return [await executor.execute("print(secret)", name) for name in ("b", "a")]

    seen_by_b, seen_by_a = run_with(server, body)
    assert seen_by_b.error == "NameError: name 'secret' is not defined"
    assert seen_by_a.stdout == "42\n"
    assert len(server.created) == 2  # one sandbox per session


def test_errors_map_to_their_last_traceback_line(server):
    failed, syntax, exited, after = cells(
        server, "x = 5\nprint('before')\nundefined_name", "x = (1,", "import sys\nsys.exit(2)", "print(x)"
    )
    assert failed.error == "NameError: name 'undefined_name' is not defined"
    assert failed.stdout == "before\n" and failed.stop_reason is None and not failed.ok
    assert "Traceback" in failed.stderr and failed.stderr.rstrip().endswith(failed.error)
    assert syntax.error is not None and syntax.error.startswith("SyntaxError")
    assert exited.error == "SystemExit: 2" and exited.stop_reason is None
    assert after.stdout == "5\n" and not after.session_restarted  # errors keep the session


def test_memory_error_and_interpreter_crash(server):
    bomb, kept, crashed, after = cells(
        server, "x = 1\nbig = bytearray(4 * 1024**3)", "print(x)", "import os\nprint('bye')\nos._exit(3)", "print(x)"
    )
    assert bomb.stop_reason == "memory" and bomb.error is not None and bomb.error.startswith("MemoryError")
    assert kept.stdout == "1\n" and not kept.session_restarted
    assert crashed.stop_reason == "crash" and "crashed" in (crashed.error or "")
    assert after.session_restarted and after.error == "NameError: name 'x' is not defined"


def test_output_is_cut_keeping_head_and_tail(server):
    code = "print('HEAD')\nfor i in range(10**5):\n    print('abcdefghi')\nprint('TAIL')"
    flood, huge_error = cells(server, code, "raise ValueError('v' * 10**6)", max_output_chars=300)
    assert flood.ok and flood.truncated
    assert flood.stdout.startswith("HEAD\nabcdefghi\n") and flood.stdout.endswith("abcdefghi\nTAIL\n")
    assert "chars cut]" in flood.stdout and len(flood.stdout) <= 300 + 40
    assert huge_error.error is not None and huge_error.error.startswith("ValueError: vvv")
    assert len(huge_error.error) < 400 and huge_error.truncated


def test_a_print_loop_is_stopped_at_the_stream_limit(server):
    started = time.monotonic()
    flood, after = cells(
        server, "x = 1\nwhile True:\n    print('y' * 1000)", "print(x)", max_stream_chars=200_000, timeout_s=10.0
    )
    assert time.monotonic() - started < 5  # stopped by the limit, not the timeout
    assert flood.stop_reason == "output_limit" and flood.truncated and flood.stdout.startswith("yyy")
    assert after.session_restarted and after.error is not None


# -- timeouts, cancellation, closing --------------------------------------------------------------------------


def test_timeout_stops_the_cell_and_the_next_cell_gets_a_fresh_sandbox(server):
    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        results = [await executor.execute(code, "s") for code in ("x = 1", "print('p')\nimport time\ntime.sleep(30)")]
        first = server.created[0]
        await until(lambda: first in server.killed)  # a cell past its timeout loses its sandbox
        results.append(await executor.execute("print(x)", "s"))
        results.append(await executor.execute("print('again')", "s"))
        return results

    _, timed_out, after, later = run_with(server, body, timeout_s=1.0)
    assert timed_out.timed_out and timed_out.stop_reason == "timeout" and "1 s" in (timed_out.error or "")
    assert timed_out.stdout == "p\n"  # what it printed before the timeout is kept
    assert 1.0 <= timed_out.wall_s < 1.8
    assert after.session_restarted and after.error == "NameError: name 'x' is not defined"
    assert later.ok and not later.session_restarted
    assert len(server.created) == 2


def test_close_session_stops_a_running_cell_and_kills_its_sandbox(server):
    async def body(executor: E2BExecutor) -> tuple[ExecutionResult, float]:
        await executor.execute("pass", "a")
        task = asyncio.ensure_future(executor.execute("while True: pass", "a"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await executor.close_session("a")
        assert server.killed == server.created  # close_session returns once the sandbox is gone
        await executor.close_session("a")  # unknown by now: ignored
        return await task, time.monotonic() - started

    result, elapsed = run_with(server, body, timeout_s=10.0)
    assert result.stop_reason == "crash" and elapsed < 1.5


def test_cancelling_execute_stops_the_cell(server):
    async def body(executor: E2BExecutor) -> ExecutionResult:
        await executor.execute("x = 1", "a")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(executor.execute("while True: pass", "a"), 0.3)
        return await executor.execute("print('x' in globals())", "a")

    after = run_with(server, body, timeout_s=10.0)
    assert after.session_restarted and after.stdout == "False\n"


def test_aclose_kills_every_sandbox(server):
    async def body(executor: E2BExecutor) -> None:
        await asyncio.gather(*(executor.execute("print(1)", name) for name in "abc"))
        await executor.execute("while True: pass", "d")  # times out
        assert len(server.live) >= 3
        await executor.aclose()
        await executor.aclose()  # twice is fine

    run_with(server, body, timeout_s=0.5)
    assert len(server.created) == 4 and sorted(server.killed) == sorted(server.created) and not server.live


def test_sandboxes_left_open_are_killed_at_interpreter_exit(server):
    script = textwrap.dedent(
        f"""
        import asyncio
        from retool_plugins.executors.e2b import E2BExecutor

        executor = E2BExecutor(api_key="k", start_jitter_s=0, sdk_options={{"api_url": "{server.url}",
                               "sandbox_url": "{server.url}"}})
        print(asyncio.run(executor.execute("print('hi')", "a")).stdout, end="")
        """
    )  # no aclose: the executor is still alive when the interpreter exits
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\n"
    assert len(server.created) == 1 and server.killed == server.created


# -- retries --------------------------------------------------------------------------------------------------


def test_retries_after_429_keep_the_sandbox(server):
    async def body(executor: E2BExecutor) -> tuple[ExecutionResult, float]:
        await executor.execute("x = 1", "s")
        server.inject("execute", 429, 503, 500)
        started = time.monotonic()
        return await executor.execute("print(x)", "s"), time.monotonic() - started

    result, elapsed = run_with(server, body, backoff_base_s=0.05, backoff_max_s=1.0)
    assert result.ok and result.stdout == "1\n" and not result.session_restarted
    assert server.count("execute") == 5  # the first cell, three failures, the success
    assert elapsed >= 0.025 + 0.05 + 0.1  # backoff doubled each time; a delay is at least half its nominal value
    assert len(server.created) == 1


@pytest.mark.parametrize("fault", ["drop", "drop_mid", "502"])
def test_a_dropped_cell_is_rerun_in_a_fresh_sandbox(server, fault):
    async def body(executor: E2BExecutor) -> ExecutionResult:
        await executor.execute("x = 1", "s")
        server.inject("execute", fault)
        return await executor.execute("print(x)", "s")

    result = run_with(server, body)
    assert server.count("execute") == 3
    assert len(server.created) == 2 and server.created[0] in server.killed  # the sandbox of unknown state is gone
    assert result.session_restarted and result.error == "NameError: name 'x' is not defined"  # and says so


def test_a_dropped_first_cell_is_rerun_without_reporting_a_restart(server):
    server.inject("execute", "drop_mid")
    (result,) = cells(server, "print('ok')")
    assert result.ok and result.stdout == "ok\n" and not result.session_restarted  # nothing earlier was lost


def test_sandbox_creation_is_retried_and_makes_one_sandbox(server):
    server.inject("create", 429, 503, "drop_after", "drop")  # drop_after: created, but the answer is lost
    (result,) = cells(server, "print('ok')", max_retries=4)
    assert result.ok
    assert server.count("create") == 5
    assert len(server.created) == 1  # the retries reuse an idempotency key: the lost sandbox is the one used
    assert len({h["idempotency-key"] for h in server.headers("create")}) == 1


def test_a_sandbox_creation_that_stalls_is_abandoned_and_retried(server):
    # The first create answers after 1.5 s, past the request timeout: the executor gives up on it, retries
    # with the same idempotency key, and the run goes on with one sandbox, killed at the end.
    server.inject("create", "slow:1.5")
    started = time.monotonic()
    (result,) = cells(server, "print('ok')", request_timeout_s=0.3, max_retries=3)
    assert result.ok and result.stdout == "ok\n" and not result.session_restarted
    assert time.monotonic() - started < 1.5 + 2.0
    assert server.count("create") >= 2
    assert len({h["idempotency-key"] for h in server.headers("create")}) == 1
    time.sleep(1.6)  # the stalled request finishes on the server's side
    assert server.live == []  # whatever it made is the one sandbox used, and was killed on close


def test_a_server_that_stalls_on_a_cell_gives_a_timeout_not_a_hang(server):
    async def body(executor: E2BExecutor) -> tuple[list[ExecutionResult], float]:
        results = [await executor.execute("x = 1", "s")]
        server.inject("execute", "slow:5")  # no byte of the reply for 5 s
        started = time.monotonic()
        results.append(await executor.execute("print(x)", "s"))
        elapsed = time.monotonic() - started
        results.append(await executor.execute("print('after')", "s"))
        return results, elapsed

    (_, stalled, after), elapsed = run_with(server, body, timeout_s=1.0)
    assert stalled.timed_out and stalled.stop_reason == "timeout"
    assert 1.0 <= elapsed < 2.0  # our clock, not the server's
    assert after.ok and after.stdout == "after\n" and after.session_restarted  # a sandbox of unknown state is replaced


def test_gives_up_after_max_retries_with_a_recorded_error(server):
    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        results = [await executor.execute("x = 1", "s")]
        server.inject("execute", *[429] * 3)
        results.append(await executor.execute("print(x)", "s"))
        results.append(await executor.execute("print(x)", "s"))  # the service is back
        return results

    _, failed, after = run_with(server, body, max_retries=2)
    assert failed.error is not None and failed.error.startswith("SandboxError:") and "429" in failed.error
    assert failed.stop_reason == "crash" and not failed.session_restarted
    assert server.count("execute") == 1 + 3 + 1
    assert after.ok and after.stdout == "1\n"  # a 429 never ran the code: the state is intact


def test_failed_creations_give_back_their_slot(server):
    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        server.inject("create", *[503] * 2)
        failed = await executor.execute("print(1)", "a")
        return [failed, await asyncio.wait_for(executor.execute("print(2)", "b"), 10)]

    failed, ok = run_with(server, body, max_sandboxes=1, max_retries=1)
    assert failed.stop_reason == "crash" and (failed.error or "").startswith("SandboxError:")
    assert ok.ok and ok.stdout == "2\n"


def test_a_sandbox_that_e2b_ended_is_replaced(server):
    async def body(executor: E2BExecutor) -> ExecutionResult:
        await executor.execute("x = 1", "s")
        server.expire(server.created[0])  # its lifetime ran out: E2B's proxy now answers 502
        return await executor.execute("print('x' in globals())", "s")

    result = run_with(server, body)
    assert result.session_restarted and result.stdout == "False\n"
    assert len(server.created) == 2


def test_backoff_is_exponential_with_jitter():
    executor = E2BExecutor(backoff_base_s=0.1, backoff_max_s=0.4)
    for attempt, nominal in enumerate([0.1, 0.2, 0.4, 0.4]):
        delays = [executor._backoff_delay(attempt) for _ in range(200)]
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > nominal / 4  # spread out, not one fixed delay


# -- the concurrency cap ---------------------------------------------------------------------------------------


def test_at_most_max_sandboxes_are_alive_at_once(server):
    async def trajectory(executor: E2BExecutor, name: str) -> ExecutionResult:
        result = await executor.execute("import time\ntime.sleep(0.1)\nprint('done')", name)
        await executor.close_session(name)
        return result

    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        server.inject("kill", *["slow:0.1"] * 6)  # a slot freed before its kill completed would show here
        return await asyncio.gather(*(trajectory(executor, f"t{i}") for i in range(6)))

    results = run_with(server, body, max_sandboxes=2)
    assert all(r.ok and r.stdout == "done\n" for r in results)
    assert len(server.created) == 6 and server.peak_live == 2


# -- context isolation and debug mode -------------------------------------------------------------------------


def test_context_isolation_shares_one_sandbox(server):
    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        await executor.execute("secret = 1", "a")
        seen = [await executor.execute("print(secret)", name) for name in ("b", "a")]
        timed_out = await executor.execute("x = 2\nwhile True: pass", "a")
        after = await executor.execute("print('x' in globals())", "a")
        await executor.close_session("b")
        return [*seen, timed_out, after]

    seen_by_b, seen_by_a, timed_out, after = run_with(server, body, isolation="context", timeout_s=0.5)
    assert seen_by_b.error == "NameError: name 'secret' is not defined" and seen_by_a.stdout == "1\n"
    assert timed_out.stop_reason == "timeout"
    assert after.session_restarted and after.stdout == "False\n"  # a fresh context after the timeout
    assert len(server.created) == 1 and server.killed == server.created
    assert server.contexts_created == 3 and server.contexts_deleted == 3


def test_context_isolation_replaces_a_shared_sandbox_that_ended(server):
    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        await asyncio.gather(*(executor.execute("x = 1", name) for name in "ab"))
        server.expire(server.created[0])
        return [await executor.execute("print('x' in globals())", name) for name in "ab"]

    results = run_with(server, body, isolation="context")
    assert all(r.session_restarted and r.stdout == "False\n" for r in results)
    assert len(server.created) == 2  # one new shared sandbox, not one per session
    assert server.killed == server.created[1:]


def test_context_isolation_keeps_the_shared_sandbox_alive(server):
    async def body(executor: E2BExecutor) -> None:
        await executor.execute("pass", "a")
        await asyncio.sleep(0.3)  # past a quarter of its lifetime: the next new session extends it
        await executor.execute("pass", "b")

    run_with(server, body, isolation="context", sandbox_timeout_s=1)
    assert server.count("set_timeout") == 1 and len(server.created) == 1


@pytest.mark.parametrize("how", ["env", "option"])
def test_debug_mode_needs_no_key_and_gives_each_session_a_context(server, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("E2B_DEBUG", "true")

    async def body(executor: E2BExecutor) -> list[ExecutionResult]:
        await executor.execute("secret = 1", "a")
        return [await executor.execute("print(secret)", name) for name in ("b", "a")]

    options = {"debug": True} if how == "option" else {}
    seen_by_b, seen_by_a = run_with(server, body, api_key=None, sdk_options={"sandbox_url": server.url}, **options)
    assert seen_by_b.error is not None and seen_by_a.stdout == "1\n"
    assert server.count("create") == 0 and server.contexts_created == 2  # debug mode skips the control plane
    assert server.contexts_deleted == 2


# -- configuration --------------------------------------------------------------------------------------------


def test_a_missing_key_is_reported_at_first_use_without_a_request(server):
    executor = make(server, api_key=None)  # constructing needs no key: a recipe parses without one
    with pytest.raises(RuntimeError, match="E2B_API_KEY"):
        asyncio.run(executor.execute("print(1)", "s"))
    assert server.requests == []


def test_a_missing_sdk_names_the_extra(server, monkeypatch):
    monkeypatch.setitem(sys.modules, "e2b_code_interpreter", None)
    with pytest.raises(ImportError, match=r"pip install 'retool\[e2b\]'"):
        asyncio.run(make(server).execute("print(1)", "s"))


def test_the_sdk_is_imported_lazily():
    """Recipes and ``retool plugins`` load the plugin without the SDK: no module-level import of it."""
    folder = Path(__file__).resolve().parents[2] / "plugins" / "retool_plugins" / "executors" / "e2b"
    for path in sorted(folder.glob("*.py")):
        module = path.name
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] in ("e2b", "e2b_code_interpreter", "httpx") for name in names), module


@pytest.mark.parametrize(
    "options",
    [{"timeout_s": 0}, {"isolation": "vm"}, {"max_sandboxes": 0}, {"max_retries": -1}, {"backoff_base_s": -1}],
    ids=["timeout", "isolation", "max_sandboxes", "max_retries", "backoff"],
)
def test_invalid_options_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        E2BExecutor(**options)


@pytest.mark.network
@pytest.mark.skipif(not LIVE_KEY, reason="needs E2B_API_KEY (runs one cell on the real E2B)")
def test_live_e2b_runs_a_cell():
    async def main() -> ExecutionResult:
        executor = E2BExecutor(api_key=LIVE_KEY, timeout_s=60.0)
        try:
            return await executor.execute("import sys\nprint(sys.version_info[0])\n6 * 7", "live")
        finally:
            await executor.aclose()

    result = asyncio.run(main())
    assert result.ok and result.stdout == "3\n42\n"
