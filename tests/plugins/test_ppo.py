"""PPO: GAE over the model's own tokens against hand-computed values, the critic's loss and gradients, warm-up,
checkpoints and export. Each GAE case is a failure a peer shipped once (verl PR 2337 and issue 7278, slime issue
1370, miles PR 1827)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from retool import Policy, Problem
from retool.algorithm import PolicyBatch
from retool.testing import EchoExecutor, InMemoryData, ScriptedRollout
from retool_plugins.algorithms.ppo import PPO, ValueModel
from retool_plugins.algorithms.ppo._gae import explained_variance, masked_gae, outcome_rewards, value_loss
from retool_plugins.algorithms.rloo import leave_one_out
from retool_plugins.rewards.math_answer import MathAnswerReward

T = torch.tensor


def gae(rewards: list[float], values: list[float], mask: list[int], gamma: float, lam: float, outcome: float):
    token_rewards = T([rewards]) + outcome_rewards(T([outcome]), T([mask]))
    advantages, returns = masked_gae(token_rewards, T([values]), T([mask]), gamma, lam)
    return advantages[0].tolist(), returns[0].tolist()


def test_interpreter_tokens_are_skipped_not_steps() -> None:
    """An interpreter block in the middle and one at the end. Their values (9), their rewards (-5: say, a KL term
    of tool tokens, slime 1370) and their count never enter: compressed, the steps are r = [-0.1, -0.1, 0.9]
    (the outcome 1 lands on the last model token), V = [0.5, 0.2, 0.4]; with gamma = lam = 0.5:
    A2 = 0.9 - 0.4 = 0.5; A1 = -0.1 + 0.5 * 0.4 - 0.2 + 0.25 * 0.5 = 0.025; A0 = -0.1 + 0.5 * 0.2 - 0.5 + 0.25 *
    0.025 = -0.49375. Returns are A + V."""
    advantages, returns = gae(
        rewards=[-0.1, -0.1, -5, -5, -0.1, -5], values=[0.5, 0.2, 9, 9, 0.4, 9], mask=[1, 1, 0, 0, 1, 0],
        gamma=0.5, lam=0.5, outcome=1.0,
    )  # fmt: skip
    assert advantages == pytest.approx([-0.49375, 0.025, 0, 0, 0.5, 0])
    assert returns == pytest.approx([0.00625, 0.225, 0, 0, 0.9, 0])


@pytest.mark.parametrize("gap", [1, 5])
def test_an_interpreter_block_costs_one_step_whatever_its_length(gap: int) -> None:
    """miles 1827: across a block, one factor of gamma * lam, not one per interpreter token."""
    mask = [1] + [0] * gap + [1]
    advantages, _ = gae([0.0] * len(mask), [0.0] * len(mask), mask, gamma=0.9, lam=0.5, outcome=2.0)
    assert advantages[-1] == pytest.approx(2.0) and advantages[0] == pytest.approx(0.9)


def test_the_outcome_reaches_every_turn() -> None:
    """verl 7278: a return reset at each masked token left only the last turn with the outcome."""
    advantages, returns = gae([0.0] * 6, [0.0] * 6, [1, 1, 0, 0, 1, 1], gamma=1.0, lam=1.0, outcome=1.0)
    assert advantages == [1, 1, 0, 0, 1, 1] and returns == [1, 1, 0, 0, 1, 1]


def test_a_masked_tail_neither_delays_nor_drops_the_reward() -> None:
    """miles 1827: with gamma = 0 a reward put after the last model token (on the tail) would be lost."""
    advantages, _ = gae([0.1, 0.2, 0.3, 7, 7], [0.5, -0.2, 0.3, 0, 0], [1, 1, 1, 0, 0], gamma=0.0, lam=0.0, outcome=10)
    assert advantages == pytest.approx([-0.4, 0.4, 10.0, 0, 0])


def test_a_length_cut_is_terminal_without_bootstrap() -> None:
    """A trajectory cut by its token budget: the last token is terminal (no value after it), its reward counts."""
    values, rewards = [0.3, -0.2, 0.5, 0.1], [0.0, 0.1, 0.0, 0.2]
    advantages, returns = gae(rewards, values, [1, 1, 1, 1], gamma=1.0, lam=1.0, outcome=-1.0)
    tail = [sum(rewards[t:]) - 1.0 for t in range(4)]
    assert advantages == pytest.approx([tail[t] - values[t] for t in range(4)]) and returns == pytest.approx(tail)


def test_padding_rows_and_rows_without_model_tokens() -> None:
    mask = T([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])  # right padding; a block then padding; nothing written
    rewards = outcome_rewards(T([1.0, -1.0, 5.0]), mask)
    assert rewards.tolist() == [[0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 0]]
    advantages, returns = masked_gae(rewards, torch.full((3, 4), 0.25), mask, 1.0, 1.0)
    assert advantages.tolist() == [[0.75, 0.75, 0, 0], [-1.25, 0, -1.25, 0], [0, 0, 0, 0]]
    assert returns.tolist() == [[1, 1, 0, 0], [-1, 0, -1, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("clip", [None, 0.2])
def test_no_gradient_reaches_the_critic_from_masked_tokens(clip: float | None) -> None:
    mask = T([[1.0, 0.0, 1.0, 0.0]])
    values = T([[0.1, 3.0, -0.2, 7.0]], requires_grad=True)
    loss, _ = value_loss(values, T([[0.0, 0.0, 0.0, 0.0]]), T([[1.0, 9.0, 1.0, -9.0]]), mask, clip)
    loss.backward()
    assert values.grad is not None
    assert values.grad[0, 1] == 0 and values.grad[0, 3] == 0 and values.grad[0, 0] != 0 and values.grad[0, 2] != 0


def test_value_clipping_bounds_the_step_from_the_old_value() -> None:
    new, old, target = T([[1.0]]), T([[0.0]]), T([[1.0]])
    loss, clipped = value_loss(new, old, target, T([[1.0]]), clip=0.2)
    assert float(loss) == pytest.approx(0.5 * 0.8**2) and float(clipped) == 1  # the clipped error is the larger
    assert explained_variance(0.0, 2 / 3) == 1.0 and explained_variance(2 / 3, 2 / 3) == 0.0
    # Every answer wrong: returns of -1 (up to float rounding) and values near it. No variance to explain.
    returns = torch.full((2, 3), -1.0) + T([[0.0, 1e-7, 0.0], [0.0, 0.0, -1e-7]])
    errors = returns - torch.full((2, 3), -0.9)
    assert math.isnan(explained_variance(float(errors.var(unbiased=False)), float(returns.var(unbiased=False))))
    assert math.isnan(explained_variance(math.nan, math.nan))  # no model-written token at all


def test_rloo_baseline_leaves_each_trajectory_out() -> None:
    assert leave_one_out(T([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3).tolist() == pytest.approx([1.0, -0.5, -0.5, 0, 0, 0])


# ---- PPO in a run -----------------------------------------------------------------------------------------------

PROBLEMS = [Problem(f"p{i}", f"What is 6 * 7 ({i})?", "42") for i in range(4)]
SCRIPT = ["Compute.\n```python\nprint(6 * 7)\n```\n<answer>\\boxed{42}</answer>", "<answer>\\boxed{41}</answer>"]


def _run(tiny_model_dir: Path, tmp_path: Path, steps: int, **options) -> tuple[PPO, L.Trainer]:
    rollout = ScriptedRollout(SCRIPT, max_new_tokens=48)
    ppo = PPO(
        policy=Policy(str(tiny_model_dir)), rollout=rollout, executor=EchoExecutor(lambda code: "42\n"),
        reward=MathAnswerReward(), group_size=2, lr=1e-3, critic_lr=1e-3, micro_batch_size=2, **options,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(ppo, datamodule=InMemoryData(train=PROBLEMS, batch_size=2))
    return ppo, trainer


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_during_critic_warmup_only_the_critic_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    policy_before = _weights(Policy(str(tiny_model_dir)).load_model())
    ppo, trainer = _run(tiny_model_dir, tmp_path, steps=2, critic_warmup=2)
    assert trainer.global_step == 2  # two optimizers, one RL step each
    assert all(torch.equal(a, b) for a, b in zip(policy_before, _weights(ppo.model)))
    assert ppo.last_step is not None and ppo.last_step.metrics["train/policy_updated"] == 0
    assert ppo.last_step.metrics["train/critic_grad_norm"] > 0 and ppo.last_step.metrics["train/value_loss"] > 0
    ppo, trainer = _run(tiny_model_dir, tmp_path, steps=3, critic_warmup=2)
    assert ppo.last_step is not None and ppo.last_step.metrics["train/policy_updated"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(policy_before, _weights(ppo.model)))


def test_the_critic_is_checkpointed_and_exported_beside_the_policy(tiny_model_dir: Path, tmp_path: Path) -> None:
    ppo, trainer = _run(tiny_model_dir, tmp_path, steps=1, critic_warmup=0)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert any(key.startswith("critic.head.") for key in state["state_dict"])
    assert any(key.startswith("critic.backbone.") for key in state["state_dict"])
    assert len(state["optimizer_states"]) == 2  # the policy's and the critic's
    ppo.export(tmp_path / "policy")
    assert (tmp_path / "policy" / "config.json").is_file() and (
        tmp_path / "critic" / "value_head.safetensors"
    ).is_file()
    reloaded = ValueModel.load(str(tmp_path / "critic"))
    assert ppo.critic is not None
    ids, attention = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, attention, 3), ppo.critic(ids, attention, 3), atol=1e-6)


def test_ppo_logs_the_critics_numbers_every_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    ppo, _ = _run(tiny_model_dir, tmp_path, steps=1, critic_warmup=0)
    assert ppo.last_step is not None
    metrics = ppo.last_step.metrics
    for key in ("train/value_loss", "train/explained_variance", "train/value_mean", "train/vpred_mean",
                "train/value_clip_frac", "train/advantage_mean", "train/advantage_std", "train/return_mean",
                "train/return_std", "train/critic_grad_norm", "train/grad_norm", "train/policy_loss"):  # fmt: skip
        assert key in metrics, key
    # gamma = lam = 1: every model token's return is its trajectory's reward, +1 or -1, so std = sqrt(1 - mean^2)
    mean = metrics["train/return_mean"]
    assert -1 < mean < 1 and metrics["train/return_std"] == pytest.approx((1 - mean**2) ** 0.5, abs=1e-5)


def test_a_batch_slices_its_extra_tensors_with_its_rows() -> None:
    batch = PolicyBatch(
        input_ids=torch.zeros(3, 4, dtype=torch.long), attention_mask=torch.ones(3, 4, dtype=torch.long),
        response_mask=torch.ones(3, 2), rewards=T([1.0, 2.0, 3.0]), values=T([[1.0, 1], [2, 2], [3, 3]]),
        extra={"baseline": T([10.0, 20.0, 30.0])},
    )  # fmt: skip
    part = batch.select(T([2, 0]))
    assert part.extra["baseline"].tolist() == [30.0, 10.0] and part.values is not None
    assert part.values[:, 0].tolist() == [3.0, 1.0] and part.rewards.tolist() == [3.0, 1.0]


def test_every_ppo_option_is_documented_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from retool.cli import main

    assert main(["fit", "--algorithm", "PPO", "--algorithm.help", "PPO"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in ("gamma", "lam", "value_clip", "critic_lr", "critic_warmup", "critic_name_or_path",
                   "critic_micro_batch_size", "kl_penalty", "normalize_advantages", "clip_high", "lr"):  # fmt: skip
        assert f"--algorithm.{option} " in out, option
    assert "Steps at the start of a run during which only the critic trains" in out
