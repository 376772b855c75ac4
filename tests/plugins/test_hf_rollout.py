"""HFRollout decodes correctly in batches: left padding, KV cache, stops, sampling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retool import GenerationRequest
from retool_plugins.rollout.hf import HFRollout, sample_next


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Plain full-recompute greedy decoding, one sequence at a time (no cache, no padding)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
    return out


def _run(backend: HFRollout, requests: list[GenerationRequest]):
    async def go():
        return await asyncio.gather(*(backend.generate(r) for r in requests))

    return asyncio.run(go())


def test_batched_greedy_decoding_matches_unbatched_reference(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=12)
    backend.bind(model, tokenizer)
    prompts = [
        tokenizer.encode(t) for t in ("Hello there, how are", "2 + 2 =", "A much longer prompt that needs padding")
    ]
    results = _run(backend, [GenerationRequest(p, 12) for p in prompts])
    for prompt, result in zip(prompts, results):
        expected = _greedy_reference(model, prompt, 12)
        eos = backend.eos_token_ids()
        cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
        assert result.token_ids == expected[:cut]
        assert result.finish_reason == ("eos" if cut < 12 or expected[cut - 1] in eos else "length")
        assert len(result.logprobs) == len(result.token_ids) and all(lp <= 0 for lp in result.logprobs)


def test_stop_callback_ends_one_request_and_not_the_others(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=1.0, max_new_tokens=20, seed=3)
    backend.bind(model, tokenizer)
    seen: list[str] = []

    def stop_after_three(text: str) -> bool:
        seen.append(text)
        return len(seen) >= 3

    # The stop callback only runs on tokens that could close a marker; make every token qualify.
    backend._stopped = lambda request, token, ids: request.stop(tokenizer.decode(ids))  # type: ignore[method-assign]
    prompt = tokenizer.encode("Some prompt")
    stopped, free = _run(backend, [GenerationRequest(prompt, 20, stop=stop_after_three), GenerationRequest(prompt, 20)])
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) == 3
    assert seen[-1] == tokenizer.decode(stopped.token_ids)
    assert free.finish_reason in ("length", "eos")
    assert free.finish_reason == "eos" or len(free.token_ids) == 20


def test_sampling_is_reproducible_with_a_seed(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Seeded sampling")

    def sample(seed: int) -> list[int]:
        backend = HFRollout(temperature=1.0, max_new_tokens=16, seed=seed)
        backend.bind(model, tokenizer)
        (result,) = _run(backend, [GenerationRequest(prompt, 16)])
        return result.token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_a_trajectory_samples_the_same_alone_or_batched(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompt, other = tokenizer.encode("Per-trajectory seeds"), tokenizer.encode("A different, longer prompt here")

    def sample(requests: list[GenerationRequest]) -> list[int]:
        backend = HFRollout(temperature=1.0, max_new_tokens=16, seed=5)
        backend.bind(model, tokenizer)
        return _run(backend, requests)[0].token_ids

    alone = sample([GenerationRequest(prompt, 16, request_id="traj-a")])
    batched = sample([GenerationRequest(prompt, 16, request_id="traj-a"), GenerationRequest(other, 16, request_id="b")])
    assert alone == batched
    assert alone != sample([GenerationRequest(prompt, 16, request_id="traj-c")])


def test_sample_next_filters() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 1.0, 1, g)[0]) for _ in range(20)}
    assert draws == {3}  # top_k=1 keeps only the best token
    draws = {int(sample_next(logits, 1.0, 0.5, 0, g)[0]) for _ in range(50)}
    assert draws == {3}  # token 3 alone holds ~64% of the mass, above top_p=0.5
    draws = {int(sample_next(logits, 1.0, 0.9, 0, g)[0]) for _ in range(200)}
    # probabilities ~ .64/.24/.09/.03: tokens 3 and 2 hold .88 < .9, so 1 is kept too, and 0 is dropped
    assert draws == {1, 2, 3}


def test_after_a_tool_call_only_the_new_tokens_are_prefilled(model_and_tokenizer) -> None:
    """The continuation reuses the kept KV cache and still decodes exactly what a full recompute would."""
    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=40)
    backend.bind(model, tokenizer)
    backend._stopped = lambda request, token, ids: request.stop(tokenizer.decode(ids))  # type: ignore[method-assign]
    seen_lengths: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen_lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)  # fmt: skip
    try:
        prompt = tokenizer.encode("A prompt that leads to a tool call")
        (first,) = _run(backend, [GenerationRequest(prompt, 40, stop=lambda text: len(text) >= 12, request_id="t")])
        assert first.finish_reason == "stop"
        feedback = tokenizer.encode("\n<interpreter>\n42\n</interpreter>\n")
        context = prompt + first.token_ids + feedback
        seen_lengths.clear()
        (second,) = _run(backend, [GenerationRequest(context, 10, request_id="t")])
    finally:
        hook.remove()
    # One prefill of the last generated token plus the interpreter tokens, then one token per step.
    assert seen_lengths[0] == 1 + len(feedback)
    assert set(seen_lengths[1:]) <= {1}
    expected = _greedy_reference(model, context, 10)
    eos = backend.eos_token_ids()
    cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
    assert second.token_ids == expected[:cut]


def test_a_late_request_joins_the_running_batch(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=30)
    backend.bind(model, tokenizer)
    early, late = tokenizer.encode("The early request is long enough"), tokenizer.encode("Late")

    async def go():
        first = asyncio.ensure_future(backend.generate(GenerationRequest(early, 30, request_id="a")))
        await asyncio.sleep(0.05)  # the first is decoding by now
        second = asyncio.ensure_future(backend.generate(GenerationRequest(late, 30, request_id="b")))
        return await asyncio.gather(first, second)

    results = asyncio.run(go())
    eos = backend.eos_token_ids()
    for prompt, result in zip((early, late), results):
        expected = _greedy_reference(model, prompt, 30)
        cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
        assert result.token_ids == expected[:cut]


def test_a_bfloat16_copy_decodes_and_follows_the_trainers_weights(model_and_tokenizer) -> None:
    import copy

    from retool import Problem
    from retool.testing import EchoExecutor

    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)  # this test changes the weights
    backend = HFRollout(temperature=0.0, max_new_tokens=8, dtype="bfloat16", tools=False)
    backend.bind(model, tokenizer)
    replica = backend._replica
    assert replica is not None and next(replica.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the trainer's module is left as it was

    def decoded():
        return backend.rollout([Problem("p", "What is 6 * 7?", "42")], 1, EchoExecutor(lambda code: "")).trajectories[0]

    first = decoded()
    with torch.no_grad():  # an "update": the next rollout must decode with it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    second = decoded()
    for name, p in model.state_dict().items():
        assert torch.equal(replica.state_dict()[name], p.to(torch.bfloat16)), name
    n = second.prompt_len
    assert first.token_ids[:n] == second.token_ids[:n] and first.token_ids[n:] != second.token_ids[n:]
    # What it decoded is the bfloat16 copy's greedy decoding of the prompt.
    reference = _greedy_reference(replica, second.token_ids[:n], 8)
    eos = backend.eos_token_ids()
    cut = next((i + 1 for i, t in enumerate(reference) if t in eos), len(reference))
    assert second.token_ids[n:] == reference[:cut]
    asyncio.run(backend.aclose())


def test_the_policy_dtype_needs_no_copy(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    for dtype in (None, "float32"):
        backend = HFRollout(dtype=dtype)
        backend.bind(model, tokenizer)
        assert backend._replica is None and not backend.needs_weight_sync
    with pytest.raises(ValueError, match="dtype"):
        HFRollout(dtype="int8")
