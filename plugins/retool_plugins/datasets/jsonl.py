"""Problems from JSON-lines files: one JSON object a line, with a question and its answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retool.data import ProblemDataModule
from retool.types import Problem

_MISSING = object()


def _get(row: dict[str, Any], field: str) -> Any:
    """``row[field]``, where a dotted ``field`` (``"meta.question"``) walks into nested objects."""
    if field in row:  # a key that itself contains a dot wins
        return row[field]
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _pop(row: dict[str, Any], field: str) -> None:
    """Remove ``field`` (dotted or not) from ``row``, and the objects it leaves empty."""
    if field in row:
        del row[field]
        return
    head, _, rest = field.partition(".")
    inner = row.get(head)
    if rest and isinstance(inner, dict):
        _pop(inner, rest)
        if not inner:
            del row[head]


class JsonlProblems(ProblemDataModule):
    """Problems read from a JSON-lines file (and optionally a second one for validation).

    Each non-blank line is a JSON object. The ``*_field`` arguments name its keys; a dotted name
    (``"meta.question"``) reads a nested object. The remaining keys become ``Problem.metadata``. Numeric
    answers are turned into text. The files are read when the problems are first needed, so a recipe can be
    parsed and checked on a machine that does not have them.

    Args:
        path: The training problems (``.jsonl``).
        batch_size: Problems per RL step.
        seed: Seed of the shuffling order.
        shuffle: Shuffle the training problems each epoch.
        val_path: The validation problems, in the same format; ``None`` for no validation.
        prompt_field: Key of the question text.
        answer_field: Key of the ground-truth answer.
        id_field: Key of a unique problem id; where it is ``None`` or a row lacks it, the id is
            ``"{file stem}-{line number}"``.
        limit: Read at most this many problems from each file (``None`` for all).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        val_path: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        id_field: str | None = "id",
        limit: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, shuffle=shuffle)
        self.path = path
        self.val_path = val_path
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.id_field = id_field
        self.limit = limit

    def load_problems(self, split: str) -> list[Problem]:
        if split == "train":
            return self._read(self.path, "path")
        if split == "val":
            return [] if self.val_path is None else self._read(self.val_path, "val_path")
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")

    def _read(self, path: str, argument: str) -> list[Problem]:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"JsonlProblems {argument}={path!r} ({file.resolve()}) does not exist; it must be an existing "
                "JSON-lines file, one problem object per line"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"JsonlProblems limit must be >= 1 or None, got {self.limit}")
        problems: list[Problem] = []
        first_line: dict[str, int] = {}  # id -> line, to report duplicates
        with file.open(encoding="utf-8-sig") as lines:  # -sig: tolerate a byte-order mark
            for number, line in enumerate(lines, start=1):
                if self.limit is not None and len(problems) >= self.limit:
                    break
                if not line.strip():
                    continue
                problem = self._problem(line, f"{path}:{number}", f"{file.stem}-{number}")
                if problem.id in first_line:
                    raise ValueError(
                        f"{path}:{number}: id {problem.id!r} is also on line {first_line[problem.id]}; ids must be "
                        "unique (set id_field to another key, or to None to number the rows by line)"
                    )
                first_line[problem.id] = number
                problems.append(problem)
        return problems

    def _problem(self, line: str, where: str, default_id: str) -> Problem:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg}); each line must hold one JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prompt, answer = _get(row, self.prompt_field), _get(row, self.answer_field)
        for field, value in ((self.prompt_field, prompt), (self.answer_field, answer)):
            if value is _MISSING or value is None:
                raise ValueError(
                    f"{where}: no {field!r} field, or it is null (this row has keys {sorted(row)}); set "
                    "prompt_field/answer_field to the keys of the question and the answer (dotted for nested ones, "
                    "e.g. 'meta.question')"
                )
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: {self.prompt_field!r} must be text, got {type(prompt).__name__}")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise ValueError(f"{where}: {self.answer_field!r} must be text or a number, got {type(answer).__name__}")
        problem_id = _MISSING if self.id_field is None else _get(row, self.id_field)
        for field in (self.prompt_field, self.answer_field, self.id_field):
            if field is not None:  # what is left is metadata
                _pop(row, field)
        return Problem(
            id=default_id if problem_id is _MISSING or problem_id is None else str(problem_id),
            prompt=prompt,
            answer=str(answer),
            metadata=row,
        )
