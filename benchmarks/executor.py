"""LocalSandbox speed against the baseline ``subprocess.run([sys.executable, "-c", code])``.

Run it from the repository root (about a minute on 2 CPU cores)::

    python benchmarks/executor.py             # the full run
    python benchmarks/executor.py --quick     # fewer repetitions
    python benchmarks/executor.py --markdown  # also print the table as Markdown (for docs/sandboxes.md)

What is measured, for three executors side by side:

* the baseline: every cell is a fresh ``python -c`` process that first imports what LocalSandbox preloads
  (``math, fractions, itertools, numpy, sympy``), so both run the same code with the same modules at hand;
* ``LocalSandbox()`` with its defaults: every isolation layer on (namespaces, uid, seccomp, cgroups);
* ``LocalSandbox(isolation=False)``: the same zygote and workers without the layers, to show what they cost.

Rows: a warm session's cell latency (p50 and p99) for ``print(1)`` and for a sympy ``solve``; a session's start
(a new session's first ``print(1)``, p50: zygote fork, confinement, the cell); and throughput, cells per second
with 32 sessions running at once. The zygote's own start (once per sandbox) is reported apart. The last column
is how many times faster the fully isolated LocalSandbox is than the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from retool_plugins.executors.local import LocalSandbox

IMPORTS = "import math, fractions, itertools, numpy, sympy\n"
PRINT = "print(1)"
SOLVE = "x = sympy.Symbol('x')\nprint(sympy.solve(x**2 - 5*x + 6, x))"
CONCURRENT = 32
TARGETS = {
    "cell p50: print(1)": "<= 1 ms",
    "session start p50": "<= 15 ms",
    "cells/s, 32 sessions": ">= 300",
    "cell p50: sympy solve": ">= 100x baseline",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def baseline_cell(code: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", IMPORTS + code], capture_output=True, check=True)
    assert done.stdout.strip(), done
    return time.perf_counter() - started


async def baseline_throughput(cells: int) -> float:
    gate = asyncio.Semaphore(CONCURRENT)

    async def one() -> None:
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", IMPORTS + PRINT, stdout=asyncio.subprocess.PIPE
            )
            await proc.communicate()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(cells)))
    return cells / (time.perf_counter() - started)


async def sandbox_numbers(reps: int, **options: Any) -> tuple[dict[str, float], list[str]]:
    """The timed rows for ``LocalSandbox(**options)``, and the isolation layers that were not active."""
    sandbox = LocalSandbox(**options)
    numbers: dict[str, float] = {}
    try:
        started = time.perf_counter()
        first = await sandbox.execute(PRINT, "warm")
        numbers["zygote start (once)"] = time.perf_counter() - started
        assert first.stdout == "1\n", first
        missing = [name for name, (active, _) in (await sandbox.layers()).items() if not active]

        async def timed(code: str, session: str) -> float:
            started = time.perf_counter()
            result = await sandbox.execute(code, session)
            elapsed = time.perf_counter() - started
            assert result.ok and result.stdout, result
            return elapsed

        for _ in range(20):  # warm the session and the caches
            await timed(PRINT, "warm")
            await timed(SOLVE, "warm")
        prints = [await timed(PRINT, "warm") for _ in range(reps * 10)]
        solves = [await timed(SOLVE, "warm") for _ in range(reps * 2)]
        starts = []
        for i in range(reps * 2):
            starts.append(await timed(PRINT, f"start-{i}"))
            await sandbox.close_session(f"start-{i}")
        numbers["cell p50: print(1)"] = percentile(prints, 0.5)
        numbers["cell p99: print(1)"] = percentile(prints, 0.99)
        numbers["cell p50: sympy solve"] = percentile(solves, 0.5)
        numbers["cell p99: sympy solve"] = percentile(solves, 0.99)
        numbers["session start p50"] = percentile(starts, 0.5)
        numbers["session start p99"] = percentile(starts, 0.99)

        per_session = reps * 2
        await asyncio.gather(*(sandbox.execute(PRINT, f"c{i}") for i in range(CONCURRENT)))  # sessions up

        async def session(i: int) -> None:
            for _ in range(per_session):
                await sandbox.execute(PRINT, f"c{i}")

        started = time.perf_counter()
        await asyncio.gather(*(session(i) for i in range(CONCURRENT)))
        numbers["cells/s, 32 sessions"] = CONCURRENT * per_session / (time.perf_counter() - started)
    finally:
        await sandbox.aclose()
    return numbers, missing


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _ms(value: float) -> str:
    return f"{value * 1e3:.2f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    reps = 10 if args.quick else 50
    base_reps = 5 if args.quick else 15
    load_before = os.getloadavg()

    isolated, missing = asyncio.run(sandbox_numbers(reps))
    # The comparison run turns the layers off on purpose: its "ISOLATION IS INCOMPLETE" warning is expected.
    sandbox_log = logging.getLogger("retool_plugins.executors.local")
    sandbox_log.setLevel(logging.ERROR)
    plain, _ = asyncio.run(sandbox_numbers(reps, isolation=False))
    sandbox_log.setLevel(logging.NOTSET)
    baseline_cell(PRINT)  # warm the page cache
    prints = [baseline_cell(PRINT) for _ in range(base_reps)]
    solves = [baseline_cell(SOLVE) for _ in range(base_reps)]
    baseline = {
        "cell p50: print(1)": percentile(prints, 0.5),
        "cell p99: print(1)": percentile(prints, 0.99),
        "cell p50: sympy solve": percentile(solves, 0.5),
        "cell p99: sympy solve": percentile(solves, 0.99),
        "session start p50": percentile(prints, 0.5),  # every baseline cell starts a fresh interpreter
        "session start p99": percentile(prints, 0.99),
        "cells/s, 32 sessions": asyncio.run(baseline_throughput(base_reps * 8)),
    }
    rows = [*baseline, "zygote start (once)"]
    table = Table(title=f"LocalSandbox vs subprocess.run(python -c) ({platform.node()}, {os.cpu_count()} CPUs)")
    headers = ["", "baseline: python -c", "LocalSandbox", "LocalSandbox(isolation=False)", "speed-up", "target"]
    for header in headers:
        table.add_column(header, justify="right" if header else "left")
    lines = []
    for row in rows:
        fmt: Callable[[float], str] = _rate if "cells/s" in row else _ms
        base = baseline.get(row)
        ours = isolated[row]
        if base is None:
            ratio = ""
        elif "cells/s" in row:
            ratio = f"{ours / base:.0f}x"
        else:
            ratio = f"{base / ours:.0f}x"
        cells = [row, fmt(base) if base is not None else "-", fmt(ours), fmt(plain[row]), ratio, TARGETS.get(row, "")]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console = Console()
    console.width = max(console.width, 130)  # never wrap the row names
    console.print(table)
    before = ", ".join(f"{x:.2f}" for x in load_before)
    after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if missing:
        console.print(
            f"[bold red]LocalSandbox ran WITHOUT these isolation layers: {', '.join(missing)}[/] (not root, or "
            "a container without namespaces): its column is not the 'every layer on' the targets assume"
        )
    else:
        console.print("LocalSandbox column: every isolation layer active (`retool sandbox check` lists them)")
    console.print(
        f"load average (1, 5, 15 min) before the run: {before}; after: {after} (the baseline's {CONCURRENT} "
        f"concurrent interpreters raise it); python {platform.python_version()}, {platform.platform()}"
    )
    if args.markdown:
        print("\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        print("\n".join(lines))


if __name__ == "__main__":
    main()
