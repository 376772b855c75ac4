"""Every recipe in recipes/ parses, names existing plugins and instantiates (no weights are loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retool import Algorithm, ProblemDataModule
from retool.algorithm import PolicyGradient
from retool.cli.recipe import build_parser, check_recipe, load_recipe
from retool.plugins import discover

ROOT = Path(__file__).parents[2] / "recipes"
RECIPES = sorted(ROOT.rglob("*.yaml"))


def test_there_are_recipes() -> None:
    names = {str(p.relative_to(ROOT)) for p in RECIPES}
    assert {"quickstart/sft.yaml", "quickstart/grpo.yaml"} <= names
    assert {f"mini-retool/{arm}-{stage}.yaml" for arm in ("code", "text") for stage in ("sft", "rl")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_instantiates(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a recipe starts with a comment: what it reproduces, hardware, the command"
    recipe = load_recipe(path)
    check_recipe(recipe, [], discover())
    parser = build_parser()
    cfg = parser.parse_args(["--recipe", str(path)])
    init = parser.instantiate(cfg)
    assert isinstance(init.algorithm, Algorithm) and isinstance(init.data, ProblemDataModule)
    assert init.algorithm.model is None  # weights load in configure_model, inside fit, not here
    for section in ("rollout", "executor", "reward"):
        assert getattr(init.algorithm, section) is getattr(init, section)  # the core linked them in
    assert init.algorithm.policy is init.policy
    if isinstance(init.algorithm, PolicyGradient):  # an RL run lasts: it keeps checkpoints (retool fit --resume)
        assert cfg.checkpoint_every > 0 and cfg.trainer.enable_checkpointing is not False
