"""Cold-start traces from a file: worked solutions (interpreter blocks included) to fine-tune on before RL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from retool.answer import final_boxes
from retool.data import ProblemDataModule
from retool.rows import (
    MISSING,
    absent,
    answer_text,
    get_field,
    import_datasets,
    jsonl_rows,
    load_hub_dataset,
    missing_field,
    read_problems,
    text_value,
    without_fields,
)
from retool.types import Problem, Trace

LAYOUTS = ("fields", "messages", "retool-sft")
RETOOL_SFT_MARKER = "*user question:*"
"""In the published ReTool cold-start set, the question follows this marker in the user message."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
# The ReTool-SFT prompt ends with a reminder of the answer format after the question; our format has its own.
_REMINDER = re.compile(r"\n\s*Remember to place the final answer in the last part\b.*\Z", re.DOTALL | re.IGNORECASE)
_TOOL_ROLES = ("tool", "ipython", "function")


def _missing_field(where: str, row: dict[str, Any], field: str, option: str) -> ValueError:
    return missing_field(where, row, field, option, f", or pick another layout ({', '.join(LAYOUTS)})")


def retool_sft_question(user_message: str) -> str | None:
    """The bare question in a ReTool-SFT user message, or ``None`` when the message has no question marker.

    The message is the ReTool prompt template: tool instructions, the marker ``*user question:*``, the
    question, and a reminder of the answer format. The instructions, the marker, the reminder and any
    ``<answer>``/``</answer>`` tags are removed.
    """
    at = user_message.find(RETOOL_SFT_MARKER)
    if at < 0:
        return None
    question = _REMINDER.sub("", user_message[at + len(RETOOL_SFT_MARKER) :])
    return question.replace("<answer>", "").replace("</answer>", "").strip()


class TraceFile(ProblemDataModule):
    """Cold-start (SFT) traces read from a file, a saved dataset or the Hugging Face Hub.

    Each row is one worked solution: a question and the assistant's whole turn in the ReTool text format
    (reasoning, ``<code>`` cells, the ``<interpreter>`` blocks that answered them, and the final
    ``<answer>\\boxed{...}</answer>``). The prompt is the bare question: training wraps it in the rollout's
    format, as a rollout would. The rows are read when they are first needed, so a recipe can be checked on a
    machine that does not have the data.

    ``path`` may be a ``.jsonl`` file (one JSON object a line), a ``.parquet`` file, a folder written by
    ``datasets``' ``save_to_disk`` or downloaded from the hub (``hf download --repo-type dataset ORG/NAME
    --local-dir DIR``), or a hub dataset id ``"ORG/NAME"`` (read with ``datasets.load_dataset``; that needs
    network access). Parquet needs ``pyarrow`` and the dataset forms need ``datasets``: ``pip install
    'retool[data]'``.

    Layouts (``layout``):

    * ``fields``: the question, the response, and optionally the answer are columns (``prompt_field``,
      ``response_field``, ``answer_field``). A row without the answer gets the answer ``""``.
    * ``messages``: a chat, a list of ``{"role", "content"}`` objects under ``messages_field``. The first user
      message is the prompt (a later user turn is ignored, as are system messages), the last assistant message
      is the response; it must hold the whole trace, interpreter blocks included (a chat with ``tool``
      messages is refused). The answer is ``answer_field`` when the row has it, else ``""``.
    * ``retool-sft``: the published ReTool cold-start set (``JoeYing/ReTool-SFT``): ``messages`` is
      ``[user, assistant]``, the user message is the ReTool prompt template with the question after
      ``*user question:*``. The prompt is that question alone; the set has no gold answer, so the answer is the
      trace's own last ``\\boxed{}`` (unless the row has ``answer_field``) and the problem's and the trace's
      metadata say ``{"answer_from": "trace"}``.

    Splits: ``load_traces("train")`` is every trace but the last ``num_val``; ``load_traces("val")`` the last
    ``num_val``. The held-out problems never appear in training: a training trace with the id or the prompt
    of a held-out one is dropped. ``load_problems(split)`` is the problems of that split's traces (one per
    id), so RL and evaluation can run on the same file, except that ``val_path`` replaces the ``val`` problems
    with a JSON-lines file of problems.

    Args:
        path: The traces: a ``.jsonl`` or ``.parquet`` file, a dataset folder, or a hub id ``"ORG/NAME"``.
        layout: How a row holds its trace: ``"fields"``, ``"messages"`` or ``"retool-sft"`` (see above, and the
            docs page "Cold-start data").
        split: The split of a dataset folder or hub dataset that holds the traces (ignored for files).
        prompt_field: Key of the question (layout ``fields``).
        response_field: Key of the response, the whole trace (layout ``fields``).
        answer_field: Key of the ground-truth answer; optional in every layout (a row without it gets ``""``,
            or in layout ``retool-sft`` the answer in its trace).
        id_field: Key of a problem id; where it is ``None`` or a row lacks it, the id is
            ``"{file stem}-{row number}"``. Traces may share an id (several solutions of one problem).
        messages_field: Key of the chat (layouts ``messages`` and ``retool-sft``).
        num_val: Hold out the last this many traces as the ``val`` split (after ``limit``).
        val_path: A JSON-lines file of problems used as the ``val`` problems instead of the held-out ones;
            ``None`` for none.
        val_prompt_field: Key of the question in ``val_path``'s rows.
        val_answer_field: Key of the answer in ``val_path``'s rows.
        limit: Read at most this many rows of ``path`` (``None`` for all).
        **kwargs: The options of every dataset (``batch_size``: traces per SFT step, or problems per RL step;
            ``seed``; ``shuffle``).
    """

    def __init__(
        self,
        path: str,
        layout: Literal["fields", "messages", "retool-sft"] = "fields",
        split: str = "train",
        prompt_field: str = "prompt",
        response_field: str = "response",
        answer_field: str | None = "answer",
        id_field: str | None = "id",
        messages_field: str = "messages",
        num_val: int = 0,
        val_path: str | None = None,
        val_prompt_field: str = "prompt",
        val_answer_field: str = "answer",
        limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"TraceFile layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
        if num_val < 0:
            raise ValueError(f"TraceFile num_val must be >= 0, got {num_val}")
        if limit is not None and limit < 1:
            raise ValueError(f"TraceFile limit must be >= 1 or None, got {limit}")
        self.path = path
        self.layout = layout
        self.split = split
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.answer_field = answer_field
        self.id_field = id_field
        self.messages_field = messages_field
        self.num_val = num_val
        self.val_path = val_path
        self.val_prompt_field = val_prompt_field
        self.val_answer_field = val_answer_field
        self.limit = limit
        self._loaded: dict[str, tuple[list[Trace], list[dict[str, Any]]]] | None = None

    # ---- the contract ----------------------------------------------------------------------------------------

    def load_traces(self, split: str) -> list[Trace]:
        return list(self._split(split)[0])

    def load_problems(self, split: str) -> list[Problem]:
        if split == "val" and self.val_path is not None:
            return self._val_problems()
        seen: set[str] = set()
        problems = []
        for trace in self._split(split)[0]:
            if trace.problem.id not in seen:
                seen.add(trace.problem.id)
                problems.append(trace.problem)
        return problems

    def rows(self, split: str = "train") -> list[dict[str, Any]]:
        """The rows of ``split`` as read from the source, in the order of :meth:`load_traces` (one per trace)."""
        return list(self._split(split)[1])

    # ---- splits ----------------------------------------------------------------------------------------------

    def _split(self, split: str) -> tuple[list[Trace], list[dict[str, Any]]]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        if self._loaded is None:
            pairs = [(self._trace(row, number), row) for number, row in self._read_rows()]
            if self.num_val and self.num_val >= len(pairs):
                raise ValueError(
                    f"TraceFile num_val={self.num_val} leaves no training traces: {self.path} has {len(pairs)} "
                    "(after limit); lower num_val"
                )
            cut = len(pairs) - self.num_val
            held_out = pairs[cut:]
            ids = {t.problem.id for t, _ in held_out}
            prompts = {t.problem.prompt for t, _ in held_out}
            train = [(t, r) for t, r in pairs[:cut] if t.problem.id not in ids and t.problem.prompt not in prompts]
            self._loaded = {
                "train": ([t for t, _ in train], [r for _, r in train]),
                "val": ([t for t, _ in held_out], [r for _, r in held_out]),
            }
        return self._loaded[split]

    # ---- reading the source ----------------------------------------------------------------------------------

    def _read_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(row number, row)`` for each row of ``path`` (1-based; for JSON lines, the line number)."""
        source = Path(self.path).expanduser()
        if source.is_file():
            suffix = source.suffix.lower()
            if suffix in _JSONL_SUFFIXES:
                rows: Iterator[tuple[int, dict[str, Any]]] = jsonl_rows(source, str(self.path))
            elif suffix == ".parquet":
                rows = enumerate(_parquet_rows(source, self.limit), start=1)
            else:
                raise ValueError(
                    f"TraceFile path={self.path!r} is a {suffix or 'suffix-less'} file; use a .jsonl or .parquet file, "
                    "a dataset folder, or a hub dataset id 'ORG/NAME'"
                )
        elif source.is_dir():
            rows = enumerate(self._dataset_rows(source), start=1)
        elif _HUB_ID.fullmatch(str(self.path)) and not str(self.path).lower().endswith((*_JSONL_SUFFIXES, ".parquet")):
            rows = enumerate(self._hub_rows(), start=1)
        else:
            raise FileNotFoundError(
                f"TraceFile path={self.path!r} ({source.resolve()}) does not exist; it must be an existing .jsonl or "
                ".parquet file, a dataset folder, or a Hugging Face Hub dataset id 'ORG/NAME'"
            )
        for count, (number, row) in enumerate(rows):
            if self.limit is not None and count >= self.limit:
                return
            yield number, row

    def _dataset_rows(self, folder: Path) -> list[dict[str, Any]]:
        datasets = import_datasets()
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(folder))  # written by save_to_disk
            if isinstance(data, datasets.DatasetDict):
                if self.split not in data:
                    raise ValueError(
                        f"TraceFile path={self.path!r} has no split {self.split!r}; set split to one of {sorted(data)}"
                    )
                data = data[self.split]
        else:  # a folder of data files, as `hf download` writes it
            try:
                data = datasets.load_dataset(str(folder), split=self.split)
            except ValueError as error:
                raise ValueError(f"TraceFile path={self.path!r}: {error} (set split)") from None
        return _head(data, self.limit)

    def _hub_rows(self) -> list[dict[str, Any]]:
        data = load_hub_dataset(self.path, self.split, "TraceFile", "path=DIR, or one of its .parquet/.jsonl files")
        return _head(data, self.limit)

    def _val_problems(self) -> list[Problem]:
        assert self.val_path is not None
        return read_problems(
            self.val_path,
            owner="TraceFile",
            options=("val_path", "val_prompt_field", "val_answer_field"),
            prompt_field=self.val_prompt_field,
            answer_field=self.val_answer_field,
            id_field=self.id_field,
        )

    # ---- one row -> one trace --------------------------------------------------------------------------------

    def _trace(self, row: dict[str, Any], number: int) -> Trace:
        where = f"{self.path}, row {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        answer = MISSING if self.answer_field is None else get_field(row, self.answer_field)
        gold = "" if absent(answer) else answer_text(answer, where, str(self.answer_field))
        metadata: dict[str, Any] = {}
        if self.layout == "fields":
            prompt, response = get_field(row, self.prompt_field), get_field(row, self.response_field)
            for field, value, argument in (
                (self.prompt_field, prompt, "prompt_field"),
                (self.response_field, response, "response_field"),
            ):
                if absent(value):
                    raise _missing_field(where, row, field, argument)
            prompt = text_value(prompt, where, self.prompt_field)
            response = text_value(response, where, self.response_field)
            used = [self.prompt_field, self.response_field]
        else:
            prompt, response = self._from_messages(row, where)
            used = [self.messages_field]
            if self.layout == "retool-sft":
                question = retool_sft_question(prompt)
                if question is None:
                    raise ValueError(
                        f"{where}: the user message has no {RETOOL_SFT_MARKER!r} marker, so it is not in the "
                        "ReTool-SFT layout; use layout='messages' for plain chats"
                    )
                prompt = question
                if absent(answer):
                    # All the final boxes, as the reward reads them: a list answered one box per element.
                    gold = ", ".join(dict.fromkeys(final_boxes(response)))
                    metadata["answer_from"] = "trace"
        problem_id = MISSING if self.id_field is None else get_field(row, self.id_field)
        stem = Path(str(self.path)).stem
        problem = Problem(
            id=f"{stem}-{number}" if absent(problem_id) else str(problem_id),
            prompt=prompt,
            answer=gold,
            metadata=without_fields(row, [*used, self.answer_field, self.id_field]) | metadata,
        )
        return Trace(problem=problem, response=response, metadata={"source": str(self.path), "row": number} | metadata)

    def _from_messages(self, row: dict[str, Any], where: str) -> tuple[str, str]:
        """(first user message, last assistant message) of the row's chat."""
        messages = get_field(row, self.messages_field)
        if absent(messages):
            raise _missing_field(where, row, self.messages_field, "messages_field")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError(
                f"{where}: {self.messages_field!r} must be a list of {{'role': ..., 'content': ...}} objects with "
                "text content"
            )
        roles = [m["role"] for m in messages]
        if any(role in _TOOL_ROLES for role in roles):
            raise ValueError(
                f"{where}: the chat has tool messages (roles {roles}); this layout wants the whole trace in one "
                "assistant message, with the interpreter's replies as <interpreter> blocks"
            )
        if "user" not in roles:
            raise ValueError(f"{where}: the chat has no user message (roles {roles})")
        first_user = roles.index("user")
        if "assistant" not in roles[first_user + 1 :]:
            raise ValueError(f"{where}: the chat has no assistant message after its first user message (roles {roles})")
        last_assistant = len(roles) - 1 - roles[::-1].index("assistant")
        return messages[first_user]["content"], messages[last_assistant]["content"]


# ---- sources --------------------------------------------------------------------------------------------------


def _parquet_rows(file: Path, limit: int | None) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {file} needs pyarrow: pip install 'retool[data]'") from None
    table = pq.read_table(file)
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _head(data: Any, limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    return data.to_list()
