from __future__ import annotations

import json
import re

import pytest

from retool.types import Problem
from retool_plugins.datasets.arithmetic import ArithmeticProblems
from retool_plugins.datasets.jsonl import JsonlProblems

# --- ArithmeticProblems -----------------------------------------------------------------------------------


def recompute(prompt: str) -> int:
    """The answer of a generated prompt, by brute force (not the generator's closed forms)."""
    if m := re.fullmatch(r"What is (\d+) \* (\d+)\?", prompt):
        return int(m[1]) * int(m[2])
    if m := re.fullmatch(r"What is (\d+)\^(\d+) mod (\d+)\?", prompt):
        return int(m[1]) ** int(m[2]) % int(m[3])
    if m := re.fullmatch(r"What is (\d+) mod (\d+)\?", prompt):
        n, d = int(m[1]), int(m[2])
        return n - d * (n // d)
    if m := re.fullmatch(r"What is the sum of the squares of the integers from 1 to (\d+)\?", prompt):
        return sum(i * i for i in range(1, int(m[1]) + 1))
    if m := re.fullmatch(r"What is the sum of the cubes of the integers from 1 to (\d+)\?", prompt):
        return sum(i**3 for i in range(1, int(m[1]) + 1))
    if m := re.fullmatch(
        r"What is the sum of the first (\d+) terms of the arithmetic progression (\d+), (\d+), (\d+), \.\.\.\?", prompt
    ):
        n, a, b, c = (int(g) for g in m.groups())
        assert c - b == b - a
        return sum(a + k * (b - a) for k in range(n))
    raise AssertionError(f"unexpected prompt {prompt!r}")


def all_problems(dm: ArithmeticProblems) -> list[Problem]:
    return dm.problems("train") + dm.problems("val")


def test_arithmetic_is_deterministic_by_seed():
    a, b = ArithmeticProblems(seed=3), ArithmeticProblems(seed=3)
    assert all_problems(a) == all_problems(b)
    assert len(a.problems("train")) == 256 and len(a.problems("val")) == 32


def test_arithmetic_seeds_differ():
    a = [p.prompt for p in all_problems(ArithmeticProblems(seed=0))]
    b = [p.prompt for p in all_problems(ArithmeticProblems(seed=1))]
    assert len(set(a) & set(b)) < len(a) // 10


def test_arithmetic_train_and_val_are_disjoint():
    dm = ArithmeticProblems(num_train=200, num_val=50, min_digits=2, max_digits=2)  # a small space: repeats likely
    train, val = dm.problems("train"), dm.problems("val")
    assert (len(train), len(val)) == (200, 50)
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    ids = [p.id for p in train + val]
    assert len(set(ids)) == len(ids)
    assert len({p.prompt for p in train + val}) == 250


def test_arithmetic_answers_are_correct():
    dm = ArithmeticProblems(num_train=90, num_val=30, min_digits=1, max_digits=4)
    problems = all_problems(dm)
    kinds = {p.metadata["kind"] for p in problems}
    assert kinds == {"product", "power", "remainder", "squares", "cubes", "progression"}
    for p in problems:
        assert p.answer == str(recompute(p.prompt)), p
        assert re.fullmatch(r"(product|modular|series)-\d+", p.id)
        assert p.id.startswith(p.metadata["family"])
        assert 1 <= p.metadata["digits"] <= 4


def test_arithmetic_digits_set_the_size():
    dm = ArithmeticProblems(num_train=30, num_val=0, families=["product"], min_digits=5, max_digits=6)
    for p in dm.problems("train"):
        a, b = re.fullmatch(r"What is (\d+) \* (\d+)\?", p.prompt).groups()
        assert len(a) == len(b) == p.metadata["digits"] in (5, 6)
    assert dm.problems("val") == []


def test_arithmetic_families_filter():
    dm = ArithmeticProblems(num_train=20, num_val=4, families=["series", "modular"])
    families = [p.metadata["family"] for p in all_problems(dm)]
    assert set(families) == {"series", "modular"}
    assert families[:4] == ["series", "modular", "series", "modular"]
    # A family's problems do not depend on which other families are drawn.
    only = ArithmeticProblems(num_train=12, num_val=0, families=["series"])
    assert only.problems("train") == [p for p in all_problems(dm) if p.metadata["family"] == "series"]


def test_arithmetic_unknown_family_names_the_available_ones():
    expected = r"unknown ArithmeticProblems families entry 'prodcut'; did you mean 'product'\?.*modular.*series"
    with pytest.raises(ValueError, match=expected):
        ArithmeticProblems(families=["product", "prodcut"])


@pytest.mark.parametrize("bad", [{"min_digits": 0}, {"min_digits": 5, "max_digits": 4}, {"num_train": -1}])
def test_arithmetic_bad_arguments(bad):
    with pytest.raises(ValueError):
        ArithmeticProblems(**bad)


def test_arithmetic_too_few_distinct_problems_names_the_fix():
    dm = ArithmeticProblems(num_train=200, num_val=0, families=["product"], min_digits=1, max_digits=1)
    with pytest.raises(ValueError, match="raise max_digits or lower num_train/num_val"):
        dm.problems("train")


def test_arithmetic_dataloader_yields_batches_of_problems():
    dm = ArithmeticProblems(batch_size=4, num_train=18, num_val=5)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4  # the incomplete last batch is dropped
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == 4
        assert all(isinstance(p, Problem) for p in batch)
    seen = [p.id for batch in batches for p in batch]
    assert len(set(seen)) == 16 and set(seen) <= {p.id for p in dm.problems("train")}
    assert len(dm.problems("val")) == 5


# --- JsonlProblems ----------------------------------------------------------------------------------------


def write_jsonl(path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_default_fields_and_metadata(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": "a", "prompt": "What is 1+1?", "answer": "2", "source": "hand", "level": 1},
            {"id": 7, "prompt": "What is 1/2 + 0?", "answer": 0.5},
            {"id": "c", "prompt": "What is 3*3?", "answer": 9},
        ],
    )
    problems = JsonlProblems(path=path).problems("train")
    assert problems == [
        Problem(id="a", prompt="What is 1+1?", answer="2", metadata={"source": "hand", "level": 1}),
        Problem(id="7", prompt="What is 1/2 + 0?", answer="0.5", metadata={}),
        Problem(id="c", prompt="What is 3*3?", answer="9", metadata={}),
    ]


def test_jsonl_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"uid": "q1", "question": "Q?", "solution": "42", "prompt": "other"}])
    dm = JsonlProblems(path=path, prompt_field="question", answer_field="solution", id_field="uid")
    assert dm.problems("train") == [Problem(id="q1", prompt="Q?", answer="42", metadata={"prompt": "other"})]


def test_jsonl_dotted_fields(tmp_path):
    rows = [
        {"meta": {"question": "Q1?", "source": "aime"}, "gold": {"value": 12}},
        {"meta": {"question": "Q2?"}, "gold": {"value": "\\frac{1}{3}"}, "meta.question": "literal key wins"},
    ]
    path = write_jsonl(tmp_path / "nested.jsonl", rows)
    problems = JsonlProblems(path=path, prompt_field="meta.question", answer_field="gold.value").problems("train")
    assert problems[0] == Problem(id="nested-1", prompt="Q1?", answer="12", metadata={"meta": {"source": "aime"}})
    assert problems[1].prompt == "literal key wins"
    assert problems[1].answer == "\\frac{1}{3}"
    assert problems[1].metadata == {"meta": {"question": "Q2?"}}


def test_jsonl_generated_ids_use_stem_and_line_number(tmp_path):
    path = write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {"prompt": "a", "answer": "1"},
            "",
            {"prompt": "b", "answer": "2", "id": "given"},
            {"prompt": "c", "answer": "3"},
        ],
    )
    assert [p.id for p in JsonlProblems(path=path).problems("train")] == ["mix-1", "given", "mix-4"]
    ids = [p.id for p in JsonlProblems(path=path, id_field=None).problems("train")]
    assert ids == ["mix-1", "mix-3", "mix-4"]
    # With id_field=None an "id" key is ordinary metadata.
    assert JsonlProblems(path=path, id_field=None).problems("train")[1].metadata == {"id": "given"}


def test_jsonl_limit_and_val_path(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": f"v{i}", "answer": i} for i in range(5)])
    dm = JsonlProblems(path=train, val_path=val, limit=3, batch_size=2)
    assert [p.prompt for p in dm.problems("train")] == ["q0", "q1", "q2"]
    assert [p.id for p in dm.problems("val")] == ["val-1", "val-2", "val-3"]
    batches = list(dm.train_dataloader())
    assert [len(b) for b in batches] == [2] and all(isinstance(p, Problem) for p in batches[0])
    assert JsonlProblems(path=train).problems("val") == []


def test_jsonl_missing_file_is_reported_when_loading(tmp_path):
    missing = tmp_path / "nope.jsonl"
    dm = JsonlProblems(path=str(missing))  # a recipe can be parsed without the file
    with pytest.raises(FileNotFoundError, match=r"path=.*nope\.jsonl.* does not exist; it must be an existing"):
        dm.problems("train")
    present = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "answer": "1"}])
    with pytest.raises(FileNotFoundError, match=r"val_path=.*nope\.jsonl"):
        JsonlProblems(path=present, val_path=str(missing)).problems("val")


def test_jsonl_bad_line_gives_its_number(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "1"}, "", '{"prompt": "q2", "answer": }'])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        JsonlProblems(path=path).problems("train")
    path = write_jsonl(tmp_path / "list.jsonl", ['["prompt", "answer"]'])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        JsonlProblems(path=path).problems("train")


@pytest.mark.parametrize("missing", ["prompt", "answer"])
def test_jsonl_missing_field_gives_line_and_keys(tmp_path, missing):
    row = {"prompt": "q", "answer": "1", "extra": 0}
    del row[missing]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "ok", "answer": "1"}, row])
    keys = re.escape(str(sorted(row)))  # the keys the row does have
    with pytest.raises(ValueError, match=rf"rows\.jsonl:2: no '{missing}' field.*{keys}"):
        JsonlProblems(path=path).problems("train")


def test_jsonl_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a", "answer": "1"}, {"id": 1, "prompt": "b", "answer": "2"}]
    )
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: id '1' is also on line 1"):
        JsonlProblems(path=path).problems("train")
