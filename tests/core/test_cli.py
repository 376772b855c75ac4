"""The retool command: errors that name the fix (before any model loads), and a full run on a tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from processes import descendants

from retool.cli import main

TINY_RECIPE = {
    "seed_everything": 1,
    "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "enable_checkpointing": False},
    "algorithm": {
        "class_path": "GRPO",
        "init_args": {"group_size": 2, "lr": 1e-3, "epochs": 2, "mini_batch_size": 2, "micro_batch_size": 1},
    },
    "rollout": {
        "class_path": "retool.testing.ScriptedRollout",
        "init_args": {
            "script": [
                "Compute.\n<code>\n```python\nx = 6 * 7\nprint(x)\n```\n</code>\n<answer>\\boxed{42}</answer>",
                "Compute.\n<code>\n```python\nx = 6 * 7\nprint(x)\n```\n</code>\n<answer>\\boxed{41}</answer>",
            ],
            "max_new_tokens": 64,
        },
    },
    "executor": {"class_path": "LocalSandbox", "init_args": {"timeout_s": 5}},
    "reward": {"class_path": "MathAnswerReward"},
    "data": {"class_path": "JsonlProblems", "init_args": {"path": "PROBLEMS", "batch_size": 2}},
}


@pytest.fixture(autouse=True)
def problems_file(tmp_path: Path) -> None:
    """Problems whose answer is 42, so that one of the two scripted responses is right and one wrong."""
    path = tmp_path / "problems.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"What is 6*7 ({i})?", "answer": 42}) + "\n" for i in range(4))
    )
    TINY_RECIPE["data"]["init_args"]["path"] = str(path)


def _write(tmp_path: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def test_unknown_class_names_the_nearest_match_and_the_list(tmp_path: Path, capsys) -> None:
    recipe = {**TINY_RECIPE, "executor": {"class_path": "LocalSandbx"}}
    _fails(
        ["fit", "--recipe", str(_write(tmp_path, recipe))],
        capsys,
        "unknown executor 'LocalSandbx'",
        "did you mean 'LocalSandbox'",
        "available: ",
        "LocalSandbox",
    )


def test_unknown_class_on_the_command_line(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    _fails(["fit", "--recipe", path, "--algorithm", "GRPPO"], capsys, "unknown algorithm 'GRPPO'", "'GRPO'")


def test_missing_recipe_file(tmp_path: Path, capsys) -> None:
    _write(tmp_path, TINY_RECIPE, "quickstart.yaml")
    _fails(["fit", "--recipe", str(tmp_path / "quikstart.yaml")], capsys, "does not exist", "quickstart.yaml")


def test_yaml_syntax_error_gives_the_line(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, "trainer:\n  max_steps: 2\nalgorithm: {class_path: GRPO\nrollout: x\n")
    # The parser trips on line 4; the brace left open on line 3 is the mistake, so both are named.
    _fails(["fit", "--recipe", str(path)], capsys, "not valid YAML", "line 4", "opens at line 3")


def test_a_value_of_the_wrong_type_names_its_section_option_and_type(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    expected = "algorithm GRPO: option 'group_size' expects an int, got 'many'"
    err = _fails(["fit", "--recipe", path, "--algorithm.init_args.group_size", "many"], capsys, expected)
    assert "Union" not in err and "Given value" not in err  # jsonargparse's internals stay out of it
    executor = {"class_path": "LocalSandbox", "init_args": {"timeout_s": "fast"}}
    recipe = str(_write(tmp_path, {**TINY_RECIPE, "executor": executor}, "r2.yaml"))
    _fails(["fit", "--recipe", recipe], capsys, "executor LocalSandbox: option 'timeout_s' expects a float, got 'fast'")
    trainer = {**TINY_RECIPE["trainer"], "max_steps": "lots"}
    recipe = str(_write(tmp_path, {**TINY_RECIPE, "trainer": trainer}, "r3.yaml"))
    _fails(["fit", "--recipe", recipe], capsys, "trainer.max_steps expects an int, got 'lots'")


def test_a_section_of_the_wrong_shape_says_what_shape(tmp_path: Path, capsys) -> None:
    recipe = str(_write(tmp_path, {**TINY_RECIPE, "policy": ["tiny"]}))
    _fails(["fit", "--recipe", recipe], capsys, "recipe section 'policy' must be a mapping of options", "got a list")
    recipe = str(_write(tmp_path, {**TINY_RECIPE, "reward": [1]}, "r2.yaml"))
    _fails(["fit", "--recipe", recipe], capsys, "recipe section 'reward' must name a plugin")


def test_a_misspelled_trainer_or_policy_option_names_the_nearest(tmp_path: Path, capsys) -> None:
    trainer = {**TINY_RECIPE["trainer"], "max_stepz": 2}
    recipe = str(_write(tmp_path, {**TINY_RECIPE, "trainer": trainer}))
    _fails(["fit", "--recipe", recipe], capsys, "trainer has no option 'max_stepz'; did you mean 'max_steps'?")
    path = str(_write(tmp_path, TINY_RECIPE, "r2.yaml"))
    _fails(["fit", "--recipe", path, "--trainer.max_stepz", "3"], capsys, "did you mean 'max_steps'?")
    recipe = str(_write(tmp_path, {**TINY_RECIPE, "policy": {"name_or_pth": "x"}}, "r3.yaml"))
    _fails(["fit", "--recipe", recipe], capsys, "policy has no option 'name_or_pth'; did you mean 'name_or_path'?")


def test_a_missing_policy_folder_fails_before_the_run_directory_exists(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    run_dir = tmp_path / "run"
    args = ["fit", "--recipe", path, "--policy.name_or_path", str(tmp_path / "nope"), "--run_dir", str(run_dir)]
    _fails(args, capsys, f"policy folder '{tmp_path / 'nope'}' does not exist")
    assert not run_dir.exists()


def test_unknown_key(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    recipe = {**TINY_RECIPE, "algorithm": {"class_path": "GRPO", "init_args": {"grup_size": 4}}}
    # A misspelled option, in the recipe or on the command line: the nearest real one, and the list.
    _fails(
        ["fit", "--recipe", str(_write(tmp_path, recipe, "r2.yaml"))],
        capsys,
        "algorithm GRPO has no option 'grup_size'; did you mean 'group_size'?",
        "clip_high",  # GRPO's own options ...
        "eval_every",  # ... and those it passes on to the Algorithm base
    )
    _fails(
        ["fit", "--recipe", path, "--data.init_args.batch_sise", "4"],
        capsys,
        "data JsonlProblems has no option 'batch_sise'; did you mean 'batch_size'?",
    )
    _fails(
        ["validate", "--recipe", path, "--executor.init_args.timeout", "4"],
        capsys,
        "executor LocalSandbox has no option 'timeout'; did you mean 'timeout_s'?",
    )
    _fails(
        ["fit", "--recipe", str(_write(tmp_path, {**TINY_RECIPE, "trainr": {}}, "r3.yaml"))],
        capsys,
        "unknown recipe section 'trainr'",
        "did you mean 'trainer'",
    )


def test_invalid_value_caught_by_a_constructor(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    _fails(["fit", "--recipe", path, "--algorithm.init_args.group_size", "1"], capsys, "group_size >= 2")


BUGGY_PLUGIN = """
from retool_plugins.datasets.jsonl import JsonlProblems


class BuggyProblems(JsonlProblems):
    \"\"\"A dataset plugin with a bug in its constructor.

    Args:
        path: The file.
        batch_size: Problems per step.
    \"\"\"

    def __init__(self, path: str, batch_size: int = 2) -> None:
        super().__init__(path=path, batch_size=batch_size)
        self.columns = {}["question"]  # the bug: a KeyError, nothing a recipe value could fix
"""


def test_a_bug_in_a_plugins_constructor_shows_its_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "buggy_plugin.py").write_text(BUGGY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "class_path": "buggy_plugin.BuggyProblems"}}
    with pytest.raises(KeyError, match="question"):  # main re-raises: Python prints the traceback, exit 1
        main(["fit", "--recipe", str(_write(tmp_path, recipe))])
    err = capsys.readouterr().err
    assert "setting up the run failed: KeyError: 'question' (the traceback follows)" in " ".join(err.split())
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback_of_a_recipe_error_too(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    args = ["fit", "--recipe", path, "--algorithm.init_args.group_size", "1"]
    with pytest.raises(ValueError, match="group_size >= 2"):
        main(["--debug", *args])
    assert main(args) == 2  # without --debug: the one line
    assert "Traceback" not in capsys.readouterr().err


def test_missing_executor_fails_before_the_model_loads(tmp_path: Path, capsys) -> None:
    recipe = {k: v for k, v in TINY_RECIPE.items() if k != "executor"}
    recipe["policy"] = {"name_or_path": str(tmp_path / "never-loaded")}  # loading it would fail differently
    _fails(["fit", "--recipe", str(_write(tmp_path, recipe))], capsys, "no executor section", "tools: false")


def test_print_config_resolves_overrides(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    assert main(["fit", "--recipe", path, "--algorithm.init_args.group_size", "8", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["algorithm"]["init_args"]["group_size"] == 8
    assert printed["executor"]["class_path"].endswith("LocalSandbox")
    assert "policy" not in printed["algorithm"]["init_args"]  # injected by the core, not a user key


def test_print_config_first_still_shows_later_overrides(tmp_path: Path, capsys) -> None:
    path = str(_write(tmp_path, TINY_RECIPE))
    assert main(["fit", "--print_config", "--recipe", path, "--algorithm.init_args.group_size", "6"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["algorithm"]["init_args"]["group_size"] == 6


def test_a_plugins_help_needs_no_recipe(capsys) -> None:
    assert main(["fit", "--algorithm.help", "GRPO"]) == 0
    out = capsys.readouterr().out
    assert "clip_high" in out and "group_size" in out


def test_plugins_command_lists_kinds(capsys) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for text in ("executor", "LocalSandbox", "algorithm", "GRPO", "retool_plugins.rollout.hf.HFRollout"):
        assert text in out


def test_fit_end_to_end_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    path = str(_write(tmp_path, TINY_RECIPE))
    before = descendants()
    code = main(["fit", "--recipe", path, "--policy.name_or_path", str(tiny_model_dir), "--run_dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    # The sandbox's sessions and the reward's checker processes end with the run: a caller that lives on (a
    # notebook, a sweep driver) inherits nothing.
    assert descendants() == before
    assert "run directory" in out and str(run_dir) in out
    # The console: a header, one row per step with the step's numbers, then the summary table.
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["step", "reward"])
    for column in ("acc", "tokens", "calls", "cell ok", "gen s", "tool s", "upd s", "tok/s"):
        assert column in header
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:  # reward 0 (one of two answers right), accuracy 0.5, one call and a cell that ran
        assert float(row[1]) == 0.0 and float(row[2]) == 0.5 and float(row[4]) == 1.0 and float(row[5]) == 1.0
    assert "run summary" in out and "policy (Hugging Face format)" in out

    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["policy"]["name_or_path"] == str(tiny_model_dir) and saved["seed_everything"] == 1
    assert "torch" in json.loads((run_dir / "versions.json").read_text())
    assert (run_dir / "seed.txt").read_text().strip() == "1"

    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]  # global_step counts RL steps, not optimizer steps
    for s in steps:
        assert s["train/optimizer_steps"] == 4  # 2 epochs x (4 trajectories / mini-batch 2)
        assert s["tools/calls"] == 1 and s["tools/cell_ok"] == 1  # the scripted cell really ran
        assert s["reward/mean"] == 0 and s["reward/correct"] == 0.5  # 42 right, 41 wrong: a learning signal
    samples = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    assert samples and "<interpreter>\n42\n</interpreter>" in samples[0]["response"]
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any((a - b).abs().max() > 0 for a, b in zip(exported.parameters(), original.parameters()))
    assert changed, "two GRPO steps with lr 1e-3 left every weight unchanged"


def test_ctrl_c_exports_the_policy_and_exits_130(tmp_path: Path, tiny_model_dir: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    recipe = {**TINY_RECIPE, "trainer": {**TINY_RECIPE["trainer"], "max_steps": 10_000}}
    cmd = [sys.executable, "-m", "retool.cli", "fit", "--recipe", str(_write(tmp_path, recipe)),
           "--policy.name_or_path", str(tiny_model_dir), "--run_dir", str(run_dir)]  # fmt: skip
    # As from a terminal: a pytest started in the background of a script passes SIGINT on as ignored.
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=restore)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file():  # wait for a finished step
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted after" in out and "Traceback" not in out
    assert (run_dir / "policy-interrupted" / "config.json").is_file()


def test_trainer_log_probs_match_the_sampler(tmp_path: Path, tiny_model_dir: Path) -> None:
    """HFRollout's log-probs (temperature-scaled) equal the trainer's recomputation of the same tokens."""
    recipe = {
        **TINY_RECIPE,
        "algorithm": {"class_path": "GRPO", "init_args": {"group_size": 2, "kl_coef": 0.1, "lr": 1e-3}},
        "rollout": {"class_path": "HFRollout", "init_args": {"max_new_tokens": 16, "temperature": 0.7}},
        "trainer": {**TINY_RECIPE["trainer"], "max_steps": 1},
    }
    run_dir = tmp_path / "run"
    args = ["fit", "--recipe", str(_write(tmp_path, recipe)), "--policy.name_or_path", str(tiny_model_dir)]
    assert main([*args, "--run_dir", str(run_dir)]) == 0
    (step,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert step["train/skipped"] == 0  # the KL term always has a gradient
    assert step["train/sampler_logprob_diff"] < 1e-3
    assert step["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still its own reference


def test_a_wandb_logger_in_the_recipe_logs_beside_the_run_files(tmp_path: Path, tiny_model_dir: Path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'retool[wandb]')")
    # Offline: W&B writes its run into the run directory and sends nothing anywhere.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))  # where it would go without the run dir
    recipe = {
        **TINY_RECIPE,
        "trainer": {
            **TINY_RECIPE["trainer"],
            "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "retool-test"}},
        },
    }
    run_dir = tmp_path / "run"
    code = main(
        ["fit", "--recipe", str(_write(tmp_path, recipe)), "--policy.name_or_path", str(tiny_model_dir),
         "--run_dir", str(run_dir)]
    )  # fmt: skip
    import wandb

    wandb.finish()  # what the end of a `retool fit` process does (W&B's exit hook)
    assert code == 0
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not (tmp_path / "wandb-default").exists()  # in the run directory, not elsewhere
    (record,) = runs[0].glob("run-*.wandb")  # W&B's own log of the run, which `wandb sync` uploads
    # W&B's service process writes that log on its own time, even after finish() (seen: only the header, on a
    # loaded machine): wait for it, up to a minute.
    deadline = time.monotonic() + 60
    while b"reward/mean" not in (data := record.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"train/policy_loss" in data and b"reward/mean" in data  # the step's numbers reached W&B
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "tensorboard").is_dir()  # retool's loggers stay
