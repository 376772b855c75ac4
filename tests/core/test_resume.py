"""A run resumed from a checkpoint takes the steps the uninterrupted run took.

The uninterrupted run saves a checkpoint after every step; a second run resumes from the one after step 3 (as a
run stopped there would) and must log the same steps 4 and 5 and end with the same weights: the policy and the
optimizer, the data position inside an epoch and the epochs' shuffle, the mini-batch order, the sampling seeds.
The frozen reference model is not in the checkpoint: it is rebuilt from the recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def recipe(tmp_path: Path, model: Path, algorithm: str, extra: str = "") -> Path:
    path = tmp_path / f"{algorithm.lower()}.yaml"
    path.write_text(
        f"""seed_everything: 0
trainer:
  max_steps: 5
  accelerator: cpu
  devices: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / "checkpoints"}, every_n_train_steps: 1, save_top_k: -1}}
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


def fit(recipe_path: Path, run_dir: Path, *extra: str) -> None:
    env = {**os.environ, "RETOOL_PLUGINS": "ddp_plugins", "PYTHONPATH": os.pathsep.join([str(HELPERS), *sys.path])}
    env.pop("RETOOL_RUN_DIR", None)
    command = [sys.executable, "-m", "retool.cli", "fit", "--recipe", str(recipe_path), "--run_dir", str(run_dir)]
    done = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


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
