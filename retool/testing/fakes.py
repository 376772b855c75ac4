"""Fakes for testing plugins without a real model or sandbox.

``ScriptedRollout`` plays back a fixed response text token by token, honouring stops exactly as a real
backend must, so the core's tool loop can be tested with cells at known places. ``EchoExecutor`` answers
cells with a fixed function of their code. ``InMemoryData`` holds problems and traces in lists. None of
them runs model-written code: they are for tests only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from retool.data import ProblemDataModule
from retool.executor import Executor
from retool.rollout.backend import Generation, GenerationRequest, RolloutBackend
from retool.types import ExecutionResult, Problem, Trace


class ScriptedRollout(RolloutBackend):
    """A backend that "generates" a scripted response for each trajectory.

    Args:
        script: The full text the model should write (cells included, interpreter replies excluded: the
            loop inserts those after each closed cell); a list of texts, used in turn by the successive
            trajectories of each rollout (from the first text again at every rollout, as a real backend
            with a fixed seed samples the same again); or a function of the prompt text that returns it.
        eos: Append the tokenizer's EOS token when the script ends.
        **kwargs: Budgets and format, as for any backend.
    """

    def __init__(self, script: str | list[str] | Callable[[str], str], eos: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._texts = None if callable(script) else ([script] if isinstance(script, str) else list(script))
        self._turns = itertools.cycle(self._texts or [""])
        self.script = script if callable(script) else (lambda prompt: next(self._turns))
        self.eos = eos
        self._cursor: dict[str, tuple[list[int], int]] = {}
        self.calls: list[GenerationRequest] = []

    def rollout(self, *args: Any, **kwargs: Any) -> Any:
        # Each rollout starts over: request ids repeat across rollouts, and the texts are handed out in order again.
        self._cursor.clear()
        self._turns = itertools.cycle(self._texts or [""])
        return super().rollout(*args, **kwargs)

    async def generate(self, request: GenerationRequest) -> Generation:
        self.calls.append(request)
        if request.request_id not in self._cursor:
            prompt = self.tokenizer.decode(request.token_ids, skip_special_tokens=False)
            ids = list(self.tokenizer.encode(self.script(prompt), add_special_tokens=False))
            if self.eos:
                ids.append(self.tokenizer.eos_token_id)
            self._cursor[request.request_id] = (ids, 0)
        ids, pos = self._cursor[request.request_id]
        out: list[int] = []
        reason = "length"
        while len(out) < request.max_new_tokens:
            if pos >= len(ids):
                reason = "eos"
                break
            out.append(ids[pos])
            pos += 1
            if self.eos and out[-1] == self.tokenizer.eos_token_id:
                reason = "eos"
                break
            if request.stop is not None and request.stop(self.tokenizer.decode(out, skip_special_tokens=False)):
                reason = "stop"
                break
        self._cursor[request.request_id] = (ids, pos)
        return Generation(out, [0.0] * len(out), reason)  # type: ignore[arg-type]


class EchoExecutor(Executor):
    """Answers each cell with ``respond(code)`` as its stdout; records every call. Runs nothing.

    Args:
        respond: Maps a cell's code to the stdout to report.
    """

    def __init__(self, respond: Callable[[str], str] = lambda code: "ok\n") -> None:
        self.respond = respond
        self.calls: list[tuple[str, str]] = []
        self.closed: list[str] = []

    async def execute(self, code: str, session: str) -> ExecutionResult:
        self.calls.append((session, code))
        return ExecutionResult(stdout=self.respond(code))

    async def close_session(self, session: str) -> None:
        self.closed.append(session)

    async def aclose(self) -> None:
        pass


class InMemoryData(ProblemDataModule):
    """A dataset held in lists, for tests and notebooks: training problems and/or traces, and val problems.

    Args:
        train: Training problems (for RL).
        val: Held-out problems (for evaluation).
        traces: Training traces (for SFT).
        batch_size: Items per step.
        seed: Seed of the shuffling order.
        shuffle: Shuffle the training items each epoch.
    """

    def __init__(
        self,
        train: Sequence[Problem] = (),
        val: Sequence[Problem] = (),
        traces: Sequence[Trace] = (),
        batch_size: int = 2,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, shuffle=shuffle)
        self._lists = {"train": list(train), "val": list(val)}
        self._trace_list = list(traces)

    def load_problems(self, split: str) -> list[Problem]:
        return self._lists.get(split, [])

    def load_traces(self, split: str) -> list[Trace]:
        return self._trace_list if split == "train" else []
