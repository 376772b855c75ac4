"""The rollout backend contract as a test suite: what every :class:`~retool.RolloutBackend` must do.

Subclass :class:`RolloutContract`, set ``factory`` (a fresh backend; a small ``max_new_tokens`` keeps it quick)
and ``policy`` (a folder holding a small Hugging Face causal LM and its tokenizer: a random two-layer model is
enough, nothing here needs it to be good)::

    class TestMyBackend(RolloutContract):
        factory = staticmethod(lambda: MyBackend(max_new_tokens=16))
        policy = "tests/models/tiny-llama"

``rollout_contract(factory, policy)`` runs every rule at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from retool.rollout.backend import GenerationRequest, RolloutBackend
from retool.testing.executor import run_rules
from retool.testing.fakes import EchoExecutor
from retool.types import Problem, Trajectory

PROBLEMS = [Problem(id="a", prompt="What is 6 * 7?", answer="42"), Problem(id="b", prompt="Add 2 and 3.", answer="5")]


class RolloutContract:
    """The rules of the rollout backend contract, one ``test_*`` method each (see the module docstring)."""

    factory: ClassVar[Callable[[], RolloutBackend]]
    policy: ClassVar[str]
    logprob_tolerance: ClassVar[float | None] = 1e-3
    """Largest mean gap between the backend's log-probabilities and the model's own; ``None`` skips the rule."""

    _loaded: ClassVar[tuple[Any, Any] | None] = None

    def bound(self) -> RolloutBackend:
        """A fresh backend bound to the policy (loaded once per suite)."""
        cls = type(self)
        if cls._loaded is None:
            from retool.policy import Policy

            policy = Policy(name_or_path=cls.policy)
            cls._loaded = (policy.load_model().eval(), policy.load_tokenizer())
        backend = cls.factory()
        backend.bind(*cls._loaded)
        return backend

    def roll(self, backend: RolloutBackend, group_size: int = 2) -> list[Trajectory]:
        return backend.rollout(PROBLEMS, group_size, EchoExecutor(), session_prefix="contract").trajectories

    def close(self, backend: RolloutBackend) -> None:
        from retool._async import run_sync

        run_sync(backend.aclose())

    def test_generate_keeps_its_token_budget(self) -> None:
        backend = self.bound()
        from retool.rollout.loop import prompt_token_ids

        request = GenerationRequest(prompt_token_ids(backend, PROBLEMS[0]), max_new_tokens=3, request_id="budget")
        from retool._async import run_sync

        try:
            out = run_sync(_generate(backend, request))
        finally:
            run_sync(backend.aclose())
        assert len(out.token_ids) <= 3 and len(out.logprobs) == len(out.token_ids), out
        assert out.finish_reason in ("eos", "length", "stop"), out.finish_reason
        assert out.finish_reason != "length" or len(out.token_ids) == 3, out

    def test_trajectories_come_grouped_with_their_masks(self) -> None:
        backend = self.bound()
        try:
            trajectories = self.roll(backend)
        finally:
            self.close(backend)
        assert [(t.problem_id, t.group) for t in trajectories] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
        for t in trajectories:
            assert len(t.loss_mask) == len(t.token_ids) and t.prompt_len > 0, t
            assert not any(t.loss_mask[: t.prompt_len]), "a prompt token is marked as the model's"
            for call in t.tool_calls:  # interpreter tokens are never the model's
                assert not any(t.loss_mask[call.token_start : call.token_end]), call
            assert t.num_model_tokens <= backend.max_new_tokens, (t.num_model_tokens, backend.max_new_tokens)
            assert t.logprobs is None or len(t.logprobs) == len(t.token_ids)

    def test_greedy_decoding_repeats_itself(self) -> None:
        backend = self.bound()
        try:
            with backend.sampling(0.0):
                a, b = self.roll(backend), self.roll(backend)
        finally:
            self.close(backend)
        assert [t.token_ids for t in a] == [t.token_ids for t in b]

    def test_the_same_seed_samples_the_same_tokens(self) -> None:
        """Two rollouts of the same problems sample the same tokens: a trajectory's samples depend on the seed
        and its own id, not on what it was batched with or on the rollouts before it."""
        backend = self.bound()
        try:
            a, b = self.roll(backend), self.roll(backend)
        finally:
            self.close(backend)
        assert [t.token_ids for t in a] == [t.token_ids for t in b]

    def test_logprobs_are_the_models_own(self) -> None:
        """The sampler's log-probabilities are those of the temperature-scaled distribution the trainer scores."""
        if self.logprob_tolerance is None:
            return
        backend = self.bound()
        try:
            trajectories = self.roll(backend)
        finally:
            self.close(backend)
        model, _ = type(self)._loaded  # type: ignore[misc]
        temperature = backend.temperature or 1.0
        gaps: list[float] = []
        for t in trajectories:
            if t.logprobs is None:
                return  # a backend that reports none has nothing to compare
            ids = torch.tensor([t.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float() / temperature
            own = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            for i in range(t.prompt_len, len(t.token_ids)):
                if t.loss_mask[i]:
                    gaps.append(abs(float(own[i - 1]) - t.logprobs[i]))
        assert not gaps or sum(gaps) / len(gaps) <= self.logprob_tolerance, max(gaps)

    def test_aclose_twice_is_safe(self) -> None:
        from retool._async import run_sync

        backend = self.bound()
        run_sync(backend.aclose())
        run_sync(backend.aclose())


async def _generate(backend: RolloutBackend, request: GenerationRequest) -> Any:
    return await asyncio.wait_for(backend.generate(request), timeout=300)


def rollout_contract(
    factory: Callable[[], RolloutBackend], policy: str, logprob_tolerance: float | None = 1e-3
) -> None:
    """Check every rule of :class:`RolloutContract` against backends made by ``factory``, bound to ``policy``.

    Raises:
        AssertionError: listing each rule that failed and why.
    """
    attrs = {"factory": staticmethod(factory), "policy": policy, "logprob_tolerance": logprob_tolerance}
    run_rules(type("RolloutUnderTest", (RolloutContract,), attrs)())
