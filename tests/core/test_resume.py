"""A run resumed from a checkpoint takes the steps the uninterrupted run took.

The uninterrupted run saves a checkpoint after every step; a second run resumes from the one after step 3 (as a
run stopped there would) and must log the same steps 4 and 5 and end with the same weights: the policy and the
optimizer, the data position inside an epoch and the epochs' shuffle, the mini-batch order, the sampling seeds.
The frozen reference model is not in the checkpoint: it is rebuilt from the recipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def recipe(tmp_path: Path, model: Path, algorithm: str, extra: str = "", every_step: bool = True) -> Path:
    callbacks = f"""
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / "checkpoints"}, every_n_train_steps: 1, save_top_k: -1}}"""
    path = tmp_path / f"{algorithm.lower()}.yaml"
    path.write_text(
        f"""seed_everything: 0
checkpoint_every: 2
trainer:
  max_steps: 5
  accelerator: cpu
  devices: 1{callbacks if every_step else ""}
policy: {{name_or_path: {model}}}
algorithm:
  class_path: {algorithm}
  init_args: {{lr: 1.0e-3, micro_batch_size: 3{extra}}}
rollout: {{class_path: HFRollout, init_args: {{max_new_tokens: 12, tools: false, temperature: 1.0}}}}
reward: {{class_path: ParityReward}}
data: {{class_path: CountedProblems, init_args: {{batch_size: 6}}}}
""",
        encoding="utf-8",
    )
    return path


def environment() -> dict[str, str]:
    env = {**os.environ, "RETOOL_PLUGINS": "ddp_plugins", "PYTHONPATH": os.pathsep.join([str(HELPERS), *sys.path])}
    env.pop("RETOOL_RUN_DIR", None)
    return env


def retool_fit(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "retool.cli", "fit", *args]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def fit(recipe_path: Path, run_dir: Path, *extra: str) -> None:
    retool_fit("--recipe", str(recipe_path), "--run_dir", str(run_dir), *extra)


def steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_after(tmp_path: Path, step: int) -> Path:
    (found,) = (tmp_path / "checkpoints").glob(f"*step={step}.ckpt")
    return found


@pytest.fixture()
def model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    target.symlink_to(tiny_model_dir)
    return target


@pytest.mark.parametrize(
    ("algorithm", "extra", "keys"),
    [
        # Two epochs over mini-batches of 6 (the mini-batch order is drawn each step) and a KL reference model.
        ("GRPO", ", group_size: 2, epochs: 2, mini_batch_size: 6, kl_coef: 0.01",
         ("reward/mean", "train/policy_loss", "train/grad_norm", "train/kl", "train/entropy")),
        ("SFT", ", max_length: 512", ("train/loss", "train/tokens", "train/grad_norm")),
    ],
)  # fmt: skip
def test_a_resumed_run_takes_the_steps_of_the_uninterrupted_one(
    model: Path, tmp_path: Path, algorithm: str, extra: str, keys: tuple[str, ...]
) -> None:
    path = recipe(tmp_path, model, algorithm, extra)
    fit(path, tmp_path / "whole")  # 5 steps, 2 batches an epoch: the resume below lands inside the second epoch
    checkpoint = checkpoint_after(tmp_path, 3)
    state = torch.load(checkpoint, weights_only=False)
    assert not any(k.startswith("ref_model.") for k in state["state_dict"])  # rebuilt from the recipe instead
    fit(path, tmp_path / "resumed", "--ckpt_path", str(checkpoint))
    whole, resumed = steps(tmp_path / "whole"), steps(tmp_path / "resumed")
    assert [s["step"] for s in resumed] == [4, 5]
    for a, b in zip(whole[3:], resumed):
        for key in keys:
            assert a[key] == b[key], (a["step"], key)  # bitwise: the same computation in the same order
    wa = load_file(tmp_path / "whole" / "policy" / "model.safetensors")
    wb = load_file(tmp_path / "resumed" / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# How far the rollout's own log-probabilities are from the trainer's: float noise (about 3e-7 here) that depends
# on which trajectories the decoder happened to batch together, which timing decides; the sampled tokens do not.
DECODER_NOISE = "train/sampler_logprob_diff"


def same_steps(a: list[dict], b: list[dict]) -> None:
    """Every logged number of every step equal, bit for bit, but the clocks (and the decoder's float noise)."""
    assert [s["step"] for s in a] == [s["step"] for s in b]
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(("time/", "perf/"))}
        assert keys == {k for k in y if not k.startswith(("time/", "perf/"))}
        for key in keys - {DECODER_NOISE}:
            assert x[key] == y[key] or (x[key] != x[key] and y[key] != y[key]), (x["step"], key)  # NaN == NaN
        assert x[DECODER_NOISE] == pytest.approx(y[DECODER_NOISE], abs=1e-6)


@pytest.mark.slow
def test_a_run_killed_mid_step_and_resumed_ends_as_the_uninterrupted_one(model: Path, tmp_path: Path) -> None:
    # A real SIGKILL from outside while step 4 is under way (step 3 written, the checkpoint after step 2 the
    # newest): the resume takes steps 3 to 5 again in the same run directory.
    path = recipe(tmp_path, model, "GRPO", ", group_size: 2, epochs: 2, mini_batch_size: 6, kl_coef: 0.01",
                  every_step=False)  # fmt: skip
    fit(path, tmp_path / "whole")
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "retool.cli", "fit", "--recipe", str(path), "--run_dir", str(run)]
    proc = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and len(steps(run)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=2.ckpt"]
    assert not (run / "policy").exists()
    done = retool_fit("--resume", str(run))
    assert "resuming after step 2 from" in done.stdout
    same_steps(steps(tmp_path / "whole"), steps(run))  # step 3 once, though the killed run had written it
    for name in ("trajectories.jsonl", "evaluation.jsonl"):
        if (tmp_path / "whole" / name).is_file():
            assert (tmp_path / "whole" / name).read_text() == (run / name).read_text()
    wa = load_file(tmp_path / "whole" / "policy" / "model.safetensors")
    wb = load_file(run / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=4.ckpt", "step=5.ckpt"]
    assert (run / "checkpoints" / "last.ckpt").resolve() == (run / "checkpoints" / "step=5.ckpt").resolve()


def test_resume_refuses_a_damaged_checkpoint_and_a_changed_recipe(model: Path, tmp_path: Path) -> None:
    path = recipe(tmp_path, model, "GRPO", ", group_size: 2", every_step=False)
    run = tmp_path / "run"
    fit(path, run, "--trainer.max_steps", "2", "--checkpoint_every", "1")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    done = retool_fit("--resume", str(run), "--algorithm.init_args.group_size", "4", expect=2)
    assert "changed options: algorithm.init_args.group_size" in done.stderr and "--allow_changes" in done.stderr
    newest = run / "checkpoints" / "step=2.ckpt"
    newest.write_bytes(before[newest][: len(before[newest]) // 2])  # as a copy cut short
    done = retool_fit("--resume", str(run), expect=2)
    assert f"checkpoint {str(newest)!r} is damaged" in done.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    assert all(after[p] == before[p] for p in after if p != newest and not p.is_symlink())  # last.ckpt: newest's
    done = retool_fit("--resume", str(tmp_path / "nowhere"), expect=2)
    assert "is not a run directory" in done.stderr
