"""Problems from JSON-lines files: one JSON object a line, with a question and its answer."""

from __future__ import annotations

from typing import Any

from retool.data import ProblemDataModule
from retool.rows import read_problems
from retool.types import Problem


class JsonlProblems(ProblemDataModule):
    """Problems read from a JSON-lines file (and optionally a second one for validation).

    Each non-blank line is a JSON object. The ``*_field`` arguments name its keys; a dotted name
    (``"meta.question"``) reads a nested object. The remaining keys become ``Problem.metadata``. Numeric
    answers are turned into text. The files are read when the problems are first needed, so a recipe can be
    parsed and checked on a machine that does not have them.

    Args:
        path: The training problems (``.jsonl``).
        val_path: The validation problems, in the same format; ``None`` for no validation.
        prompt_field: Key of the question text.
        answer_field: Key of the ground-truth answer.
        id_field: Key of a unique problem id; where it is ``None`` or a row lacks it, the id is
            ``"{file stem}-{line number}"``.
        limit: Read at most this many problems from each file (``None`` for all).
        **kwargs: The options of every dataset (``batch_size``, ``seed``, ``shuffle``).
    """

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        id_field: str | None = "id",
        limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if limit is not None and limit < 1:
            raise ValueError(f"JsonlProblems limit must be >= 1 or None, got {limit}")
        self.path = path
        self.val_path = val_path
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.id_field = id_field
        self.limit = limit

    def load_problems(self, split: str) -> list[Problem]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        path, option = (self.path, "path") if split == "train" else (self.val_path, "val_path")
        if path is None:
            return []
        return read_problems(
            path,
            owner="JsonlProblems",
            options=(option, "prompt_field", "answer_field"),
            prompt_field=self.prompt_field,
            answer_field=self.answer_field,
            id_field=self.id_field,
            limit=self.limit,
        )
