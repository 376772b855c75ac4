"""Recipe errors are built from the recipe and the plugin signatures, not from jsonargparse's wording: they read
the same when another jsonargparse version words its errors differently (here: every message garbled)."""

from __future__ import annotations

from pathlib import Path

import jsonargparse
import pytest
import yaml

from retool.cli import main
from retool.cli.recipe import describe_type

RECIPE = {
    "trainer": {"max_steps": 1},
    "algorithm": {"class_path": "GRPO", "init_args": {"group_size": 2}},
    "rollout": {"class_path": "HFRollout"},
    "executor": {"class_path": "LocalSandbox"},
    "reward": {"class_path": "MathAnswerReward"},
    "data": {"class_path": "ArithmeticProblems"},
}


@pytest.fixture(params=["as installed", "garbled"])
def wording(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "garbled":
        real = jsonargparse.ArgumentParser.parse_args

        def garbled(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                return real(self, *args, **kwargs)
            except jsonargparse.ArgumentError:
                raise jsonargparse.ArgumentError(None, "something went wrong (a wording we have never seen)") from None

        monkeypatch.setattr(jsonargparse.ArgumentParser, "parse_args", garbled)
    return request.param


def _fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: dict, *args: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--recipe", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "never seen" not in err, err
    return " ".join(err.split())


@pytest.mark.parametrize(
    ("change", "args", "expected"),
    [
        ({"algorithm": {"class_path": "GRPO", "init_args": {"grup_size": 2}}}, [],
         "algorithm GRPO has no option 'grup_size'; did you mean 'group_size'?"),
        ({}, ["--executor.init_args.timeout", "4"],
         "executor LocalSandbox has no option 'timeout'; did you mean 'timeout_s'?"),
        ({}, ["--algorithm.init_args.group_size", "many"],
         "algorithm GRPO: option 'group_size' expects an int, got 'many'"),
        ({}, ["--algorithm.grup_size", "3"], "algorithm GRPO has no option 'grup_size'; did you mean 'group_size'?"),
        ({"executor": {"class_path": "LocalSandbox", "init_args": {"timeout_s": "fast"}}}, [],
         "executor LocalSandbox: option 'timeout_s' expects a float, got 'fast'"),
        ({"trainer": {"max_steps": "lots"}}, [], "trainer.max_steps expects an int, got 'lots'"),
        ({"trainer": {"max_stepz": 1}}, [], "trainer has no option 'max_stepz'; did you mean 'max_steps'?"),
        ({"policy": {"name_or_pth": "x"}}, [], "policy has no option 'name_or_pth'; did you mean 'name_or_path'?"),
        ({"rollout": {"class_path": "HFRollout", "init_args": {"temperature": [1]}}}, [],
         "rollout HFRollout: option 'temperature' expects a float, got [1]"),
        ({"data": {"class_path": "MathFamilies", "init_args": {"trace_style": "prose"}}}, [],
         "data MathFamilies: option 'trace_style' expects one of 'code', 'text', got 'prose'"),
    ],
)  # fmt: skip
def test_errors_name_section_plugin_option_and_type(wording, tmp_path, capsys, change, args, expected) -> None:
    assert expected in _fails(tmp_path, capsys, {**RECIPE, **change}, *args)


def test_a_base_option_is_checked_on_the_subclass(wording, tmp_path, capsys) -> None:
    # num_train is ArithmeticProblems' through its base (passed on with **kwargs): known, and typed.
    recipe = {**RECIPE, "data": {"class_path": "ArithmeticProblems", "init_args": {"num_train": 1.5}}}
    assert "data ArithmeticProblems: option 'num_train' expects an int, got 1.5" in _fails(tmp_path, capsys, recipe)


def test_types_in_words() -> None:
    assert describe_type(int) == "an int" and describe_type(float | None) == "a float or null"
    assert describe_type(list[str]) == "a list"
