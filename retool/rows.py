"""Rows of JSON objects into problems: the field access, checks and JSON-lines reading that the dataset plugins and
``TraceFile`` share, so that both read a row, and word a bad one, the same way."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from retool.types import Problem

MISSING: Any = object()
"""What :func:`get_field` returns for a field the row does not have."""


def get_field(row: dict[str, Any], field: str) -> Any:
    """``row[field]``, where a dotted ``field`` (``"meta.question"``) walks into nested objects; else MISSING."""
    if field in row:  # a key that itself contains a dot wins
        return row[field]
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def absent(value: Any) -> bool:
    """A field that is missing or null."""
    return value is MISSING or value is None


def without_fields(row: dict[str, Any], fields: Sequence[str | None]) -> dict[str, Any]:
    """A copy of ``row`` without ``fields`` (dotted ones too), dropping the nested objects that end up empty."""

    def drop(obj: dict[str, Any], field: str) -> dict[str, Any]:
        if field in obj:
            return {k: v for k, v in obj.items() if k != field}
        head, _, rest = field.partition(".")
        if rest and isinstance(obj.get(head), dict):
            inner = drop(obj[head], rest)
            return {k: v for k, v in obj.items() if k != head} | ({head: inner} if inner else {})
        return obj

    out = dict(row)
    for field in fields:
        if field is not None:
            out = drop(out, field)
    return out


def missing_field(where: str, row: dict[str, Any], field: str, option: str, more: str = "") -> ValueError:
    """The error for a row without ``field``: its keys, and the option that names the field (``option``)."""
    return ValueError(
        f"{where}: no {field!r} field, or it is null (this row has keys {sorted(row)}); set {option} to the key "
        f"that holds it (dotted for a nested one, e.g. 'meta.question'){more}"
    )


def text_value(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field!r} must be text, got {type(value).__name__}")
    return value


def answer_text(value: Any, where: str, field: str) -> str:
    """An answer as text: numbers are written out, anything else but text is refused."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"{where}: {field!r} must be text or a number, got {type(value).__name__}")
    return str(value)


def existing_file(path: str, owner: str, option: str) -> Path:
    """``path`` as a file, or ``FileNotFoundError`` naming the option (``JsonlProblems path=...``) and the fix."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"{owner} {option}={path!r} ({file.resolve()}) does not exist; it must be an existing JSON-lines file, "
            "one object a line"
        )
    return file


def import_datasets() -> Any:
    """Hugging Face ``datasets``, imported when a dataset folder or a hub id is read (an optional dependency)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "reading a dataset folder or a hub dataset needs the datasets package: pip install 'retool[data]'"
        ) from None
    return datasets


def load_hub_dataset(path: str, split: str, owner: str, local: str = "path=DIR") -> Any:
    """``datasets.load_dataset(path, split=split)``; a failure (most often: no network) is a ``ValueError`` that
    says the path was read as a hub id and how to bring the dataset over (``local``: what to pass instead)."""
    datasets = import_datasets()
    try:
        return datasets.load_dataset(str(path), split=split)
    except Exception as error:
        raise ValueError(
            f"{owner} path={path!r} is no local file or folder, so it was read as a Hugging Face Hub dataset id, "
            f"and loading it failed ({type(error).__name__}: {error}). If the hub is unreachable from this machine, "
            f"download the dataset where it is reachable (hf download --repo-type dataset {path} --local-dir DIR), "
            f"copy it here and pass the local path ({local})"
        ) from None


def jsonl_rows(file: Path, shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a line that is not a JSON object is a ``ValueError``
    that names ``shown:line``."""
    with file.open(encoding="utf-8-sig") as lines:  # -sig: tolerate a byte-order mark
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{shown}:{number}: not valid JSON ({error.msg}); each line must hold one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{shown}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_problems(
    path: str,
    *,
    owner: str,
    options: tuple[str, str, str],
    prompt_field: str,
    answer_field: str,
    id_field: str | None,
    limit: int | None = None,
) -> list[Problem]:
    """The problems of a JSON-lines file, one object a line (blank lines skipped).

    The question and the answer are the rows' ``prompt_field`` and ``answer_field`` (dotted for nested ones);
    the id is ``id_field``, or ``"{file stem}-{line number}"`` where that is ``None`` or a row lacks it; the
    rest of a row is the problem's metadata. Ids must be unique.

    Args:
        path: The file.
        owner: The plugin that reads it, for error messages (``JsonlProblems``).
        options: The names of the options that set the path, the prompt field and the answer field, so that an
            error names the option to change (``("path", "prompt_field", "answer_field")``).
        prompt_field: Key of the question text.
        answer_field: Key of the answer (text or a number).
        id_field: Key of a unique id, or ``None``.
        limit: Read at most this many problems.
    """
    path_option, prompt_option, answer_option = options
    file = existing_file(path, owner, path_option)
    problems: list[Problem] = []
    first_line: dict[str, int] = {}  # id -> line, to report duplicates
    for number, row in jsonl_rows(file, path):
        if limit is not None and len(problems) >= limit:
            break
        where = f"{path}:{number}"
        prompt, answer = get_field(row, prompt_field), get_field(row, answer_field)
        for field, value, option in ((prompt_field, prompt, prompt_option), (answer_field, answer, answer_option)):
            if absent(value):
                raise missing_field(where, row, field, option)
        problem_id = MISSING if id_field is None else get_field(row, id_field)
        problem = Problem(
            id=f"{file.stem}-{number}" if absent(problem_id) else str(problem_id),
            prompt=text_value(prompt, where, prompt_field),
            answer=answer_text(answer, where, answer_field),
            metadata=without_fields(row, [prompt_field, answer_field, id_field]),
        )
        if problem.id in first_line:
            raise ValueError(
                f"{where}: id {problem.id!r} is also on line {first_line[problem.id]}; ids must be unique (set "
                "id_field to another key, or to None to number the rows by line)"
            )
        first_line[problem.id] = number
        problems.append(problem)
    return problems
