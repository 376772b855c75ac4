"""The built-in rewards and datasets held to the contracts of ``retool.testing``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from retool.testing import DataContract, RewardContract
from retool_plugins.datasets.arithmetic import ArithmeticProblems
from retool_plugins.datasets.families import MathFamilies
from retool_plugins.datasets.jsonl import JsonlProblems
from retool_plugins.datasets.trace_file import TraceFile
from retool_plugins.rewards.math_answer import MathAnswerReward

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_FILES = tempfile.TemporaryDirectory(prefix="retool-contract-")  # removed when the test process exits


class TestMathAnswerReward(RewardContract):
    factory = staticmethod(MathAnswerReward)
    correct = "It is <answer>\\boxed{\\frac{84}{2}}</answer>"
    wrong = "It is <answer>\\boxed{41}</answer>"


class TestArithmeticProblems(DataContract):
    factory = staticmethod(lambda: ArithmeticProblems(num_train=12, num_val=6, batch_size=4, seed=3))


class TestMathFamilies(DataContract):
    factory = staticmethod(lambda: MathFamilies(num_train=16, num_val=8, batch_size=4, trace_max_level=1))


def _jsonl_problems() -> JsonlProblems:
    folder = Path(_FILES.name)
    rows = [{"id": f"q{i}", "prompt": f"What is {i} * 7?", "answer": 7 * i} for i in range(10)]
    for name, part in (("train.jsonl", rows[:7]), ("val.jsonl", rows[7:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return JsonlProblems(path=str(folder / "train.jsonl"), val_path=str(folder / "val.jsonl"), batch_size=2)


class TestJsonlProblems(DataContract):
    factory = staticmethod(_jsonl_problems)


class TestTraceFile(DataContract):
    factory = staticmethod(lambda: TraceFile(str(FIXTURES / "retool_sft_sample.jsonl"), layout="retool-sft", num_val=1))
