"""HFRollout decodes correctly in batches: left padding, KV cache, stops, sampling."""

from __future__ import annotations

import asyncio
import copy
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
    from retool import Problem
    from retool.testing import EchoExecutor

    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)  # this test changes the weights
    # transformers' own kernels, so that the reference below decodes with the very same arithmetic: in
    # bfloat16 another kernel's rounding flips near-ties of a random model (see the fast-kernel test below).
    backend = HFRollout(temperature=0.0, max_new_tokens=8, dtype="bfloat16", tools=False, fast_kernels=False)
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


# ---- the engine's fast kernels, its batched prefills and its serving thread ------------------------------


def _continue_three(backend: HFRollout, tokenizer) -> tuple[list, list]:
    """Three requests of different lengths stop after 5, 7 and 9 tokens; then all three come back together
    with interpreter replies of different lengths, and a fresh request with them (a row without a kept
    cache in the same prefill). Returns the first results, and the second round's contexts and results."""
    prompts = [
        tokenizer.encode(t) for t in ("Short", "A prompt of middling length", "The longest prompt of the three, by far")
    ]
    stops = [5, 7, 9]
    requests = [GenerationRequest(p, 30, stop=lambda text, n=n, seen=[]: seen.append(1) or len(seen) >= n,
                                  request_id=f"t{i}") for i, (p, n) in enumerate(zip(prompts, stops))]  # fmt: skip
    firsts = _run(backend, requests)
    replies = [tokenizer.encode(f"\n<interpreter>\n{'4' * k}\n</interpreter>\n") for k in (1, 12, 5)]
    contexts = [p + f.token_ids + r for p, f, r in zip(prompts, firsts, replies)]
    contexts.append(tokenizer.encode("A fresh prompt, as long as a reply"))
    seconds = _run(backend, [GenerationRequest(c, 12, request_id=f"t{i}") for i, c in enumerate(contexts)])
    return firsts, list(zip(contexts, seconds))


@pytest.mark.parametrize("fast_kernels", [True, False])
def test_continuations_joining_together_decode_what_a_full_recompute_decodes(model_and_tokenizer, fast_kernels) -> None:
    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=30, fast_kernels=fast_kernels)
    backend.bind(model, tokenizer)
    backend._stopped = lambda request, token, ids: request.stop(tokenizer.decode(ids))  # type: ignore[method-assign]
    assert backend._get_engine().grouped is fast_kernels
    firsts, continued = _continue_three(backend, tokenizer)
    assert [f.finish_reason for f in firsts] == ["stop"] * 3 and [len(f.token_ids) for f in firsts] == [5, 7, 9]
    eos = backend.eos_token_ids()
    for context, result in continued:
        expected = _greedy_reference(model, context, 12)
        cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
        assert result.token_ids == expected[:cut]
        # The sampler's log-probabilities are the model's, to float rounding.
        with torch.no_grad():
            logits = model(torch.tensor([context + result.token_ids])).logits[0, len(context) - 1 : -1]
        reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(result.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(result.logprobs), reference, atol=1e-4)


def test_requests_that_come_back_together_are_prefilled_as_one_batch(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=30)
    backend.bind(model, tokenizer)
    backend._stopped = lambda request, token, ids: request.stop(tokenizer.decode(ids))  # type: ignore[method-assign]
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)  # fmt: skip
    try:
        _continue_three(backend, tokenizer)
    finally:
        hook.remove()
    prefills = [shape for shape in shapes if shape[1] > 1]
    # The three prompts in one forward, then the three continuations and the fresh prompt in one forward,
    # each row's new tokens (a reply plus the last sampled token, or the prompt) left-padded to the longest.
    longest_reply = len(tokenizer.encode("\n<interpreter>\n444444444444\n</interpreter>\n"))
    fresh = len(tokenizer.encode("A fresh prompt, as long as a reply"))
    assert prefills[0][0] == 3 and prefills[1] == (4, max(1 + longest_reply, fresh)) and len(prefills) == 2
    assert all(shape[1] == 1 for shape in shapes if shape[1] <= 1)


def test_packed_linears_compute_the_same_and_leave_the_module_as_it_was() -> None:
    from retool_plugins.rollout.hf import _packed_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 32, bias=False))
    assert _packed_linears.available(model)  # the CPU wheel these tests run on ships oneDNN
    x = torch.randn(8, 64)
    expected, expected_one = model(x), model(x[:1])
    with _packed_linears.packed_linears(model) as count:
        assert count == 2 and all("forward" in vars(m) for m in model)
        with torch.inference_mode():
            assert torch.allclose(model(x), expected, atol=1e-5)
            assert torch.equal(model(x[:1]), expected_one)  # one row: the default kernel
        model(x).sum().backward()  # with gradients on, the layers compute as plain nn.Linear
        assert model[0].weight.grad is not None
    assert all("forward" not in vars(m) for m in model)


def test_inverse_cdf_sampling_draws_from_the_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = torch.log(probs)[None].repeat(4000, 1)  # token 4 has probability 0 (logit -inf)
    tokens, logprobs = sample_next(logits, 1.0, 1.0, 0, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=5) / len(tokens)
    assert counts[4] == 0
    assert torch.allclose(counts[:4], probs[:4], atol=0.03)
    assert torch.allclose(logprobs, torch.log(probs)[tokens])


def test_models_with_sliding_windows_take_transformers_path(model_and_tokenizer) -> None:
    from retool_plugins.rollout.hf._kernels import supports_grouped_attention

    model, _ = model_and_tokenizer
    assert supports_grouped_attention(model)
    sliding = copy.deepcopy(model)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert not supports_grouped_attention(sliding)


def test_a_rollout_decodes_in_the_calling_thread_and_direct_calls_in_a_helper(model_and_tokenizer) -> None:
    import threading

    from retool import Problem
    from retool.testing import EchoExecutor

    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=6, tools=False)
    backend.bind(model, tokenizer)
    threads: set[str] = set()
    hook = model.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    try:
        backend.rollout([Problem("p", "What is 6 * 7?", "42")], 2, EchoExecutor(lambda code: ""))
        assert threads == {threading.current_thread().name}
        threads.clear()
        _run(backend, [GenerationRequest(tokenizer.encode("Direct"), 4)])
        assert threads == {"retool-decode"}
    finally:
        hook.remove()
    helper = next((t for t in threading.enumerate() if t.name == "retool-decode"), None)
    if helper is not None:
        helper.join(timeout=5)  # it leaves once nothing is left to decode
        assert not helper.is_alive()


def test_a_failing_forward_fails_its_requests_and_the_engine_serves_the_next(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=6)
    backend.bind(model, tokenizer)
    prompt = tokenizer.encode("Will this fail?")

    def explode(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    hook = model.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            asyncio.run(asyncio.wait_for(backend.generate(GenerationRequest(prompt, 6)), timeout=30))
    finally:
        hook.remove()
    (result,) = _run(backend, [GenerationRequest(prompt, 6)])
    assert len(result.token_ids) >= 1


def test_ctrl_c_in_the_decoding_thread_ends_the_rollout_and_the_next_one_runs(model_and_tokenizer) -> None:
    from retool import Problem
    from retool.testing import EchoExecutor

    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=6, tools=False)
    backend.bind(model, tokenizer)
    problems, executor = [Problem("p", "What is 6 * 7?", "42")], EchoExecutor(lambda code: "")
    calls = []

    def interrupt_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(interrupt_third)
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.rollout(problems, 2, executor)
    finally:
        hook.remove()
    result = backend.rollout(problems, 2, executor)
    assert len(result.trajectories) == 2 and all(t.num_model_tokens >= 1 for t in result.trajectories)
    assert "forward" not in vars(model.lm_head) and model.config._attn_implementation != "retool_grouped"


def test_fast_kernels_in_bfloat16_pick_the_best_token_to_bfloat16_rounding(model_and_tokenizer) -> None:
    from retool import Problem
    from retool.testing import EchoExecutor

    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=0.0, max_new_tokens=12, dtype="bfloat16", tools=False)
    backend.bind(model, tokenizer)
    trajectory = backend.rollout([Problem("p", "What is 6 * 7?", "42")], 1, EchoExecutor(lambda c: "")).trajectories[0]
    ids, n = trajectory.token_ids, trajectory.prompt_len
    with torch.no_grad():
        logits = backend._replica(torch.tensor([ids])).logits[0, n - 1 : -1].float()
    chosen = logits.gather(-1, torch.tensor(ids[n:])[:, None]).squeeze(-1)
    best = logits.max(dim=-1).values
    # bfloat16 keeps 8 bits of mantissa: two kernels may round a logit differently by a few units in the
    # last place, so the greedy choice may differ where two logits are that close, and nowhere else.
    assert bool((best - chosen <= best.abs() * 2**-6).all())


def test_decoding_ignores_the_trainers_autocast_region(model_and_tokenizer) -> None:
    """Lightning runs training_step (and so the rollout, which decodes in its thread) under autocast with
    bf16-mixed precision: the policy must still decode in its own dtype."""
    from retool import Problem
    from retool.testing import EchoExecutor

    model, tokenizer = model_and_tokenizer
    backend = HFRollout(temperature=1.0, max_new_tokens=10, tools=False, seed=7)
    backend.bind(model, tokenizer)
    problems, executor = [Problem("p", "What is 6 * 7?", "42")], EchoExecutor(lambda c: "")
    # The same session prefix gives the same per-trajectory seeds (the trainer passes one per step).
    plain = backend.rollout(problems, 2, executor, session_prefix="s0").trajectories
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = backend.rollout(problems, 2, executor, session_prefix="s0").trajectories
    for a, b in zip(plain, autocast):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
