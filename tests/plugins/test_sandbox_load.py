"""LocalSandbox under load: 2,000 cells over 64 concurrent sessions, 10% of them hostile.

Every cell must get its own, correct result; afterwards no process is left and the test process's memory is
back where it was (within a small allowance for the allocator's arenas). The timeout is 3 s, not 1 s: with 64
sessions on two cores a cell gets a thirtieth of a CPU, and the attacks that end on their own (a fork loop
that fills the process table, a 10 MB print) must end on their own here too.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path

import pytest
from processes import descendants

from retool.types import ExecutionResult
from retool_plugins.executors.local import LocalSandbox

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux /proc"),
]

SESSIONS = 64
CELLS = 2000
RSS_ALLOWANCE_MB = 40

# Each hostile cell with a check of its precise outcome.
HOSTILE = [
    ("import time\ntime.sleep(100)", lambda r: r.timed_out and r.stop_reason == "timeout"),
    ("while True:\n    pass", lambda r: r.timed_out and r.stop_reason == "timeout"),
    ("import subprocess\nsubprocess.run(['sleep', '100'])", lambda r: r.timed_out),
    ("import os\nos._exit(1)", lambda r: r.stop_reason == "crash" and "exit code 1" in (r.error or "")),
    ("import ctypes\nctypes.string_at(0)", lambda r: r.stop_reason == "crash" and "SIGSEGV" in (r.error or "")),
    ("big = bytearray(8 * 1024**3)", lambda r: r.stop_reason == "memory"),
    (
        "import os\nwhile True:\n    if os.fork() == 0:\n        os._exit(0)",
        lambda r: (r.error or "").startswith("BlockingIOError"),
    ),
    ("print('x' * 10**7)", lambda r: r.ok and r.truncated),
    ("import os\nos.kill(-1, 9)", lambda r: (r.error or "").startswith("ProcessLookupError")),
    ("raise SystemExit(3)", lambda r: r.error == "SystemExit: 3"),
]
HOSTILE_WEIGHTS = [5, 1, 2, 3, 2, 3, 1, 1, 1, 1]  # mostly sleeping attacks: two cores cannot burn 64 at once


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def plan() -> list[list[tuple[str, object]]]:
    """Per session, its cells: (code, expected stdout or a check of a hostile result)."""
    weighted = [case for case, weight in zip(HOSTILE, HOSTILE_WEIGHTS) for _ in range(weight)]
    sessions: list[list[tuple[str, object]]] = [[] for _ in range(SESSIONS)]
    for i in range(CELLS):
        if i % 10 == 9:
            code, check = weighted[(i // 10) % len(weighted)]
            sessions[i % SESSIONS].append((code, check))
        elif i % 10 == 4:
            sessions[i % SESSIONS].append((f"print(sympy.factorint({i + 2}) == sympy.factorint({i + 2}))", "True\n"))
        else:
            sessions[i % SESSIONS].append((f"v = {i}\nprint(v * v)", f"{i * i}\n"))
    return sessions


async def run_load(sandbox: LocalSandbox, sessions: list[list[tuple[str, object]]]) -> list[ExecutionResult]:
    async def one_session(index: int, cells: list[tuple[str, object]]) -> list[ExecutionResult]:
        results = [await sandbox.execute(code, f"load-{index}") for code, _ in cells]
        await sandbox.close_session(f"load-{index}")
        return results

    per_session = await asyncio.gather(*(one_session(i, cells) for i, cells in enumerate(sessions)))
    return [r for results in per_session for r in results]


def test_2000_cells_over_64_sessions_with_hostile_ones() -> None:
    sessions = plan()

    async def warm_up() -> None:  # the allocator, asyncio and the modules reach their steady state first
        sandbox = LocalSandbox(timeout_s=3.0, memory_mb=256)
        await run_load(sandbox, [cells[:3] for cells in sessions])
        await sandbox.aclose()

    asyncio.run(warm_up())
    gc.collect()
    rss_before, procs_before = rss_mb(), descendants()

    async def main() -> tuple[list[ExecutionResult], float]:
        sandbox = LocalSandbox(timeout_s=3.0, memory_mb=256)
        started = time.monotonic()
        try:
            results = await run_load(sandbox, sessions)
        finally:
            await sandbox.aclose()
        return results, time.monotonic() - started

    results, elapsed = asyncio.run(main())
    expected = [(code, check) for cells in sessions for code, check in cells]
    assert len(results) == CELLS
    wrong = [
        (code, r)
        for (code, check), r in zip(expected, results)
        if not (r.ok and r.stdout == check if isinstance(check, str) else check(r))  # type: ignore[operator]
    ]
    assert not wrong, f"{len(wrong)} cells got a wrong result, e.g. {wrong[:3]}"
    assert sum(r.session_restarted for r in results) > 0  # the hostile cells did cost sessions their state
    gc.collect()
    assert descendants() == procs_before  # what ran before this test (other tests' workers) is not ours to judge
    assert rss_mb() - rss_before < RSS_ALLOWANCE_MB
    print(f"\n{CELLS} cells in {elapsed:.1f} s ({CELLS / elapsed:.0f}/s), rss {rss_before:.0f} -> {rss_mb():.0f} MiB")
