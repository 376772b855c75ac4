"""Supervised fine-tuning: traces rendered exactly as rollouts, interpreter text masked, the loss goes down,
the policy learns to write the trace; and evaluation (greedy, avg@k, pass@k, the paper's metrics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from retool.cli import main
from retool.policy import Policy
from retool.rollout.format import ReToolFormat, TextOnlyFormat
from retool.rollout.loop import prompt_token_ids, trace_trajectory
from retool.testing import EchoExecutor, InMemoryData, ScriptedRollout
from retool.types import ExecutionResult, Problem, Trace
from retool_plugins.algorithms.sft import SFT
from retool_plugins.rewards.math_answer import MathAnswerReward

PROBLEM = Problem(id="p0", prompt="What is 6 * 7?", answer="42")
CODE_TRACE = (
    "Multiply.\n<code>\n```python\nprint(6 * 7)\n```\n</code>"
    + ReToolFormat().feedback(ExecutionResult(stdout="42\n"))
    + "<answer>\\boxed{42}</answer>"
)


@pytest.fixture
def bound_rollout(tiny_model_dir: Path) -> ScriptedRollout:
    from transformers import AutoTokenizer

    rollout = ScriptedRollout(script="unused", max_new_tokens=32)
    rollout.bind(None, AutoTokenizer.from_pretrained(tiny_model_dir))  # type: ignore[arg-type]
    return rollout


def test_a_trace_renders_like_a_rollout_with_interpreter_text_masked(bound_rollout: ScriptedRollout) -> None:
    tokenizer = bound_rollout.tokenizer
    t = trace_trajectory(bound_rollout, Trace(PROBLEM, CODE_TRACE))
    assert t.token_ids[: t.prompt_len] == prompt_token_ids(bound_rollout, PROBLEM)  # the rollout's prompt exactly
    assert len(t.loss_mask) == len(t.token_ids) and t.finish_reason == "eos"
    assert t.token_ids[-1] == tokenizer.eos_token_id and t.loss_mask[-1] == 1  # it learns to end its turn
    masked = "".join(
        tokenizer.decode([i]) for i, m in zip(t.token_ids[t.prompt_len :], t.loss_mask[t.prompt_len :]) if not m
    )
    assert masked == "\n<interpreter>\n42\n</interpreter>\n"  # exactly the text a rollout appends
    learned = tokenizer.decode([i for i, m in zip(t.token_ids, t.loss_mask) if m], skip_special_tokens=True)
    assert learned == "Multiply.\n<code>\n```python\nprint(6 * 7)\n```\n</code><answer>\\boxed{42}</answer>"
    assert t.model_text == learned


def test_the_interpreter_block_has_the_tokens_a_rollout_would_append(bound_rollout: ScriptedRollout) -> None:
    tokenizer = bound_rollout.tokenizer
    t = trace_trajectory(bound_rollout, Trace(PROBLEM, CODE_TRACE))
    feedback = ReToolFormat().feedback(ExecutionResult(stdout="42\n"))
    ids = tokenizer.encode(feedback, add_special_tokens=False)
    zeros = [i for i, m in zip(t.token_ids[t.prompt_len :], t.loss_mask[t.prompt_len :]) if not m]
    assert zeros == ids


def test_text_only_format_trains_on_the_whole_response(bound_rollout: ScriptedRollout) -> None:
    bound_rollout.format = TextOnlyFormat()
    t = trace_trajectory(bound_rollout, Trace(PROBLEM, "6 * 7 = 42. <answer>\\boxed{42}</answer>"))
    assert all(t.loss_mask[t.prompt_len :]) and "step by step" in t.prompt_text


def test_max_length_cuts_and_marks_the_trace(bound_rollout: ScriptedRollout) -> None:
    full = trace_trajectory(bound_rollout, Trace(PROBLEM, CODE_TRACE))
    cut = trace_trajectory(bound_rollout, Trace(PROBLEM, CODE_TRACE), max_length=full.prompt_len + 3)
    assert cut.finish_reason == "length" and len(cut.token_ids) == full.prompt_len + 3
    assert cut.token_ids == full.token_ids[: full.prompt_len + 3]


def _sft(tiny_model_dir: Path, **kwargs) -> SFT:
    rollout = ScriptedRollout(script="unused", max_new_tokens=48)
    return SFT(policy=Policy(name_or_path=str(tiny_model_dir)), rollout=rollout, **kwargs)


def test_sft_loss_is_the_mean_nll_of_the_model_tokens_only(tiny_model_dir: Path) -> None:
    algo = _sft(tiny_model_dir)
    algo.configure_model()
    trace = Trace(PROBLEM, CODE_TRACE)
    other = Trace(PROBLEM, CODE_TRACE.replace("<interpreter>\n42", "<interpreter>\n41"))  # only masked text differs
    from retool.algorithm import PolicyBatch

    def nll(t: Trace) -> float:
        traj = trace_trajectory(algo.rollout, t)  # type: ignore[arg-type]
        batch = PolicyBatch.from_trajectories([traj], [0.0], 0)
        with torch.no_grad():
            logprobs, _ = algo.sequence_logprobs(algo.model, batch, temperature=1.0)  # type: ignore[arg-type]
        # by hand: every model-written response token's -log p under a plain forward pass
        ids = torch.tensor([traj.token_ids])
        with torch.no_grad():
            logits = algo.model(input_ids=ids).logits[0, :-1].float()  # type: ignore[misc]
        by_hand = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
        assert math.isclose(float(-(logprobs * batch.response_mask).sum()), float(by_hand[mask].sum()), rel_tol=1e-4)
        return float(by_hand[mask].sum())

    assert nll(trace) != nll(other)  # the context differs (the model reads the interpreter's text) ...
    traj, traj_other = (trace_trajectory(algo.rollout, t) for t in (trace, other))  # type: ignore[arg-type]
    assert sum(traj.loss_mask) == sum(traj_other.loss_mask)  # ... but the same tokens are learned


def test_sft_learns_to_write_the_trace_and_logs_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    from retool_plugins.rollout.hf import HFRollout

    trace = Trace(PROBLEM, CODE_TRACE)
    rollout = HFRollout(max_new_tokens=40, temperature=0.0)
    algo = SFT(lr=1e-2, policy=Policy(name_or_path=str(tiny_model_dir)), rollout=rollout, micro_batch_size=1)
    data = InMemoryData(traces=[trace, trace], batch_size=2)
    trainer = L.Trainer(
        max_steps=100,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            losses.append(module.last_step.metrics["train/loss"])

    trainer.callbacks.append(Record())
    trainer.fit(algo, datamodule=data)
    assert len(losses) == 100 and losses[-1] < 0.2 * losses[0], losses
    executor = EchoExecutor(lambda code: "42\n")
    try:
        out = rollout.rollout([PROBLEM], 1, executor).trajectories[0]
    finally:
        algo.close_resources()
    # Greedy decoding now writes the trace: its cell ran (the interpreter text came from the executor) and
    # it answered after it.
    assert [c.code for c in out.tool_calls] == ["print(6 * 7)"]
    assert out.model_text.startswith("Multiply.\n<code>")
    assert "\\boxed{42}" in out.model_text


def test_sft_requires_a_rollout_section(tiny_model_dir: Path) -> None:
    algo = SFT(policy=Policy(name_or_path=str(tiny_model_dir)))
    with pytest.raises(ValueError, match="rollout section"):
        algo.check_components()


def test_sft_evaluating_without_a_reward_names_the_fix(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="no reward section"):
        _sft(tiny_model_dir, eval_every=2).check_components()


def test_sampling_for_avg_at_k_needs_a_temperature(tiny_model_dir: Path) -> None:
    algo = SFT(
        policy=Policy(name_or_path=str(tiny_model_dir)),
        rollout=ScriptedRollout(script="x", temperature=0.0),
        reward=MathAnswerReward(),
        executor=EchoExecutor(),
        eval_every=1,
        eval_samples=4,
    )
    with pytest.raises(ValueError, match="temperature"):
        algo.check_components()


# ---- through the CLI: SFT with evaluation, then validate ---------------------------------------------------

SFT_RECIPE = {
    "seed_everything": 3,
    "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_checkpointing": False},
    "algorithm": {
        "class_path": "SFT",
        "init_args": {"lr": 1e-3, "eval_every": 2, "eval_at_start": True, "eval_samples": 3, "micro_batch_size": 2},
    },
    "rollout": {
        "class_path": "retool.testing.ScriptedRollout",
        "init_args": {
            # Right answers to even-numbered problems, wrong to odd ones; a cell in every response.
            "script": [
                "A.\n<code>\n```python\nx = 6 * 7\n\nprint(x)\n```\n</code>\n<answer>\\boxed{42}</answer>",
                "B.\n<code>\n```python\nprint(41)\n```\n</code>\n<answer>\\boxed{41}</answer>",
            ],
            "max_new_tokens": 64,
            "temperature": 1.0,
        },
    },
    "executor": {"class_path": "retool.testing.EchoExecutor"},
    "reward": {"class_path": "MathAnswerReward"},
    "data": {"class_path": "TRACE_DATA", "init_args": {}},
}


class TinyTraces(InMemoryData):
    """4 training traces and 4 val problems, configurable from a recipe (for the CLI tests)."""

    def __init__(self, batch_size: int = 2, seed: int = 0) -> None:
        problems = [Problem(id=f"q{i}", prompt=f"What is 6*7 ({i})?", answer="42") for i in range(8)]
        super().__init__(
            train=problems[:4],
            val=problems[4:],
            traces=[Trace(p, CODE_TRACE) for p in problems[:4]],
            batch_size=batch_size,
            seed=seed,
        )


def test_fit_sft_with_evaluation_then_validate(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import sys

    sys.modules.setdefault("tinytraces_for_tests", sys.modules[__name__])
    recipe = json.loads(json.dumps(SFT_RECIPE))
    recipe["data"]["class_path"] = f"{__name__}.TinyTraces"
    del recipe["trainer"]["enable_checkpointing"]
    recipe["checkpoint_every"] = 0  # no checkpoints, and none of Lightning's own either
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "sft"
    code = main(["fit", "--recipe", str(path), "--policy.name_or_path", str(tiny_model_dir), "--run_dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 4 traces / batch 2 x 2 epochs
    assert all(s["train/tokens"] > 0 and math.isfinite(s["train/loss"]) for s in steps)
    evals = [json.loads(line) for line in (run_dir / "evaluation.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]  # at the start, every 2 steps; the end coincides with step 4
    for e in evals:
        # Greedy answers alternate right/wrong over the 4 val problems; every sampled set has both.
        assert e["eval/accuracy"] == 0.5 and e["eval/problems"] == 4
        assert e["eval/k"] == 3 and e["eval/pass@3"] == 1.0 and 0 < e["eval/avg@3"] < 1
        assert e["eval/code_ratio"] == 1.0 and e["eval/cell_ok"] == 1.0 and e["eval/last_cell_ok"] == 1.0
        assert (
            e["eval/code_lines"] == 1.5
        )  # 2 lines ("x = 6 * 7", "print(x)") or 1 ("print(41)"); blank ones not counted
        assert 0 < e["eval/first_cell_pos"] < 1
    samples = [json.loads(line) for line in (run_dir / "eval_trajectories.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {s["correct"] for s in samples} == {True, False}
    assert "evaluation on held-out problems" in out and "loss" in out
    assert (run_dir / "policy" / "config.json").is_file()
    assert not list(run_dir.rglob("*.ckpt"))

    # retool validate on the exported policy writes its own run directory with one evaluation.
    val_dir = tmp_path / "val"
    code = main(["validate", "--recipe", str(path), "--ckpt_path", str(run_dir / "policy"), "--run_dir", str(val_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    evals = [json.loads(line) for line in (val_dir / "evaluation.jsonl").read_text().splitlines()]
    assert len(evals) == 1 and evals[0]["eval/accuracy"] == 0.5
    saved = yaml.safe_load((val_dir / "recipe.yaml").read_text())
    assert saved["policy"]["name_or_path"] == str(run_dir / "policy")


def test_validate_without_val_problems_or_checkpoint_says_why(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = json.loads(json.dumps(SFT_RECIPE))
    recipe["data"]["class_path"] = f"{__name__}.TinyTraces"
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", "--recipe", str(path), "--ckpt_path", str(tmp_path / "nope")]) == 2
    assert "neither a policy folder nor a checkpoint" in capsys.readouterr().err


def test_validate_from_a_lightning_checkpoint(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = json.loads(json.dumps(SFT_RECIPE))
    recipe["data"]["class_path"] = f"{__name__}.TinyTraces"
    recipe["trainer"].update({"enable_checkpointing": True, "max_epochs": 1})
    recipe["algorithm"]["init_args"].update({"eval_every": 0, "eval_at_start": False, "lr": 5e-2})
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "sft"
    assert (
        main(["fit", "--recipe", str(path), "--policy.name_or_path", str(tiny_model_dir), "--run_dir", str(run_dir)])
        == 0
    )
    assert not (run_dir / "evaluation.jsonl").exists()  # it never evaluates unless asked
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    capsys.readouterr()

    # The checkpoint's weights, not the recipe's initial policy, are what gets evaluated.
    import lightning as L

    from retool.policy import Policy

    class Spy(L.Callback):
        def on_validation_start(self, trainer, module):  # type: ignore[no-untyped-def]
            trained = Policy(name_or_path=str(run_dir / "policy")).load_model()
            for a, b in zip(module.model.parameters(), trained.parameters()):
                assert torch.equal(a.detach().cpu(), b.detach())
            seen.append(True)

    seen: list[bool] = []
    recipe["trainer"]["callbacks"] = [{"class_path": f"{__name__}.SpyHolder"}]
    SpyHolder.instance = Spy()
    path.write_text(yaml.safe_dump(recipe))
    val_dir = tmp_path / "val"
    args = ["validate", "--recipe", str(path), "--policy.name_or_path", str(tiny_model_dir)]
    assert main([*args, "--ckpt_path", str(ckpt), "--run_dir", str(val_dir)]) == 0, capsys.readouterr().out
    assert seen == [True]
    (row,) = [json.loads(line) for line in (val_dir / "evaluation.jsonl").read_text().splitlines()]
    assert row["eval/problems"] == 4


class SpyHolder(L.Callback):
    """Forwards to a callback set by the test (a recipe can only name a class)."""

    instance: L.Callback | None = None

    def on_validation_start(self, trainer, module):  # type: ignore[no-untyped-def]
        assert self.instance is not None
        self.instance.on_validation_start(trainer, module)


def test_sft_on_a_dataset_without_traces_fails_before_loading_weights(tmp_path: Path, capsys) -> None:
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"prompt": "What is 6*7?", "answer": 42}) + "\n")
    recipe = json.loads(json.dumps(SFT_RECIPE))
    recipe["data"] = {"class_path": "JsonlProblems", "init_args": {"path": str(problems)}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # The policy does not exist: reaching the model would fail differently. The data check comes first.
    code = main(["fit", "--recipe", str(path), "--policy.name_or_path", str(tmp_path / "no-model")])
    assert code == 2
    err = capsys.readouterr().err
    assert "JsonlProblems has no traces" in err and "TraceFile" in err
