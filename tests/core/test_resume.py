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
from launch_env import run_environment
from safetensors.torch import load_file

from retool.callbacks import checkpoint_step


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
    env = run_environment()
    # One intra-op thread: with two, the first update after a restore sometimes differs from the uninterrupted
    # run's by float rounding (about one ulp in every gradient; forward pass and logged numbers identical), in
    # about one resumed SFT run of four here; with one thread, 18 of 18 were bitwise equal (docs: Stop and resume).
    env["OMP_NUM_THREADS"] = "1"
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
        # The critic and its optimizer too; its warm-up (critic only for 2 steps) counted from the restored step.
        ("PPO", ", group_size: 2, epochs: 2, mini_batch_size: 6, kl_coef: 0.01, critic_warmup: 2, critic_lr: 1.0e-3",
         ("reward/mean", "train/policy_loss", "train/value_loss", "train/critic_grad_norm", "train/policy_updated")),
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
    same_weights(tmp_path / "whole", tmp_path / "resumed")


def same_weights(a: Path, b: Path) -> None:
    """Every exported tensor of run ``a`` (the policy, and PPO's critic) equal, bit for bit, in run ``b``."""
    files = exported(a)
    assert files and files == exported(b)
    for name in files:
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def exported(run: Path) -> list[Path]:
    return sorted(p.relative_to(run) for p in run.glob("*/*.safetensors") if p.parent.name in ("policy", "critic"))


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
        if DECODER_NOISE in x:  # (an RL step's)
            assert x[DECODER_NOISE] == pytest.approx(y[DECODER_NOISE], abs=1e-6)


GRPO_OPTIONS = ", group_size: 2, epochs: 2, mini_batch_size: 6, kl_coef: 0.01"


OPTIONS = {
    "GRPO": GRPO_OPTIONS,
    "SFT": ", max_length: 512",
    "PPO": GRPO_OPTIONS + ", critic_warmup: 2, critic_lr: 1.0e-3",
}


def uninterrupted_run(model: Path, factory: pytest.TempPathFactory, algorithm: str) -> tuple[Path, Path]:
    """A recipe that checkpoints after steps 2, 4 and 5, and its uninterrupted run: (recipe, run directory)."""
    base = factory.mktemp(f"uninterrupted-{algorithm.lower()}")
    (base / "model").symlink_to(model)
    path = recipe(base, base / "model", algorithm, OPTIONS[algorithm], every_step=False)
    fit(path, base / "whole")
    return path, base / "whole"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return uninterrupted_run(tiny_model_dir, tmp_path_factory, "GRPO")


@pytest.fixture(scope="module", params=list(OPTIONS))
def each_uninterrupted(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    return uninterrupted_run(tiny_model_dir, tmp_path_factory, request.param)


def start(path: Path, run: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "retool.cli", "fit", "--recipe", str(path), "--run_dir", str(run)]
    return subprocess.Popen(command, env=env or environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def wait_for_steps(proc: subprocess.Popen, run: Path, count: int) -> None:
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and len(steps(run)) >= count):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def resumed_as_uninterrupted(run: Path, whole: Path, after: int) -> None:
    """``--resume`` continues ``run`` from its checkpoint after step ``after`` and ends as ``whole`` did."""
    done = retool_fit("--resume", str(run))
    assert f"resuming after step {after} from" in done.stdout
    same_steps(steps(whole), steps(run))  # the steps after the checkpoint once, though the first run had written them
    for name in ("trajectories.jsonl", "evaluation.jsonl"):
        if (whole / name).is_file():
            assert (whole / name).read_text() == (run / name).read_text()
    same_weights(whole, run)
    rows, events = logger_steps(whole)
    assert len(rows) == len(events) == 5  # one per step: steps 0-4 in Lightning's count
    assert logger_steps(run) == (rows, events)  # the CSV and TensorBoard loggers too: every step once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=4.ckpt", "step=5.ckpt"]
    assert (run / "checkpoints" / "last.ckpt").resolve() == (run / "checkpoints" / "step=5.ckpt").resolve()


@pytest.mark.slow
def test_a_run_killed_mid_step_and_resumed_ends_as_the_uninterrupted_one(
    each_uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    # A real SIGKILL from outside once step 3 is written, while step 4 is under way (GRPO's and PPO's steps take
    # seconds; SFT's may already be past step 4's checkpoint): the resume takes the steps after the newest
    # checkpoint again, in the same run directory.
    path, whole = each_uninterrupted
    run = tmp_path / "killed"
    proc = start(path, run)
    wait_for_steps(proc, run, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    saved = sorted(checkpoint_step(p) for p in (run / "checkpoints").glob("step=*.ckpt"))
    assert saved in ([2], [2, 4]) and not (run / "policy").exists()
    resumed_as_uninterrupted(run, whole, after=saved[-1])


@pytest.mark.slow
def test_a_run_killed_while_it_writes_a_checkpoint_resumes_from_the_one_before(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    # Killed (SIGKILL, by itself: tests/helpers/die_in_checkpoint.py) with half of step 4's checkpoint written.
    path, whole = uninterrupted
    run = tmp_path / "killed"
    env = {**environment(), "RETOOL_PLUGINS": "ddp_plugins,die_in_checkpoint", "RETOOL_TEST_DIE_IN_CHECKPOINT": "4"}
    proc = start(path, run, env)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    assert len(steps(run)) == 4  # step 4 finished and logged; its checkpoint is not
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["last.ckpt", "step=2.ckpt", "step=4.ckpt.partial"]
    resumed_as_uninterrupted(run, whole, after=2)  # and the half-written file is gone


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint_to_resume_from(
    uninterrupted: tuple[Path, Path], tmp_path: Path, signum: int
) -> None:
    # Ctrl-C or a scheduler's SIGTERM while step 3 is under way: the run ends that step, saves it (3 is not a
    # step it checkpoints at otherwise) and exits 128 + the signal's number, without exporting.
    path, whole = uninterrupted
    run = tmp_path / "stopped"
    proc = start(path, run)
    wait_for_steps(proc, run, 2)
    os.kill(proc.pid, signum)  # the trainer's process only (the sandbox and reward workers are not signalled)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, out[-2000:] + err[-2000:]
    last = len(steps(run))  # 3; 2 if the signal came between step 2's line and its end, 4 if just after step 3's
    assert last in (2, 3, 4)
    name = signal.Signals(signum).name
    assert f"{name}: stopping at the end of this step with a checkpoint" in err
    assert f"stopped on {name} after step {last}" in out and f"retool fit --resume {run}" in out
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == sorted({"last.ckpt", "step=2.ckpt", f"step={last}.ckpt"})
    assert not (run / "policy").exists() and not (run / "policy-interrupted").exists()
    resumed_as_uninterrupted(run, whole, after=last)


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


def test_a_run_saves_its_last_step_however_short_and_a_resumed_run_goes_on_saving(model: Path, tmp_path: Path) -> None:
    # Shorter than checkpoint_every (5): the end is saved as step=2.ckpt, last.ckpt a link to it, not a file of
    # its own. Resumed and extended by one step: the new end is saved too, the newest two kept.
    path = recipe(tmp_path, model, "GRPO", ", group_size: 2", every_step=False)
    run = tmp_path / "run"
    fit(path, run, "--trainer.max_steps", "2", "--checkpoint_every", "5")
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=2.ckpt"]
    assert (folder / "last.ckpt").is_symlink() and (folder / "last.ckpt").resolve() == folder / "step=2.ckpt"
    retool_fit("--resume", str(run), "--trainer.max_steps", "3")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert (folder / "last.ckpt").resolve() == folder / "step=3.ckpt"
    assert [s["step"] for s in steps(run)] == [1, 2, 3]


def sharded_recipe(tmp_path: Path, model: Path, strategy: str) -> Path:
    path = tmp_path / f"{strategy}.yaml"
    path.write_text(
        f"""seed_everything: 0
checkpoint_every: 2
trainer: {{max_steps: 4, accelerator: cpu, devices: 2, strategy: {strategy}}}
policy: {{name_or_path: {model}}}
algorithm:
  class_path: GRPO
  init_args: {{lr: 1.0e-3, micro_batch_size: 3, group_size: 2, kl_coef: 0.01}}
rollout: {{class_path: HFRollout, init_args: {{max_new_tokens: 12, tools: false, temperature: 1.0}}}}
reward: {{class_path: ParityReward}}
data: {{class_path: CountedProblems, init_args: {{batch_size: 4}}}}
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_a_sharded_run_stopped_and_resumed_ends_as_the_uninterrupted_one(
    model: Path, tmp_path: Path, strategy: str
) -> None:
    # Two processes, each holding a share of the optimizer state (and under fsdp2 and ZeRO-3 of the weights):
    # the checkpoint is a folder of shards, every process writing its own, the KL reference model left out.
    # SIGTERM reaches the first process only (as `kill PID` would): both stop after the same step.
    path = sharded_recipe(tmp_path, model, strategy)
    fit(path, tmp_path / "whole")
    run = tmp_path / "stopped"
    proc = start(path, run)
    wait_for_steps(proc, run, 1)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    last = len(steps(run))
    checkpoint = run / "checkpoints" / f"step={last}.ckpt"
    assert last < 4 and checkpoint.is_dir() and f"stopped on SIGTERM after step {last}" in out
    assert saved_names(checkpoint) and not any(name.startswith("ref_model.") for name in saved_names(checkpoint))
    done = retool_fit("--resume", str(run))
    assert f"resuming after step {last} from" in done.stdout
    same_steps(steps(tmp_path / "whole"), steps(run))  # bit for bit, the KL to the rebuilt reference included
    same_weights(tmp_path / "whole", run)
    kept = sorted({2, last, 4})[-2:]  # the newest two of what both runs saved
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", *(f"step={s}.ckpt" for s in kept)]


def logger_steps(run: Path, tag: str = "train/lr") -> tuple[list[tuple[int, str]], list[tuple[int, float]]]:
    """(step, value) of ``tag`` in the CSV logger's table and in the TensorBoard event files, in order."""
    import csv

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    with open(run / "csv" / "metrics.csv", newline="") as file:
        rows = [(int(float(r["step"])), r[tag]) for r in csv.DictReader(file) if r.get(tag)]
    events = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            events += [(event.step, round(v.tensor.float_val[0], 6)) for v in event.summary.value if v.tag == tag]
    return rows, events


def saved_names(checkpoint: Path) -> set[str]:
    """The names of the tensors a sharded checkpoint holds (PyTorch's distributed checkpoint, or DeepSpeed's)."""
    if (checkpoint / ".metadata").is_file():
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        return {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")}
    names: set[str] = set()
    for part in (checkpoint / "checkpoint").glob("*model_states.pt"):
        state = torch.load(part, weights_only=False)
        names |= set(state["module"]) | set(state.get("frozen_param_fragments") or {})
    return names
