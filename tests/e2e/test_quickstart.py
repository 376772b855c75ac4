"""The real quickstart in miniature, end to end (CI runs it): SmolLM2-135M-Instruct, SFT on MathFamilies
code traces with evaluation before and after, then one GRPO step with real code execution from its export,
``retool report`` over both runs, and one PPO step from the same export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retool.cli import main

ROOT = Path(__file__).parents[2]
SMALL = ["--data.init_args.num_val", "4", "--algorithm.init_args.eval_batch_size", "4"]


@pytest.mark.slow
def test_two_stages_of_the_quickstart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "grpo"
    recipes = ROOT / "recipes" / "quickstart"
    code = main(
        ["fit", "--recipe", str(recipes / "sft.yaml"), "--trainer.max_epochs", "1", "--trainer.max_steps", "2",
         "--run_dir", str(sft_dir), *SMALL]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    steps = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and steps[0]["train/tokens"] > 0
    evals = [json.loads(line) for line in (sft_dir / "evaluation.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval/problems"] == 4 for e in evals)
    assert "evaluation on held-out problems" in out

    code = main(
        ["fit", "--recipe", str(recipes / "grpo.yaml"), "--trainer.max_steps", "1",
         "--algorithm.init_args.eval_every", "1", "--policy.name_or_path", str(sft_dir / "policy"),
         "--run_dir", str(rl_dir), *SMALL]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    (step,) = [json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1
    assert step["response/model_tokens"] > 0 and step["perf/generate_tokens_per_s"] > 0
    assert -1 <= step["reward/mean"] <= 1
    samples = [json.loads(line) for line in (rl_dir / "trajectories.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] and "response" in s for s in samples)
    (final,) = [json.loads(line) for line in (rl_dir / "evaluation.jsonl").read_text().splitlines()]
    assert final["step"] == 1 and 0 <= final["eval/accuracy"] <= 1

    from transformers import AutoModelForCausalLM

    assert not list(sft_dir.rglob("*.ckpt"))  # a short stage (checkpoint_every: 0): its export is what it keeps
    assert (rl_dir / "checkpoints" / "last.ckpt").resolve() == (rl_dir / "checkpoints" / "step=1.ckpt")  # at the end

    model = AutoModelForCausalLM.from_pretrained(rl_dir / "policy")
    assert model.config.num_hidden_layers == 30

    assert main(["report", str(sft_dir), str(rl_dir)]) == 0
    assert (sft_dir / "report" / "evaluation.png").is_file() and (rl_dir / "report" / "trajectories.html").is_file()

    # The same stage with PPO: a critic copied from the SFT policy trains beside it and is exported next to it.
    ppo_dir = tmp_path / "ppo"
    code = main(
        ["fit", "--recipe", str(recipes / "ppo.yaml"), "--trainer.max_steps", "1",
         "--algorithm.init_args.eval_every", "1", "--algorithm.init_args.critic_warmup", "0",
         "--policy.name_or_path", str(sft_dir / "policy"), "--run_dir", str(ppo_dir), *SMALL]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    (step,) = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert step["train/policy_updated"] == 1 and step["train/value_loss"] > 0 and step["train/critic_grad_norm"] > 0
    assert "v loss" in out and "ev" in out  # the step table's critic columns
    assert (ppo_dir / "policy" / "config.json").is_file() and (ppo_dir / "critic" / "value_head.safetensors").is_file()
