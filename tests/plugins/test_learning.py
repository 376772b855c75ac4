"""GRPO, RLOO and PPO each make a policy learn: a tiny random model, a reward it can earn, a few dozen CPU steps.

The rollout samples the first token from the policy's two most likely (``top_k: 2``); the reward asks for the
less likely of the two, as the untrained policy ranks them for each prompt. So a random policy earns it a bit
less than half the time, and the share of that token within the pair can be read exactly from the logits,
before and after training, with no sampling noise in the measurement. Training must carry it far beyond what
different initial weights give.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from retool import Policy, Problem, Reward, RewardOutput, Trajectory
from retool.rollout.loop import prompt_token_ids
from retool.testing import InMemoryData
from retool_plugins.algorithms.grpo import GRPO
from retool_plugins.algorithms.ppo import PPO
from retool_plugins.algorithms.rloo import RLOO
from retool_plugins.rollout.hf import HFRollout

QUESTIONS = [f"Say something about the number {i}." for i in range(8)]


class FirstTokenIsTheAnswer(Reward):
    """+1 when the first token the model wrote is the token whose id is the problem's answer, else -1."""

    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        hit = [
            len(t.token_ids) > t.prompt_len and t.token_ids[t.prompt_len] == int(p.answer)
            for t, p in zip(trajectories, problems)
        ]
        return RewardOutput([1.0 if h else -1.0 for h in hit], components={"correct": [float(h) for h in hit]})


def first_logits(model: torch.nn.Module, rollout: HFRollout, problem: Problem) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([prompt_token_ids(rollout, problem)])
        return model(input_ids=ids).logits[0, -1].float()


def targets(model: torch.nn.Module, rollout: HFRollout) -> tuple[list[Problem], list[tuple[int, int]]]:
    """One problem per question, whose answer is the second most likely first token; and each (target, other) pair."""
    problems, pairs = [], []
    for i, question in enumerate(QUESTIONS):
        top = first_logits(model, rollout, Problem(f"p{i}", question, "")).topk(2).indices.tolist()
        problems.append(Problem(f"p{i}", question, str(top[1])))
        pairs.append((top[1], top[0]))
    return problems, pairs


def share(model: torch.nn.Module, rollout: HFRollout, problems: list[Problem], pairs: list[tuple[int, int]]) -> float:
    """The target's share of its pair's probability, averaged over the problems."""
    total = 0.0
    for problem, (target, other) in zip(problems, pairs):
        logits = first_logits(model, rollout, problem)
        total += float(torch.softmax(logits[[target, other]], dim=-1)[0])
    return total / len(problems)


def train(algorithm_cls: type, tiny_model_dir: Path, tmp_path: Path, steps: int, **options: Any) -> tuple[float, float]:
    L.seed_everything(0, verbose=False)
    rollout = HFRollout(max_new_tokens=1, tools=False, temperature=1.0, top_k=2, seed=0)
    algorithm = algorithm_cls(
        policy=Policy(str(tiny_model_dir)), rollout=rollout, reward=FirstTokenIsTheAnswer(), group_size=4,
        micro_batch_size=16, **options,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    algorithm.configure_model()
    problems, pairs = targets(algorithm.model, rollout)
    before = share(algorithm.model, rollout, problems, pairs)
    trainer.fit(algorithm, datamodule=InMemoryData(train=problems, batch_size=4, seed=0))
    return before, share(algorithm.model, rollout, problems, pairs)


def test_the_measure_moves_little_between_random_policies(tokenizer_dir: Path, tmp_path: Path) -> None:
    """The measure's spread over random policies: three initializations all start under a half."""
    from conftest import _tiny_llama

    rollout = HFRollout(max_new_tokens=1, tools=False)
    values = []
    for seed in range(3):
        folder = _tiny_llama(tokenizer_dir, tmp_path / f"m{seed}", seed=seed)
        model = Policy(str(folder)).load_model()
        rollout.bind(model, Policy(str(folder)).load_tokenizer())
        values.append(share(model, rollout, *targets(model, rollout)))
    assert all(0.3 < v < 0.5 for v in values), values  # the runner-up's share: under a half


@pytest.mark.parametrize(
    ("algorithm", "options"),
    [
        (GRPO, {"lr": 3e-3}),
        (RLOO, {"lr": 3e-3}),
        (PPO, {"lr": 3e-3, "critic_lr": 3e-3, "critic_warmup": 0}),
    ],
    ids=["GRPO", "RLOO", "PPO"],
)
def test_the_rewarded_behaviour_becomes_likely(algorithm: type, options: dict, tiny_model_dir: Path, tmp_path: Path):
    before, after = train(algorithm, tiny_model_dir, tmp_path, steps=25, **options)
    assert 0.3 < before < 0.5
    assert after > 0.8, (before, after)
