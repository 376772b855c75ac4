"""Named evaluation sets: presets shipped as files, protocols, per-set metrics, and `retool validate` across sets."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from retool.cli import main
from retool.eval_sets import PROTOCOLS, EvalSet, Protocol, pass_at_k, presets, resolve
from retool.testing import ScriptedRollout
from retool_plugins.datasets.jsonl import JsonlProblems

RIGHT = "Compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code>\n<answer>\\boxed{42}</answer>"
WRONG = "Compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code>\n<answer>\\boxed{41}</answer>"


class RecordingRollout(ScriptedRollout):
    """A scripted backend that records the sampling settings each trajectory was decoded with."""

    seen: ClassVar[list[tuple[float, float, int]]] = []

    async def generate(self, request):  # type: ignore[no-untyped-def]
        RecordingRollout.seen.append((self.temperature, self.top_p, self.max_new_tokens))
        return await super().generate(request)


def _problems(path: Path, prefix: str, count: int) -> Path:
    rows = [{"id": f"{prefix}{i}", "prompt": f"6*7 ({i})?", "answer": 42} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_shipped_presets_hold_the_published_sets() -> None:
    found = presets()
    assert {"aime24", "aime25", "math500"} <= set(found)
    sizes = {}
    for name in ("aime24", "aime25", "math500"):
        rows = [json.loads(line) for line in Path(found[name].path).read_text(encoding="utf-8").splitlines()]
        sizes[name] = len(rows)
        assert len({r["id"] for r in rows}) == len(rows) and all(r["prompt"] and r["answer"] for r in rows)
        assert found[name].source
    assert sizes == {"aime24": 30, "aime25": 30, "math500": 500}
    aime = [json.loads(line) for line in Path(found["aime25"].path).read_text().splitlines()]
    assert all(0 <= int(r["answer"]) <= 999 for r in aime)  # AIME answers are integers 0-999
    assert (Path(found["aime24"].path).parent / "README.md").is_file()  # sources and licences


@pytest.mark.slow
def test_every_shipped_answer_is_read_by_the_reward() -> None:
    from retool_plugins.rewards.math_answer import check_equivalent

    for name in ("aime24", "aime25", "math500"):
        for line in Path(presets()[name].path).read_text(encoding="utf-8").splitlines():
            answer = json.loads(line)["answer"]
            assert check_equivalent(answer, answer), (name, answer)


def test_protocols_and_overrides_resolve(tmp_path: Path) -> None:
    mine = _problems(tmp_path / "mine.jsonl", "m", 3)
    sets = resolve(
        ["aime24", {"name": "aime25", "protocol": "paper", "n": 4}, {"name": "mine", "path": str(mine), "top_p": 0.5}],
        default_protocol={"n": 2, "temperature": 0.6},
    )
    assert [s.name for s in sets] == ["aime24", "aime25", "mine"]
    assert sets[0].protocol == Protocol(greedy=True, n=2, temperature=0.6)
    assert sets[1].protocol == Protocol(greedy=False, n=4, temperature=1.0, top_p=0.7, max_new_tokens=16384)
    assert sets[2].protocol == Protocol(greedy=True, n=2, temperature=0.6, top_p=0.5) and sets[2].path == str(mine)
    assert PROTOCOLS["paper"] == Protocol(greedy=False, n=32, temperature=1.0, top_p=0.7, max_new_tokens=16384)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["aimee24"], "unknown eval set 'aimee24'; did you mean 'aime24'?"),
        ([{"name": "mine"}], "unknown eval set 'mine'"),
        (["aime24", "aime24"], "names must be unique"),
        ([{"name": "aime24", "tempreature": 1.0}], "unknown option(s) ['tempreature']"),
        ([{"name": "aime24", "greedy": False}], "needs greedy: true or n >= 1"),
        ([{"name": "aime24", "top_p": 0}], "top_p must be in (0, 1]"),
        ([{"name": "aime24", "protocol": "papper"}], "unknown evaluation protocol 'papper'"),
    ],
)
def test_bad_sets_and_protocols_say_what_is_wrong(specs: list, message: str) -> None:
    with pytest.raises(ValueError) as error:
        resolve(specs)
    assert message in str(error.value)


def test_pass_at_k_is_the_unbiased_estimate() -> None:
    for n, c, k in [(4, 1, 2), (8, 3, 4), (32, 5, 8), (5, 0, 2), (5, 5, 1)]:
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact)


def test_a_dataset_evaluates_its_named_sets_tagged_and_limited(tmp_path: Path) -> None:
    train = _problems(tmp_path / "train.jsonl", "t", 4)
    own = _problems(tmp_path / "own.jsonl", "v", 5)
    data = JsonlProblems(
        path=str(train), val_path=str(own), eval_sets=["aime24", "val", {"name": "x", "path": str(own), "n": 3}],
        eval_limit=2,
    )  # fmt: skip
    val = data.problems("val")
    assert [(p.metadata["eval_set"], p.id) for p in val] == [
        ("aime24", "aime24-I-1"), ("aime24", "aime24-I-2"), ("val", "v0"), ("val", "v1"), ("x", "v0"), ("x", "v1"),
    ]  # fmt: skip
    assert data.eval_protocols()["x"] == Protocol(n=3) and data.eval_protocols()["aime24"] == Protocol()
    # Without named sets: the val split as before, and no protocols (evaluation's unnamed set).
    plain = JsonlProblems(path=str(train), val_path=str(own))
    assert [p.id for p in plain.problems("val")] == [f"v{i}" for i in range(5)] and plain.eval_protocols() == {}
    with pytest.raises(ValueError, match="unknown eval set"):
        JsonlProblems(path=str(train), eval_sets=["nope"])


def _validate_recipe(tmp_path: Path, sets: list) -> Path:
    recipe = {
        "seed_everything": 1,
        "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1},
        "algorithm": {"class_path": "GRPO", "init_args": {"group_size": 2, "eval_batch_size": 3}},
        "rollout": {
            "class_path": "test_eval_sets.RecordingRollout",
            "init_args": {"script": [RIGHT, WRONG, RIGHT], "max_new_tokens": 64, "temperature": 0.9, "top_p": 1.0},
        },
        "executor": {"class_path": "LocalSandbox", "init_args": {"timeout_s": 5}},
        "reward": {"class_path": "MathAnswerReward"},
        "data": {
            "class_path": "JsonlProblems",
            "init_args": {"path": str(_problems(tmp_path / "t.jsonl", "t", 2)), "batch_size": 2, "eval_sets": sets},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_validate_evaluates_each_set_with_its_protocol(tmp_path: Path, tiny_model_dir: Path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    a = _problems(tmp_path / "a.jsonl", "a", 4)
    b = _problems(tmp_path / "b.jsonl", "b", 2)
    sets = [
        {"name": "a", "path": str(a)},
        {"name": "b", "path": str(b), "greedy": False, "n": 3, "temperature": 1.0, "top_p": 0.7, "max_new_tokens": 48},
    ]
    RecordingRollout.seen = []
    run_dir = tmp_path / "val"
    code = main(
        ["validate", "--recipe", str(_validate_recipe(tmp_path, sets)), "--policy.name_or_path", str(tiny_model_dir),
         "--run_dir", str(run_dir), "--limit", "3"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = [json.loads(line) for line in (run_dir / "evaluation.jsonl").read_text().splitlines()]
    # Set a: 3 problems (the limit), greedy; the scripted answers go right, wrong, right in each rollout.
    assert row["eval/a/problems"] == 3 and row["eval/a/accuracy"] == pytest.approx(2 / 3)
    # Set b: 2 problems, 3 samples each, no greedy pass: 6 answers, right, wrong, right, right, wrong, right.
    assert row["eval/b/problems"] == 2 and "eval/b/accuracy" not in row
    assert row["eval/b/avg@3"] == pytest.approx(2 / 3) and row["eval/b/pass@3"] == 1.0
    assert row["eval/b/pass@2"] == pytest.approx(1.0)  # each problem has 2 right of 3: any 2 hold one
    assert row["eval/accuracy"] == pytest.approx(2 / 3)  # the mean of the sets' headline numbers
    # Each set was decoded with its own protocol: a greedily, b at temperature 1.0, top-p 0.7, 48 tokens.
    assert set(RecordingRollout.seen) == {(0.0, 1.0, 64), (1.0, 0.7, 48)}
    samples = [json.loads(line) for line in (run_dir / "eval_trajectories.jsonl").read_text().splitlines()]
    assert [s["eval_set"] for s in samples] == ["a", "a", "a", "b", "b"]
    assert "set" in out and " a " in out and " b " in out and "avg@3" in out  # the table across sets


@pytest.mark.slow
def test_validate_on_aime24_with_the_built_in_model(tmp_path: Path, capsys) -> None:
    # The acceptance run: the quickstart's recipe (whose policy is otherwise stage 1's export), the shipped AIME
    # 2024 file, the built-in SmolLM2 (no network).
    recipe = Path(__file__).parents[2] / "recipes" / "quickstart" / "grpo.yaml"
    run_dir = tmp_path / "aime"
    code = main(
        ["validate", "--recipe", str(recipe), "--policy.name_or_path", "smollm2-135m-instruct",
         "--data.eval_sets", "[aime24]", "--limit", "2",
         "--rollout.max_new_tokens", "96", "--run_dir", str(run_dir)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = [json.loads(line) for line in (run_dir / "evaluation.jsonl").read_text().splitlines()]
    assert row["eval/aime24/problems"] == 2 and 0.0 <= row["eval/aime24/accuracy"] <= 1.0
    samples = [json.loads(line) for line in (run_dir / "eval_trajectories.jsonl").read_text().splitlines()]
    assert [s["problem_id"] for s in samples] == ["aime24-I-1", "aime24-I-2"]
    assert "aime24" in out


def test_an_eval_set_is_a_dataclass_a_package_can_register() -> None:
    custom = EvalSet(name="mine", path="mine.jsonl", protocol=PROTOCOLS["paper"])
    assert custom.protocol.n == 32 and custom.id_field == "id"
