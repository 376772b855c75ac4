"""Rollout speed: HFRollout and VLLMRollout (where vLLM is installed) against a naive ``model.generate()`` loop.

Run it from the repository root (it takes a few minutes on 2 CPU cores)::

    python benchmarks/rollout.py              # the full run: 160 model tokens per trajectory
    python benchmarks/rollout.py --quick      # a smoke run with tiny settings
    python benchmarks/rollout.py --profile    # also break HFRollout's busy time down (prefill, decode, ...)
    python benchmarks/rollout.py --markdown   # also print the tables as Markdown (for docs/rollouts.md)
    python benchmarks/rollout.py --dtype bfloat16   # all three in bfloat16 (fast with AMX, slow without)

What is compared, on SmolLM2-135M-Instruct (the built-in policy, fp32), 8 trajectories at a time
(2 problems x group 4), each writing exactly ``--tokens`` model tokens with k = 0, 2 or 4 tool calls:

(a) the naive baseline: one batched, left-padded ``model.generate()`` over the 8 sequences until the next
    cell, then the 8 cells run one after another (synchronously), then the full text of each sequence is
    re-tokenized and ``generate()`` starts again from scratch (no KV cache kept between turns);
(b) ``HFRollout`` through ``backend.rollout(problems, group_size, executor)``: the core's tool loop, the
    continuously batched decode engine, KV cache kept across a trajectory's cells;
(c) ``VLLMRollout`` on CPU, run the same way as (b) when ``retool_plugins.rollout.vllm`` imports and vLLM
    is installed (run the script with the interpreter of ``make test-vllm``'s environment,
    ``.venv-vllm/bin/python``); otherwise the column says why not. Its engine starts in the warm-up.

How the work is made identical for all three:

* Cells are scripted, not the model's own. A trajectory's ``T`` model tokens are cut into ``k`` segments of
  ``N = T // (k + 1)`` tokens, each followed by a cell, and a last segment of ``T - k * N`` tokens. The
  cell's code is fixed (``print(6 * 7)``) and its reply is rendered by ``ReToolFormat.feedback`` into the
  same ``<interpreter>`` block for every backend. The backends under test are wrapped by
  :func:`scripted_backend`: a subclass that consults the format (whose ``cell_closed`` then says yes) exactly
  when the request's generated tokens reach the next boundary, counted in tokens from the request's
  remaining budget, so every trajectory makes exactly k calls. The baseline asks ``generate()`` for exactly
  N tokens per segment. Every run checks the counts (k calls and T model tokens per trajectory).
* Every trajectory writes all ``T`` tokens: sampling at temperature 1.0 (top-k and top-p off) with EOS
  suppressed. The baseline passes ``min_new_tokens`` = ``max_new_tokens`` and ``suppress_tokens`` = the EOS
  ids to ``generate()``; the wrapped backend returns no EOS ids from ``eos_token_ids()``, so a sampled EOS
  does not end the request.
* Every model call runs in the main thread: the baseline's ``generate()`` and HFRollout's engine, which
  decodes in the thread that calls ``rollout()``. PyTorch's CPU builds use GNU OpenMP, which gives each
  computing thread its own pool of workers and, once the process holds more workers than cores, makes all of
  them sleep between parallel regions instead of spinning: a second computing thread would slow every later
  measurement (a batch-8 decode step 78 -> 107 ms on 2 cores).
* Cells are either instant (``EchoExecutor``) or take 200 ms: ``await asyncio.sleep(0.2)`` in the
  executor for (b) and (c), ``time.sleep(0.2)`` per cell in the synchronous baseline.

All 8 trajectories reach their cells at the same step (same segment lengths), so with 200 ms cells every
row waits at once and (b) cannot hide a cell behind other rows' decoding: its extra wall time is about
k x 200 ms. Because the boundaries are scripted, (b) skips HFRollout's own per-token stop check (one
single-token decode per row and step, when the token holds a backtick or ``>``).

Tokens/s counts model-written tokens only (8 x T per run) over the run's wall time. The model is warmed up
once before anything is timed; each cell of the table is the best (shortest wall) of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from _tables import print_table  # benchmarks/_tables.py (the script's own folder is on sys.path)
from rich.console import Console
from rich.table import Table

from retool._async import run_sync
from retool.policy import Policy
from retool.rollout.backend import Generation, GenerationRequest, RolloutBackend
from retool.rollout.format import ReToolFormat
from retool.rollout.loop import prompt_token_ids
from retool.testing import EchoExecutor
from retool.types import ExecutionResult, Problem

CELL = "print(6 * 7)"
CELL_OUTPUT = "42\n"
PROBLEMS = [
    Problem(id="p0", prompt="What is 617 * 694?", answer="428198"),
    Problem(id="p1", prompt="What is the sum of the squares of the integers from 1 to 20?", answer="2870"),
]
GROUP_SIZE = 4
TOOL_CALLS = (0, 2, 4)
VLLM_MISSING = "not available (VLLMRollout not built yet)"
TARGETS = {"b_over_a": 2.0, "sleep_over_instant": 1.2, "c_over_b": 3.0}


# ---- scripted cells --------------------------------------------------------------------------------------


class ScriptedCellFormat(ReToolFormat):
    """The paper's prompt and interpreter block, with a fixed cell wherever the backend asks.

    The benchmark's backend only consults ``cell_closed`` at the scripted token boundaries, so here every
    segment counts as a closed cell, and its code is always :data:`CELL`.
    """

    def cell_closed(self, segment: str) -> bool:
        return True

    def extract_code(self, segment: str) -> str | None:
        return CELL


@dataclass(frozen=True)
class Plan:
    """Where a trajectory's cells go: after every ``segment`` model tokens, ``cells`` times, then the rest."""

    total: int
    cells: int

    @property
    def segment(self) -> int:
        return self.total // (self.cells + 1)

    @property
    def lengths(self) -> list[int]:
        return [self.segment] * self.cells + [self.total - self.cells * self.segment]


def scripted_backend(cls: type[RolloutBackend], plan: Plan, **kwargs: Any) -> RolloutBackend:
    """An instance of a subclass of ``cls`` whose cells close at ``backend.plan``'s token boundaries, never at EOS.

    Tokens a trajectory wrote in earlier turns are the budget minus the request's ``max_new_tokens``, so each
    request knows how far its next boundary is. For ``HFRollout`` the subclass overrides ``_stopped(request,
    token, ids)``, the hook that decides when to consult ``request.stop``: it consults it (the format then
    says the cell closed) exactly at the boundary, so the engine ends the request with ``stop`` and keeps its
    KV cache row as for a real cell. Any other backend gets each turn as a request capped at the boundary
    (``length`` there is reported as ``stop``), and, where it has vLLM's ``_sampling_params``, ``ignore_eos``.
    ``backend.plan`` may be changed between rollouts.
    """
    from retool_plugins.rollout.hf import HFRollout

    class Scripted(cls):  # type: ignore[valid-type,misc]
        def eos_token_ids(self) -> set[int]:
            return set()

        def until_cell(self, remaining: int) -> int | None:
            """Tokens a request with ``remaining`` budget writes before its cell; ``None``: no cell is left."""
            written = self.max_new_tokens - remaining
            segment, cells = self.plan.segment, self.plan.cells
            return None if written >= cells * segment else (written // segment + 1) * segment - written

        if issubclass(cls, HFRollout):

            def _stopped(self, request: Any, token: int, ids: list[int]) -> bool:
                until = self.until_cell(request.max_new_tokens)
                if request.stop is None or until is None or len(ids) < until:
                    return False
                return request.stop(self.tokenizer.decode(ids, skip_special_tokens=False))

        else:

            async def generate(self, request: GenerationRequest) -> Generation:
                until = self.until_cell(request.max_new_tokens) if request.stop is not None else None
                if until is None:
                    return await super().generate(dataclasses.replace(request, stop=None))
                out = await super().generate(dataclasses.replace(request, max_new_tokens=until, stop=None))
                if out.finish_reason == "length" and len(out.token_ids) == until:
                    return dataclasses.replace(out, finish_reason="stop")
                return out

            if hasattr(cls, "_sampling_params"):

                def _sampling_params(self, *args: Any, **kwargs: Any) -> Any:
                    params = super()._sampling_params(*args, **kwargs)
                    params.ignore_eos = True  # vLLM ends at the tokenizer's EOS unless told not to
                    return params

    Scripted.__name__ = Scripted.__qualname__ = f"Scripted{cls.__name__}"
    backend = Scripted(
        max_new_tokens=plan.total,
        max_tool_calls=plan.cells,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        format=ScriptedCellFormat(),
        **kwargs,
    )
    backend.plan = plan
    return backend


def set_plan(backend: RolloutBackend, plan: Plan, seed: int) -> None:
    """Point a scripted backend at another plan (budgets follow) and sampling seed."""
    backend.plan = plan  # type: ignore[attr-defined]
    backend.max_new_tokens, backend.max_tool_calls, backend.seed = plan.total, plan.cells, seed


class SleepExecutor(EchoExecutor):
    """``EchoExecutor`` whose cells take ``delay_s`` of wall time without holding the event loop."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(lambda code: CELL_OUTPUT)
        self.delay_s = delay_s

    async def execute(self, code: str, session: str) -> ExecutionResult:
        await asyncio.sleep(self.delay_s)
        return await super().execute(code, session)


# ---- the measurements ------------------------------------------------------------------------------------


@dataclass
class Measured:
    wall_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def baseline(model: Any, tokenizer: Any, prompts: list[str], plan: Plan, cell_s: float) -> Measured:
    """(a): batched ``generate()`` to each cell, cells one after another, then re-tokenize and start over."""
    fmt = ReToolFormat()
    feedback = fmt.feedback(ExecutionResult(stdout=CELL_OUTPUT))
    eos = sorted({tokenizer.eos_token_id, *_generation_eos(model)} - {None})
    texts = list(prompts)
    written = 0
    start = time.perf_counter()
    for turn, length in enumerate(plan.lengths):
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=length,
                min_new_tokens=length,
                suppress_tokens=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        assert new.shape[1] == length, f"generate() wrote {new.shape[1]} tokens, not {length}"
        written += new.numel()
        texts = [t + tokenizer.decode(row, skip_special_tokens=False) for t, row in zip(texts, new.tolist())]
        if turn < plan.cells:
            for i in range(len(texts)):  # each cell in turn, synchronously
                if cell_s:
                    time.sleep(cell_s)
                texts[i] += feedback
    return Measured(time.perf_counter() - start, written)


def _generation_eos(model: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


def backend_run(backend: RolloutBackend, plan: Plan, cell_s: float) -> Measured:
    """(b)/(c): one rollout of 2 problems x group 4 through the core's tool loop."""
    executor = SleepExecutor(cell_s) if cell_s else EchoExecutor(lambda code: CELL_OUTPUT)
    result = backend.rollout(PROBLEMS, GROUP_SIZE, executor)
    for t in result.trajectories:
        if len(t.tool_calls) != plan.cells or t.num_model_tokens != plan.total:
            raise RuntimeError(
                f"{type(backend).__name__}: a trajectory made {len(t.tool_calls)} calls and wrote "
                f"{t.num_model_tokens} tokens, not {plan.cells} and {plan.total} (the scripted cells did not apply)"
            )
    return Measured(result.wall_s, result.generated_tokens)


def load_vllm() -> tuple[type[RolloutBackend] | None, str]:
    """VLLMRollout if its module imports, else ``None`` and why not."""
    try:
        module = importlib.import_module("retool_plugins.rollout.vllm")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("retool_plugins"):
            return None, VLLM_MISSING
        return None, f"not available ({exc})"
    except Exception as exc:
        return None, f"not available ({type(exc).__name__}: {exc})"
    return module.VLLMRollout, ""


def close_after_failure(backend: RolloutBackend | None, exc: Exception, notes: list[str]) -> None:
    """Record why (c) could not run (``notes[-1]`` starts with the table's short label) and close it."""
    if isinstance(exc, ImportError):
        notes.append(f"not available (vLLM is not installed here): {exc}")
    else:
        notes.append(f"failed ({type(exc).__name__}): {exc}")
    if backend is not None:
        with contextlib.suppress(Exception):
            run_sync(backend.aclose())
    return None


# ---- where HFRollout's time goes (--profile) -------------------------------------------------------------


class EngineProfile:
    """Times the parts of HFRollout's decode engine by wrapping its methods on one engine instance."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.steps = 0
        self._in_prefill = False

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timed(name):
                return fn(*args, **kwargs)

        return timed

    def install(self, engine: Any) -> None:
        model = engine.model
        profile = self

        def prefill(group: list[Any]) -> Any:
            profile._in_prefill = True
            after = sum(request.request_id in engine._kept for request in group)
            kind = "prefill after a cell" if after else "prefill of a prompt"
            profile.counts[kind] += len(group)  # rows
            profile.counts[kind + " (forwards)"] += 1
            try:
                with profile.timed(kind):
                    return original_prefill(group)
            finally:
                profile._in_prefill = False

        def forward(*args: Any, **kwargs: Any) -> Any:
            if profile._in_prefill:
                return model(*args, **kwargs)
            profile.steps += 1
            with profile.timed("decode forward"):
                return model(*args, **kwargs)

        def step() -> None:
            with profile.timed("engine busy"):
                original_step()

        original_prefill, original_step = engine._prefill, engine._step
        engine._prefill, engine._step, engine.model = prefill, step, forward
        engine.sampler = self.wrap("sampling", engine.sampler)
        engine._join = self.wrap("join (cache concat)", engine._join)
        engine._select = self.wrap("select (cache gather)", engine._select)
        engine._keep_row = self.wrap("keep row (cache copy)", engine._keep_row)


def profile_hf(model: Any, tokenizer: Any, plan: Plan, seed: int, console: Console) -> None:
    """One HFRollout rollout at ``plan`` with instant cells, its engine instrumented; prints where time went."""
    from retool_plugins.rollout.hf import HFRollout

    backend = scripted_backend(HFRollout, plan, seed=seed)
    backend.bind(model, tokenizer)
    engine = backend._get_engine()  # type: ignore[attr-defined]
    profile = EngineProfile()
    profile.install(engine)
    original_stopped = backend._stopped  # type: ignore[attr-defined]
    backend._stopped = profile.wrap("stop checks", original_stopped)  # type: ignore[attr-defined]
    try:
        measured = backend_run(backend, plan, 0.0)
    finally:
        run_sync(backend.aclose())
    s = profile.seconds
    # _step holds sampling, stop checks, keep_row, select and the decode forward; _admit (outside _step)
    # holds prefill and join.
    in_step = s["sampling"] + s["stop checks"] + s["keep row (cache copy)"]
    in_step += s["select (cache gather)"] + s["decode forward"]
    counts = profile.counts
    prompts = f"{counts['prefill of a prompt']} rows in {counts['prefill of a prompt (forwards)']} forwards"
    replies = f"{counts['prefill after a cell']} rows in {counts['prefill after a cell (forwards)']} forwards"
    parts = {
        f"prefill of the prompts ({prompts})": s["prefill of a prompt"],
        f"prefill after cells ({replies})": s["prefill after a cell"],
        "decode forward (model, batch)": s["decode forward"],
        "sampling (softmax, one uniform draw per row)": s["sampling"],
        "stop checks": s["stop checks"],
        "cache bookkeeping (join/select/keep)": s["join (cache concat)"]
        + s["select (cache gather)"]
        + s["keep row (cache copy)"],
        "rest of the engine step (Python)": max(0.0, s["engine busy"] - in_step),
    }
    accounted = sum(parts.values())
    parts["outside the engine (loop, tokenizer, idle)"] = max(0.0, measured.wall_s - accounted)
    table = Table(title=f"Where HFRollout's wall time goes (k={plan.cells}, instant cells, {measured.wall_s:.2f} s)")
    table.add_column("part")
    table.add_column("s", justify="right")
    table.add_column("share", justify="right")
    for name, seconds in parts.items():
        table.add_row(name, f"{seconds:.2f}", f"{seconds / measured.wall_s:.0%}")
    console.print(table)
    per_step = s["decode forward"] / max(1, profile.steps) * 1e3
    console.print(f"decode steps: {profile.steps}, {per_step:.1f} ms per decode forward")


def decode_steps(model: Any, batch: int, context: int, steps: int, fast: bool, profiler: Any = None) -> float:
    """Wall seconds per batched decode forward on a ``context``-token cache; the prefill is not timed.

    ``fast=False``: transformers' own path, as ``generate()`` decodes (a ``DynamicCache``, a 2-D mask, SDPA).
    ``fast=True``: HFRollout's engine with its ``fast_kernels`` (a cache written in place, its additive mask
    and grouped attention, oneDNN-reordered linear weights).
    """
    from transformers import DynamicCache

    from retool_plugins.rollout.hf import _cache, _kernels

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, context), generator=generator)
    kernels = _kernels.fast_kernels(model, grouped=True) if fast else contextlib.nullcontext()
    with kernels, torch.inference_mode():
        cache = _cache.column_cache() if fast else DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        attention = torch.ones((batch, context), dtype=torch.long)

        def step(i: int) -> None:
            nonlocal out, attention
            tokens = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            attention = torch.cat([attention, attention.new_ones((batch, 1))], dim=1)
            out = model(
                input_ids=tokens,
                attention_mask=torch.zeros((batch, 1, 1, attention.shape[1])) if fast else attention,
                position_ids=torch.full((batch, 1), context + i),
                past_key_values=cache,
                use_cache=True,
            )

        for i in range(2):  # untimed: the first calls of a shape build oneDNN's kernels for it
            step(i)
        with profiler if profiler is not None else contextlib.nullcontext():
            start = time.perf_counter()
            for i in range(2, 2 + steps):
                step(i)
            return (time.perf_counter() - start) / steps


def profile_decode_ops(model: Any, batch: int, context: int, steps: int, console: Console) -> None:
    """What one decode forward spends its time on (torch.profiler, self CPU time per op), on transformers'
    path and on HFRollout's fast kernels, and how its cost grows with the batch."""
    from torch.profiler import ProfilerActivity, profile

    for fast, name in ((False, "transformers' path, as generate() decodes"), (True, "HFRollout's fast_kernels")):
        single = decode_steps(model, 1, context, steps, fast)
        wall = decode_steps(model, batch, context, steps, fast)
        prof = profile(activities=[ProfilerActivity.CPU])
        decode_steps(model, batch, context, steps, fast, prof)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        table = Table(title=f"Inside a decode forward, {name}: batch {batch}, {context}-token cache, {steps} steps")
        table.add_column("op (self CPU time, profiled)")
        table.add_column("ms per step", justify="right")
        table.add_column("share of op time", justify="right")
        for event in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]:
            self_us = event.self_cpu_time_total
            table.add_row(event.key, f"{self_us / steps / 1e3:.1f}", f"{self_us / total:.0%}")
        console.print(table)
        ops_ms = total / steps / 1e3
        console.print(
            f"unprofiled wall per decode forward: batch {batch} {wall * 1e3:.1f} ms ({batch / wall:.0f} tok/s), "
            f"batch 1 {single * 1e3:.1f} ms ({1 / single:.0f} tok/s); all ops together (profiled) "
            f"{ops_ms:.1f} ms per step at batch {batch}"
        )


# ---- the run ---------------------------------------------------------------------------------------------


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def best_of(runs: list[Measured]) -> Measured:
    """The run with the shortest wall time: on a shared machine, other work only ever adds time."""
    return min(runs, key=lambda m: m.wall_s)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "[green]pass[/]" if ok else "[red]miss[/]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=160, help="model-written tokens per trajectory (160)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per table cell; the best is shown (1)")
    parser.add_argument("--cell-ms", type=float, default=200.0, help="duration of a slow cell, in ms (200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the policy's dtype, for all three (float32); bfloat16 is fast only with bfloat16 matrix units (AMX)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 tokens, 1 repeat")
    parser.add_argument("--profile", action="store_true", help="also time the parts of HFRollout's engine at k=4")
    parser.add_argument("--profile-only", action="store_true", help="only the profile (no table)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 24, 1
    if args.tokens < max(TOOL_CALLS) + 1:
        parser.error(f"--tokens must be at least {max(TOOL_CALLS) + 1}")
    cell_s = args.cell_ms / 1000

    from transformers import __version__ as transformers_version

    from retool_plugins.rollout.hf import HFRollout

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(
        f"[bold]retool rollout benchmark[/]  machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers_version}, "
        f"python {platform.python_version()}"
    )
    console.print(
        f"load average (1, 5, 15 min) at start: {load_average()}  |  SmolLM2-135M-Instruct {args.dtype}, "
        f"{len(PROBLEMS)} problems x group {GROUP_SIZE}, {args.tokens} model tokens per trajectory, "
        f"temperature 1.0, EOS suppressed, slow cells {args.cell_ms:.0f} ms, best of {args.repeats}"
    )

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep vLLM's engine logs out of the tables
    policy = Policy("smollm2-135m-instruct", dtype=args.dtype)
    model, tokenizer = policy.load_model(), policy.load_tokenizer()
    model.eval()
    vllm_cls, c_label = load_vllm() if not args.profile_only else (None, "")
    notes: list[str] = []

    helper = HFRollout(format=ReToolFormat())
    helper.bind(model, tokenizer)
    prompts = [
        tokenizer.decode(prompt_token_ids(helper, p), skip_special_tokens=False)
        for p in PROBLEMS
        for _ in range(GROUP_SIZE)
    ]

    # Warm-up: one short run of each, untimed (for VLLMRollout this also starts its engine).
    torch.manual_seed(args.seed)
    warm = Plan(total=8, cells=1)
    baseline(model, tokenizer, prompts, warm, 0.0)
    hf = scripted_backend(HFRollout, warm, seed=args.seed)
    hf.bind(model, tokenizer)
    backend_run(hf, warm, 0.0)
    # The floor under a decode step, measured before vLLM's engine (another process) starts.
    context = len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"]) + args.tokens // 2
    bound = measure_bound(model, len(prompts), context, 4 if args.quick else 16)
    if args.profile_only:
        run_sync(hf.aclose())
        print_bound(bound, console, args.markdown)
        run_profile(model, tokenizer, prompts, args, console)
        return 0
    vllm: RolloutBackend | None = None
    if vllm_cls is not None:
        try:
            vllm = scripted_backend(vllm_cls, warm, seed=args.seed)
            vllm.bind(model, tokenizer)
            backend_run(vllm, warm, 0.0)
        except Exception as exc:
            vllm = close_after_failure(vllm, exc, notes)
            c_label = notes[-1].split(":")[0]

    rows: list[tuple[int, str, Measured, Measured, Measured | None]] = []
    kinds = [("instant", 0.0), (f"{args.cell_ms:.0f} ms", cell_s)]
    try:
        for k in TOOL_CALLS:
            plan = Plan(total=args.tokens, cells=k)
            for kind, seconds in kinds if k else [("(no cells)", 0.0)]:
                a_runs, b_runs, c_runs = [], [], []
                for r in range(args.repeats):
                    torch.manual_seed(args.seed + r)
                    a_runs.append(baseline(model, tokenizer, prompts, plan, seconds))
                    set_plan(hf, plan, args.seed + r)
                    b_runs.append(backend_run(hf, plan, seconds))
                    if vllm is not None:
                        try:
                            set_plan(vllm, plan, args.seed + r)
                            c_runs.append(backend_run(vllm, plan, seconds))
                        except Exception as exc:
                            vllm = close_after_failure(vllm, exc, notes)
                            c_label = notes[-1].split(":")[0]
                c = best_of(c_runs) if len(c_runs) == args.repeats else None
                rows.append((k, kind, best_of(a_runs), best_of(b_runs), c))
                console.print(f"  done: k={k} {kind}", style="dim")
    finally:
        for backend in (hf, vllm):
            if backend is not None:
                run_sync(backend.aclose())

    c_ok = any(c is not None for *_, c in rows)
    header = ["tool calls", "cells", "(a) generate() s", "(a) tok/s", "(b) HFRollout s", "(b) tok/s"]
    header += ["(c) VLLMRollout s", "(c) tok/s"] if c_ok else ["(c) VLLMRollout"]
    header += ["b/a", "c/b"]
    body: list[list[str]] = []
    for k, kind, a, b, c in rows:
        line = [str(k), kind, f"{a.wall_s:.2f}", f"{a.tokens_per_s:.1f}", f"{b.wall_s:.2f}", f"{b.tokens_per_s:.1f}"]
        if c_ok:
            line += [f"{c.wall_s:.2f}", f"{c.tokens_per_s:.1f}"] if c else ["-", "-"]
        else:
            line.append(c_label)
        line.append(fmt_ratio(b.tokens_per_s / a.tokens_per_s))
        line.append(fmt_ratio(c.tokens_per_s / b.tokens_per_s) if c else "-")
        body.append(line)
    title = f"Rollout speed: 8 trajectories x {args.tokens} model tokens (wall s, model tokens/s)"
    print_table(console, title, header, body, args.markdown)

    by_key = {(k, kind): (a, b, c) for k, kind, a, b, c in rows}
    k_max = max(TOOL_CALLS)
    a4, b4, c4 = by_key[(k_max, "instant")]
    a4s, b4s, _ = by_key[(k_max, kinds[1][0])]
    sleep_ratio = b4s.wall_s / b4.wall_s
    checks: list[list[str]] = []
    for kind, a, b in (("instant", a4, b4), (kinds[1][0], a4s, b4s)):
        ratio = b.tokens_per_s / a.tokens_per_s
        target = TARGETS["b_over_a"]
        checks.append([f"(b) tok/s / (a) tok/s, {kind} cells", f">= {target:.1f}x", f"{ratio:.2f}x"])
        checks[-1].append(verdict(ratio, target))
    target = TARGETS["sleep_over_instant"]
    checks.append(
        [
            f"(b) wall, {kinds[1][0]} cells / instant cells",
            f"<= {target:.1f}x",
            f"{sleep_ratio:.2f}x ({b4s.wall_s:.2f} s / {b4.wall_s:.2f} s)",
            verdict(sleep_ratio, target, higher_is_better=False),
        ]
    )
    cb = c4.tokens_per_s / b4.tokens_per_s if c4 else None
    target = TARGETS["c_over_b"]
    checks.append(
        [
            "(c) tok/s / (b) tok/s, instant cells",
            f">= {target:.1f}x",
            fmt_ratio(cb) if cb is not None else c_label,
            verdict(cb, target),
        ]
    )
    columns = ["target", "goal", "measured", "verdict"]
    print_table(console, f"Targets (at {k_max} tool calls)", columns, checks, args.markdown)
    print_bound(bound, console, args.markdown)
    for note in notes:
        console.print(f"(c) {note}", markup=False, highlight=False)
    console.print(f"load average (1, 5, 15 min) at end: {load_average()}")

    if args.profile:
        run_profile(model, tokenizer, prompts, args, console)
    return 0


def read_bandwidth() -> float:
    """Bytes per second this machine reads from memory: the best of 5 sums over a 512 MiB tensor (far larger
    than any cache), in this thread, with PyTorch's threads."""
    data = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best


def measure_bound(model: Any, batch: int, context: int, steps: int) -> dict[str, Any]:
    """The floor under any decode step here (it must read every weight once), and the decode steps of
    HFRollout's kernels and of transformers' path, on the same cache."""
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}  # tied weights once
    return {
        "batch": batch,
        "context": context,
        "weight_bytes": sum(weights.values()),
        "bandwidth": read_bandwidth(),
        "hf_step": decode_steps(model, batch, context, steps, fast=True),
        "generate_step": decode_steps(model, batch, context, steps, fast=False),
    }


def print_bound(bound: dict[str, Any], console: Console, markdown: bool) -> None:
    batch, floor = bound["batch"], bound["weight_bytes"] / bound["bandwidth"]
    body = [
        ["weights read by every decode step", f"{bound['weight_bytes'] / 2**20:.0f} MiB"],
        ["memory read bandwidth (sum over 512 MiB)", f"{bound['bandwidth'] / 1e9:.1f} GB/s"],
        ["floor of a decode step (weights / bandwidth)", f"{floor * 1e3:.1f} ms = at most {batch / floor:.0f} tok/s"],
        [f"HFRollout's decode step ({bound['context']}-token cache)", f"{bound['hf_step'] * 1e3:.1f} ms"],
        ["transformers' decode step, as generate() runs it", f"{bound['generate_step'] * 1e3:.1f} ms"],
        ["most any backend can gain on HFRollout's decoding here", f"{bound['hf_step'] / floor:.2f}x"],
    ]
    print_table(console, f"What bounds decoding here (batch {batch})", ["quantity", "value"], body, markdown)


def run_profile(model: Any, tokenizer: Any, prompts: list[str], args: argparse.Namespace, console: Console) -> None:
    """``--profile``: where HFRollout's time goes at the most tool calls, and inside one decode forward."""
    console.print(f"load average (1, 5, 15 min) before the profile: {load_average()}")
    torch.manual_seed(args.seed)
    profile_hf(model, tokenizer, Plan(total=args.tokens, cells=max(TOOL_CALLS)), args.seed, console)
    context = len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"]) + args.tokens // 2
    profile_decode_ops(model, len(prompts), context, 4 if args.quick else 16, console)
    console.print(f"load average (1, 5, 15 min) after the profile: {load_average()}")


if __name__ == "__main__":
    raise SystemExit(main())
