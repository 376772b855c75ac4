"""The whole loop under fire: a GRPO step of 64 trajectories through LocalSandbox, where one cell in ten is an
attack, finishes, trains, shows each attack's outcome in its trajectory, and leaves nothing behind (no process,
mount, cgroup or temporary file)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from processes import descendants

from retool.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LocalSandbox's isolation is Linux's"),
]

BENIGN = "x = 6 * 7\nprint(x)"
# attack -> (its cell, what the interpreter's reply in the trajectory must show)
ATTACKS = {
    "fork-bomb": ("import os\nwhile True:\n    os.fork()", ("BlockingIOError", "TimeoutError")),
    "memory-bomb": ("block = bytearray(2 ** 34)", ("MemoryError",)),
    "infinite-loop": ("while True:\n    pass", ("TimeoutError",)),
    "output-flood": ("print('y' * 10 ** 7)", ("chars cut",)),
    "crash": ("import ctypes\nctypes.string_at(0)", ("InterpreterCrash",)),
    "daemon": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(600)\n"
        "    os._exit(0)\nprint('detached')",
        ("detached",),
    ),
}


def _response(code: str, tag: str) -> str:
    # A second cell after the first shows that the session (restarted or not) still serves the trajectory.
    return (
        f"Let me compute ({tag}).\n<code>\n```python\n{code}\n```\n</code>\n"
        f"And check:\n<code>\n```python\n{BENIGN}\n```\n</code>\n<answer>\\boxed{{42}}</answer>"
    )


def _cgroups(pid: int) -> list[str]:
    found = []
    for root, folders, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(root, f) for f in folders if f.startswith(f"retool-{pid}-")]
        folders[:] = [f for f in folders if not f.startswith("retool-")]
    return sorted(found)


def _temp_files() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("retool")}


def test_a_step_with_hostile_cells_finishes_reports_them_and_leaves_nothing(tmp_path: Path, tiny_model_dir: Path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"6*7? ({i})", "answer": 42}) + "\n" for i in range(16))
    )
    # 64 trajectories of two cells: the first cell of every tenth-or-so is an attack (6 of 64 first cells,
    # 6 of 128 cells), spread over the step.
    scripts = [_response(BENIGN, f"benign-{i}") for i in range(64)]
    for slot, (name, (code, _)) in zip(range(3, 64, 11), ATTACKS.items(), strict=False):
        scripts[slot] = _response(code, name)
    recipe = {
        "trainer": {"max_steps": 1},
        "algorithm": {"class_path": "GRPO", "init_args": {"group_size": 4, "log_samples": 64, "micro_batch_size": 16}},
        "rollout": {
            "class_path": "retool.testing.ScriptedRollout",
            "init_args": {"script": scripts, "max_new_tokens": 256},
        },
        "executor": {
            "class_path": "LocalSandbox",
            "init_args": {"timeout_s": 3, "memory_mb": 256, "max_processes": 32},
        },
        "reward": {"class_path": "MathAnswerReward"},
        "data": {"class_path": "JsonlProblems", "init_args": {"path": str(problems), "batch_size": 16}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with open("/proc/self/mountinfo") as file:
        mounts_before = file.read()
    processes_before, temp_before = descendants(), _temp_files()

    run_dir = tmp_path / "run"
    code = main(["fit", "--recipe", str(path), "--policy.name_or_path", str(tiny_model_dir), "--run_dir", str(run_dir)])
    assert code == 0

    (step,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1 and step["tools/calls"] == 2.0  # every trajectory ran both its cells
    assert step["tools/executor_errors"] == 0.0  # the attacks are the code's failures, not the sandbox's
    assert (run_dir / "policy" / "config.json").exists()  # trained and exported
    rows = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == 64
    for name, (_, shown) in ATTACKS.items():
        (row,) = [r for r in rows if f"({name})" in r["response"]]
        first_reply = row["response"].split("<interpreter>")[1].split("</interpreter>")[0]
        assert any(text in first_reply for text in shown), (name, first_reply[:500])
        second_reply = row["response"].split("<interpreter>")[2].split("</interpreter>")[0]
        assert "42" in second_reply, (name, second_reply)  # the trajectory went on, in a fresh session if need be
        assert row["tool_calls"] == 2
    assert sum("(benign-" in r["response"] and "42" in r["response"].split("<interpreter>")[1] for r in rows) == 58

    # Nothing left behind: the daemon, the fork bomb's children and every worker are gone with their sessions.
    assert descendants() == processes_before
    assert _cgroups(os.getpid()) == []
    with open("/proc/self/mountinfo") as file:
        assert file.read() == mounts_before
    assert _temp_files() <= temp_before
