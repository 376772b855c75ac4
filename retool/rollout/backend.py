"""The rollout backend contract: something that continues token sequences.

A backend only decodes. The core's tool loop (:mod:`retool.rollout.loop`) drives each trajectory: it asks
the backend to continue the trajectory's tokens until a code cell closes, EOS or a budget, runs the cell,
appends the interpreter's reply as tokens, and asks again. Each trajectory is its own coroutine, so a
backend that batches concurrent ``generate`` calls decodes the other trajectories while one waits for its
cell.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from retool._async import run_sync
from retool.rollout.failures import ExecutorFailures
from retool.rollout.format import ReToolFormat, TextOnlyFormat, ToolFormat
from retool.types import Problem, Trajectory

if TYPE_CHECKING:
    import torch

    from retool.executor import Executor


@dataclass
class GenerationRequest:
    """One call to continue a sequence.

    Args:
        token_ids: The whole sequence so far (prompt, earlier model tokens, interpreter tokens).
        max_new_tokens: At most this many tokens may be added.
        stop: Called with the text generated so far by this request (not the prompt); ``True`` ends the
            request with ``finish_reason="stop"``. Called from the backend's decoding thread.
        request_id: Stable across the calls of one trajectory, so a backend can keep its KV cache.
    """

    token_ids: list[int]
    max_new_tokens: int
    stop: Callable[[str], bool] | None = None
    request_id: str = ""


@dataclass
class Generation:
    """What one request produced: the new tokens (a stop string's tokens included) and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["eos", "length", "stop"]


@dataclass
class RolloutResult:
    """The trajectories of one rollout and where its wall time went.

    Args:
        trajectories: ``group_size`` trajectories per problem, grouped: problem 0's first.
        wall_s: Wall time of the whole rollout.
        generate_s: Time the backend spent decoding (its busy time).
        tool_wait_s: Wall time in which no decoding ran because every live trajectory waited on a cell.
        generated_tokens: Tokens decoded by the model (interpreter tokens excluded).
    """

    trajectories: list[Trajectory]
    wall_s: float
    generate_s: float
    tool_wait_s: float
    generated_tokens: int
    extra: dict[str, float] = field(default_factory=dict)


class RolloutBackend(ABC):
    """Base class of rollout backends (``HFRollout``, ``VLLMRollout``, ...).

    A subclass implements :meth:`generate` (async) and, if it holds its own copy of the weights,
    :meth:`load_weights`. Budgets and sampling options live here so every backend reads them the same way.

    Args:
        max_new_tokens: Budget of model-written tokens per trajectory, over all its turns.
        max_tool_calls: Code cells a trajectory may run; a trajectory that closes one more cell ends there
            with ``finish_reason="max_tool_calls"``.
        temperature: Sampling temperature; 0 decodes greedily.
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Keep only the k most likely tokens (0 = off).
        seed: Seed of the sampler's random generator.
        format: The text format of code cells and interpreter replies (default: the paper's tags, or with
            tools off a prompt without tool instructions).
        tools: ``False`` turns tools off: no cell ever runs, for the text-only RL baseline.
        max_executor_failures: Consecutive cells the executor itself fails on (not the code: see
            ``ExecutionResult.executor_failed``) before the run stops with an error, rather than train for
            hours on the error text it shows the model; 0 never stops.
    """

    def __init__(
        self,
        max_new_tokens: int = 256,
        max_tool_calls: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        format: ToolFormat | None = None,
        tools: bool = True,
        max_executor_failures: int = 32,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be >= 0, got {max_tool_calls}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.max_new_tokens = max_new_tokens
        self.max_tool_calls = max_tool_calls
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.format = format if format is not None else (ReToolFormat() if tools else TextOnlyFormat())
        self.tools = tools
        if max_executor_failures < 0:
            raise ValueError(f"max_executor_failures must be >= 0 (0 never stops), got {max_executor_failures}")
        self.max_executor_failures = max_executor_failures
        self.executor_failures = ExecutorFailures(max_executor_failures)
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._busy_s = 0.0

    def bind(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Give the backend the policy it samples from (called by the algorithm once the model is loaded)."""
        self.model = model
        self.tokenizer = tokenizer

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> Generation:
        """Continue ``request.token_ids`` until EOS, ``request.stop`` or ``request.max_new_tokens``."""

    @contextlib.contextmanager
    def sampling(
        self, temperature: float, top_p: float | None = None, max_new_tokens: int | None = None
    ) -> Iterator[None]:
        """Decode at ``temperature`` (0 = greedy), and ``top_p`` and ``max_new_tokens`` where given, inside the
        block, then restore the recipe's settings.

        Evaluation uses it for its greedy pass and for the sampling of its protocols; a backend reads these
        attributes for each request and sampling step, so nothing else needs to change.
        """
        saved = (self.temperature, self.top_p, self.max_new_tokens)
        self.temperature = temperature
        self.top_p = self.top_p if top_p is None else top_p
        self.max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        try:
            yield
        finally:
            self.temperature, self.top_p, self.max_new_tokens = saved

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Wrap the backend's model compute in this, so that its time is reported as generation time (the
        rest of a rollout's wall time is reported as waiting for tools)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._busy_s += time.perf_counter() - start

    @property
    def needs_weight_sync(self) -> bool:
        """Whether the backend decodes with its own copy of the weights, so that the algorithm must call
        :meth:`load_weights` after every update. ``False`` (the default): it samples from the bound module."""
        return False

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:  # noqa: B027  # optional hook
        """Receive the trainer's new weights after an update (called only when :attr:`needs_weight_sync`)."""

    async def aclose(self) -> None:  # noqa: B027  # optional hook
        """Release the backend's resources."""

    def eos_token_ids(self) -> set[int]:
        """Token ids that end the model's turn: the tokenizer's EOS plus the generation config's."""
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
        return ids

    def rollout(
        self,
        problems: Sequence[Problem],
        group_size: int,
        executor: Executor | None,
        session_prefix: str = "",
        first_index: int = 0,
    ) -> RolloutResult:
        """Roll out ``group_size`` trajectories for each problem (synchronous; runs on the background loop).

        Trajectory ``g`` of ``problems[i]`` runs in the session (and request) ``{session_prefix}-{first_index +
        i}-{g}``; a backend derives its sampling seed from that name, so the same prefix and index sample the same
        trajectory whichever process rolls it out.
        """
        from retool.rollout.loop import rollout_groups

        if self.model is None or self.tokenizer is None:
            raise RuntimeError("the rollout backend has no model yet: call bind(model, tokenizer) first")
        if self.tools and executor is None:
            raise ValueError("tools are on but no executor was given (set `executor:` in the recipe)")
        busy_before = self._busy_s
        start = time.perf_counter()
        trajectories = self._run_loop(
            rollout_groups(self, problems, group_size, executor if self.tools else None, session_prefix, first_index)
        )
        wall = time.perf_counter() - start
        busy = self._busy_s - busy_before
        return RolloutResult(
            trajectories=trajectories,
            wall_s=wall,
            generate_s=busy,
            tool_wait_s=max(0.0, wall - busy),
            generated_tokens=sum(t.num_model_tokens for t in trajectories),
        )

    def _run_loop(self, coro: Coroutine[Any, Any, list[Trajectory]]) -> list[Trajectory]:
        """Run the tool loop on retool's background event loop and wait for it in the calling thread.

        A backend that must compute in the calling thread overrides this (``HFRollout`` decodes there: the
        thread that trains, so that PyTorch's CPU thread pool is not duplicated).
        """
        return run_sync(coro)
