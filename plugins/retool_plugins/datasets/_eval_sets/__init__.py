"""The evaluation sets retool ships (``aime24``, ``aime25``, ``math500``): JSON-lines files beside this module,
registered under the ``retool.eval_sets`` entry points. Their sources and licences are in ``README.md`` here."""

from __future__ import annotations

from pathlib import Path

from retool.eval_sets import EvalSet

_HERE = Path(__file__).parent

AIME24 = EvalSet(
    name="aime24",
    path=str(_HERE / "aime24.jsonl"),
    source="AIME 2024 I and II, 30 problems (hkust-nlp/simpleRL-reason, MIT; problems (c) MAA)",
)
AIME25 = EvalSet(
    name="aime25",
    path=str(_HERE / "aime25.jsonl"),
    source="AIME 2025 I and II, 30 problems (eth-sri/matharena, MIT; problems (c) MAA)",
)
MATH500 = EvalSet(
    name="math500",
    path=str(_HERE / "math500.jsonl"),
    source="MATH-500, the test subset of openai/prm800k (MIT), 500 problems",
)
