"""The paper-scale recipes (recipes/paper/) against the code and the models they name, without GPUs or network:
each parses, type-checks and instantiates every plugin (test_recipes.py does that for every recipe), prints its
configuration, says what it reproduces, and fits its base model, built from its configuration on the meta
device (shapes only, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from retool.cli import main
from retool.cli.recipe import build_parser

ROOT = Path(__file__).parents[2]
PAPER = sorted((ROOT / "recipes" / "paper").glob("*.yaml"))
CONFIGS = ROOT / "tests" / "fixtures" / "model_configs"
# recipe -> its base model (the fixture holding that model's configuration) and that model's size in parameters
BASES = {
    "qwen2.5-32b-sft.yaml": ("qwen2.5-32b-instruct", 32.76e9),
    "qwen2.5-32b-ppo.yaml": ("qwen2.5-32b-instruct", 32.76e9),
    "qwen2.5-32b-text-rl.yaml": ("qwen2.5-32b-instruct", 32.76e9),
    "qwen2.5-32b-grpo.yaml": ("qwen2.5-32b-instruct", 32.76e9),
    "r1-distill-qwen-32b-ppo.yaml": ("deepseek-r1-distill-qwen-32b", 32.76e9),
    "qwen2.5-7b-sft.yaml": ("qwen2.5-7b-instruct", 7.62e9),
    "qwen2.5-7b-grpo.yaml": ("qwen2.5-7b-instruct", 7.62e9),
}
HUB = {
    "qwen2.5-32b-instruct": "Qwen/Qwen2.5-32B-Instruct",
    "deepseek-r1-distill-qwen-32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
}


def test_every_paper_recipe_is_covered() -> None:
    assert sorted(p.name for p in PAPER) == sorted(BASES)


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_paper_recipe_header_config_and_model(path: Path, capsys) -> None:
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for needed in ("Hardware:", "Expected time:", f"recipes/paper/{path.name}"):
        assert needed in header, f"{path.name}: the header must say {needed!r}"
    assert "Paper:" in header or "Reference:" in header or "verl reports" in header  # the number it aims at

    assert main(["fit", "--recipe", str(path), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["accelerator"] == "gpu" and printed["trainer"]["precision"] == "bf16-mixed"
    assert printed["trainer"]["strategy"] == "fsdp2"

    cfg = build_parser().parse_args(["--recipe", str(path)])
    policy = cfg.policy
    assert policy.gradient_checkpointing is True  # 16k-token sequences: the requirement
    assert policy.dtype == "float32"  # fp32 master weights under bf16 autocast

    fixture, size = BASES[path.name]
    config = AutoConfig.from_pretrained(CONFIGS / fixture)
    # The hub model itself, or a previous stage's export whose base the recipe names.
    assert policy.name_or_path == HUB[fixture] or (policy.name_or_path.startswith("runs/") and HUB[fixture] in text)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert abs(sum(p.numel() for p in model.parameters()) - size) / size < 0.01
    model.gradient_checkpointing_enable()  # the recipe's setting applies to this architecture
    assert model.is_gradient_checkpointing

    rollout = cfg.rollout.init_args
    if rollout.get("max_model_len") is not None:
        # The context vLLM is sized for holds a prompt and the whole response budget, within the model's.
        assert rollout["max_model_len"] >= rollout["max_new_tokens"] + 1024
        assert rollout["max_model_len"] <= config.max_position_embeddings

    data = cfg.data.init_args
    assert data["eval_sets"] == ["aime24", "aime25"] and data["eval_protocol"] == "paper"
    algorithm = cfg.algorithm.init_args
    if cfg.algorithm.class_path.endswith(("PPO", "GRPO")):
        assert algorithm["lr"] == 1e-6 and algorithm["kl_coef"] == 0.0
        assert algorithm["mini_batch_size"] <= data["batch_size"] * algorithm["group_size"]
        world = cfg.trainer.devices * cfg.trainer.num_nodes
        assert data["batch_size"] % world == 0  # every rank takes an equal share of a step's problems


def test_the_ppo_recipe_has_the_papers_hyperparameters() -> None:
    cfg = build_parser().parse_args(["--recipe", str(ROOT / "recipes" / "paper" / "qwen2.5-32b-ppo.yaml")])
    ppo = cfg.algorithm.init_args
    assert cfg.algorithm.class_path.endswith("PPO")
    assert (ppo["lr"], ppo["kl_coef"], ppo["mini_batch_size"]) == (1e-6, 0.0, 512)  # paper §2.3.2
    assert cfg.rollout.init_args["max_new_tokens"] == 16384 and cfg.trainer.max_steps == 400
    assert json.loads(json.dumps(cfg.data.init_args["eval_sets"])) == ["aime24", "aime25"]
