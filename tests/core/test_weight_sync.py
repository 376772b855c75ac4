"""The algorithm pushes new weights to a rollout backend that holds its own copy, after every update only."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from retool import Policy, RolloutBackend
from retool.testing import EchoExecutor, ScriptedRollout
from retool_plugins.algorithms.grpo import GRPO
from retool_plugins.datasets.jsonl import JsonlProblems
from retool_plugins.rewards.math_answer import MathAnswerReward

RIGHT = "Compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code>\n<answer>\\boxed{42}</answer>"
WRONG = RIGHT.replace("{42}", "{41}")


class SyncedRollout(ScriptedRollout):
    """A scripted backend that says it keeps its own weights, and records every push."""

    needs_weight_sync = True  # type: ignore[assignment]  # a class attribute overrides the base's property

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pushed: list[dict[str, torch.Tensor]] = []

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.pushed.append({name: tensor.detach().clone() for name, tensor in state_dict.items()})


def _fit(tiny_model_dir: Path, tmp_path: Path, rollout: RolloutBackend, steps: int = 2) -> GRPO:
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "6*7?", "answer": 42}) + "\n" for i in range(4)))
    algorithm = GRPO(
        group_size=2,
        lr=1e-3,
        policy=Policy(str(tiny_model_dir)),
        rollout=rollout,
        executor=EchoExecutor(lambda code: "42\n"),
        reward=MathAnswerReward(),
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(algorithm, datamodule=JsonlProblems(path=str(problems), batch_size=2))
    return algorithm


def test_the_base_backend_shares_its_weights() -> None:
    assert ScriptedRollout("x").needs_weight_sync is False


def test_new_weights_are_pushed_after_each_update(tiny_model_dir: Path, tmp_path: Path) -> None:
    rollout = SyncedRollout([RIGHT, WRONG], max_new_tokens=64)
    algorithm = _fit(tiny_model_dir, tmp_path, rollout)
    assert algorithm.model is not None
    assert len(rollout.pushed) == 2  # one push per RL step
    final = algorithm.model.state_dict()
    assert rollout.pushed[-1].keys() == final.keys()
    assert all(torch.equal(rollout.pushed[-1][name], final[name]) for name in final)
    # The first push came after the first update: the weights had already moved from the initial ones.
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(rollout.pushed[0][name], initial[name]) for name in initial)


def test_no_push_when_the_update_was_skipped(tiny_model_dir: Path, tmp_path: Path) -> None:
    rollout = SyncedRollout([RIGHT, RIGHT], max_new_tokens=64)  # equal rewards: no signal, the update is skipped
    _fit(tiny_model_dir, tmp_path, rollout, steps=1)
    assert rollout.pushed == []


def test_no_push_to_a_backend_that_shares_the_module(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout = ScriptedRollout([RIGHT, WRONG], max_new_tokens=64)
    calls: list[int] = []
    monkeypatch.setattr(rollout, "load_weights", lambda state_dict: calls.append(1))
    _fit(tiny_model_dir, tmp_path, rollout, steps=1)
    assert calls == []
