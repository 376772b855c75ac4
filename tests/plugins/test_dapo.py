"""DapoMath on a small file in DAPO-Math-17k's published layout (made here): repeats dropped, wrapping removed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from retool_plugins.datasets.dapo import DAPO_PREFIX, DAPO_SUFFIX, DapoMath, dapo_question

pa = pytest.importorskip("pyarrow", reason="DapoMath reads Parquet with pyarrow (retool[data])")
pq = pytest.importorskip("pyarrow.parquet")

QUESTIONS = [
    ("Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b$.", "70"),
    ("How many positive divisors does $6!$ have?", "30"),
    ("Let $x^2 = 49$ and $x > 0$. Find $x$.", "7"),
]


def _row(question: str, answer: str, index: int, wrapped: bool = True) -> dict:
    content = f"{DAPO_PREFIX}{question}{DAPO_SUFFIX}" if wrapped else question
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": content, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"idx-{index}"},
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def published(tmp_path: Path) -> Path:
    # As published: every prompt many times over (here 4), interleaved.
    rows = [_row(q, a, i) for _ in range(4) for i, (q, a) in enumerate(QUESTIONS)]
    return _write(tmp_path / "dapo-math-17k.parquet", rows)


def test_repeats_are_dropped_and_dapos_instructions_cut(published: Path, caplog) -> None:
    data = DapoMath(path=str(published))
    with caplog.at_level(logging.INFO, logger="retool_plugins.datasets.dapo"):
        problems = data.problems("train")
    assert [(p.id, p.prompt, p.answer) for p in problems] == [
        (f"dapo-idx-{i}", q, a) for i, (q, a) in enumerate(QUESTIONS)
    ]
    assert not any("Answer:" in p.prompt or "step by step" in p.prompt for p in problems)
    assert data.counts == {"rows": 12, "problems": 3, "without_dapo_wrapping": 0}
    assert "12 rows" in caplog.text and "3 distinct problems" in caplog.text
    assert data.problems("val") == []  # no held-out split: evaluate on eval_sets


def test_limit_a_folder_and_unwrapped_questions(tmp_path: Path, caplog) -> None:
    rows = [_row(q, a, i) for i, (q, a) in enumerate(QUESTIONS)] + [_row("What is 2 + 2?", "4", 9, wrapped=False)]
    folder = tmp_path / "DAPO-Math-17k"
    _write(folder / "data" / "dapo-math-17k.parquet", rows)  # the layout `hf download` leaves
    assert [p.answer for p in DapoMath(path=str(folder), limit=2).problems("train")] == ["70", "30"]
    data = DapoMath(path=str(folder))
    with caplog.at_level(logging.WARNING, logger="retool_plugins.datasets.dapo"):
        problems = data.problems("train")
    assert problems[-1].prompt == "What is 2 + 2?" and data.counts["without_dapo_wrapping"] == 1
    assert "1 questions were not in DAPO's instruction wrapping" in caplog.text


def test_the_wrapping_is_cut_exactly() -> None:
    assert dapo_question(f"{DAPO_PREFIX}Find $x$.{DAPO_SUFFIX}") == ("Find $x$.", True)
    assert dapo_question("Find $x$.") == ("Find $x$.", False)


def test_bad_sources_say_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist; give a \.parquet file"):
        DapoMath(path=str(tmp_path / "missing.parquet")).problems("train")
    other = _write(tmp_path / "other.parquet", [{"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"has no \['prompt', 'reward_model'\] column"):
        DapoMath(path=str(other)).problems("train")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        DapoMath(limit=0)
