"""Packed passes compute what padded ones do: the same log-probs, entropies and gradients, interpreter blocks
inside the responses included; token-budget micro-batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from retool.algorithm.batch import PolicyBatch
from retool.algorithm.packing import pack, supports_packing
from retool.algorithm.processes import share_by_tokens
from retool.types import Trajectory
from retool_plugins.algorithms.grpo import GRPO


def trajectory(prompt: int, response: int, seed: int) -> Trajectory:
    """A prompt of ``prompt`` tokens and a response of ``response``, whose middle third is an interpreter block
    (loss mask 0), as a rollout with one code cell leaves it."""
    rng = random.Random(seed)
    tokens = [rng.randrange(5, 1000) for _ in range(prompt + response)]
    mask = [0] * prompt + [1] * response
    third = response // 3
    for i in range(prompt + third, prompt + 2 * third):
        mask[i] = 0
    return Trajectory(f"p{seed}", 0, tokens, mask, prompt, "", "", "")


# Different prompt and response lengths, so that the padded layout pads both sides.
SHAPES = [(7, 30), (19, 9), (3, 41), (11, 1)]


def batch() -> PolicyBatch:
    trajectories = [trajectory(p, r, seed) for seed, (p, r) in enumerate(SHAPES)]
    return PolicyBatch.from_trajectories(trajectories, [1.0, -1.0, 1.0, -1.0], pad_id=0)


def test_pack_lays_the_real_tokens_end_to_end_and_points_at_each_response_token() -> None:
    b = batch()
    packed = pack(b)
    expected = [t for seed, (p, r) in enumerate(SHAPES) for t in trajectory(p, r, seed).token_ids]
    assert packed.input_ids.tolist() == [expected]
    assert packed.position_ids[0].tolist() == [i for p, r in SHAPES for i in range(p + r)]
    assert packed.cu_seqlens.tolist() == [0, 37, 65, 109, 121] and packed.max_length == 44
    assert packed.targets.numel() == sum(r for _, r in SHAPES) == int(b.attention_mask[:, -b.response_width :].sum())
    # Each target is the token after its predictor, and both sit inside the same trajectory.
    assert torch.equal(packed.input_ids[0, packed.predictors + 1], packed.targets)
    ends = packed.cu_seqlens.long()[packed.rows + 1]
    assert bool((packed.predictors >= packed.cu_seqlens.long()[packed.rows]).all() and (packed.predictors < ends).all())
    padded_targets = b.input_ids[:, -b.response_width :]
    assert torch.equal(padded_targets[packed.rows, packed.columns], packed.targets)


@pytest.fixture()
def algorithm(tiny_model_dir: Path) -> GRPO:
    from transformers import AutoModelForCausalLM

    algo = GRPO(lr=1e-3)
    algo.model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert supports_packing(algo.model)
    return algo


@pytest.mark.parametrize("chunk", [7, 1024])  # several chunks of the head, and one
def test_packed_and_padded_passes_give_the_same_logprobs_entropies_and_gradients(algorithm: GRPO, chunk: int) -> None:
    model, b = algorithm.model, batch()
    assert model is not None
    mask = b.response_mask
    real = b.attention_mask[:, -b.response_width :].bool()
    results = {}
    for packed in (False, True):
        algorithm.pack_sequences, algorithm.logprob_chunk_tokens = packed, chunk
        model.zero_grad()
        logprobs, entropy = algorithm.sequence_logprobs(model, b, with_entropy=True, temperature=0.7,
                                                        entropy_grad=True)  # fmt: skip
        # A loss with both terms, over the model-written tokens only (the interpreter blocks are masked out).
        ((logprobs * mask).sum() + 0.1 * (entropy * mask).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[packed] = (logprobs.detach(), entropy.detach(), grads)
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results[False], results[True]
    assert torch.allclose(lp_a[real], lp_b[real], atol=1e-5, rtol=0)
    assert torch.allclose(ent_a[real], ent_b[real], atol=1e-5, rtol=0)
    assert not lp_b[~real].any() and not ent_b[~real].any()  # past each response: zeros, as the padded path's
    for name in g_a:
        scale = float(g_a[name].abs().max())
        assert scale > 0 and float((g_a[name] - g_b[name]).abs().max()) <= 1e-5 * max(scale, 1.0), name


def test_packed_pass_without_gradients_matches_too(algorithm: GRPO) -> None:
    model, b = algorithm.model, batch()
    real = b.attention_mask[:, -b.response_width :].bool()
    with torch.no_grad():
        algorithm.pack_sequences = False
        padded, _ = algorithm.sequence_logprobs(model, b, temperature=1.0)
        algorithm.pack_sequences = True
        packed, _ = algorithm.sequence_logprobs(model, b, temperature=1.0)
    assert torch.allclose(padded[real], packed[real], atol=1e-5, rtol=0)


def test_micro_batches_by_rows_or_by_a_token_budget() -> None:
    b = batch()  # real lengths 37, 28, 44, 12
    algo = GRPO(micro_batch_size=3)
    assert [m.tolist() for m in algo.micro_batches(b)] == [[0, 1, 2], [3]]
    algo = GRPO(max_tokens_per_micro_batch=66)
    assert [m.tolist() for m in algo.micro_batches(b)] == [[0, 1], [2, 3]]
    assert [m.tolist() for m in algo.micro_batches(b, torch.tensor([2, 0, 3, 1]))] == [[2], [0, 3], [1]]
    algo = GRPO(max_tokens_per_micro_batch=10)  # every row longer than the budget: one pass each
    assert [m.tolist() for m in algo.micro_batches(b)] == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        GRPO(max_tokens_per_micro_batch=0)


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_changes_memory_not_gradients(tiny_model_dir: Path, packed: bool) -> None:
    from retool.policy import Policy

    b = batch()
    grads = []
    for checkpointing in (False, True):
        algo = GRPO(pack_sequences=packed)
        algo.model = Policy(str(tiny_model_dir), gradient_checkpointing=checkpointing).load_model().train()
        assert algo.model.is_gradient_checkpointing == checkpointing
        logprobs, _ = algo.sequence_logprobs(algo.model, b, temperature=1.0)
        (logprobs * b.response_mask).sum().backward()
        grads.append({n: p.grad for n, p in algo.model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_packed_and_padded_passes_agree_under_bf16_autocast(algorithm: GRPO) -> None:
    # trainer.precision: bf16-mixed runs the passes under autocast (fp32 weights, bf16 matrix products): the packed
    # pass agrees with the padded one to bf16 rounding (8 bits of mantissa), far closer than either is to fp32 noise.
    model, b = algorithm.model, batch()
    real = b.attention_mask[:, -b.response_width :].bool()
    out = {}
    for packed in (False, True):
        algorithm.pack_sequences = packed
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            out[packed], _ = algorithm.sequence_logprobs(model, b, temperature=1.0)
    assert out[True].dtype == torch.float32  # the head's log-softmax in fp32 either way
    assert torch.allclose(out[False][real], out[True][real], atol=0.05, rtol=0)


def test_batches_concatenated_are_the_batch_of_all_their_trajectories() -> None:
    # Each rank's batch has its own prompt and response widths; gathered, they must line up as if built together.
    trajectories = [trajectory(p, r, seed) for seed, (p, r) in enumerate(SHAPES)]
    rewards = [1.0, -1.0, 1.0, -1.0]
    whole = PolicyBatch.from_trajectories(trajectories, rewards, pad_id=0)
    parts = [PolicyBatch.from_trajectories(trajectories[i : i + 2], rewards[i : i + 2], pad_id=0) for i in (0, 2)]
    assert parts[0].input_ids.shape != parts[1].input_ids.shape
    for part in parts:
        part.advantages = torch.randn(part.response_mask.shape) * part.response_mask
        part.extra["per_row"] = torch.arange(part.size, dtype=torch.float32)
    joined = PolicyBatch.concat(parts, pad_id=0)
    for name in ("input_ids", "attention_mask", "response_mask", "rewards"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    for i, (part, row) in enumerate(((parts[0], 0), (parts[0], 1), (parts[1], 0), (parts[1], 1))):
        width = part.response_width
        assert torch.equal(joined.advantages[i, :width], part.advantages[row])
        assert not joined.advantages[i, width:].any()
    assert joined.extra["per_row"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert joined.old_logprobs is None  # no part had it


def test_rows_are_shared_among_ranks_by_tokens() -> None:
    rng = random.Random(0)
    for trial in range(200):
        ranks = rng.randint(1, 5)
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(ranks, 40))]
        shares = share_by_tokens(lengths, ranks)
        assert sorted(i for share in shares for i in share) == list(range(len(lengths)))  # each row once
        assert all(share and share == sorted(share) for share in shares)  # every rank has rows, in order
        loads = [sum(lengths[i] for i in share) for share in shares]
        assert max(loads) <= sum(lengths) / ranks + max(lengths), (trial, loads)
        assert share_by_tokens(lengths, ranks) == shares  # every rank computes the same
    # One long row and many short ones: the long row alone on one rank, the short ones on the other.
    assert share_by_tokens([100] + [10] * 9, 2) == [[0], list(range(1, 10))]
