"""DAPO-Math-17k, the ReTool paper's RL training set, as it is published: repeats dropped, DAPO's wrapping removed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from retool.data import ProblemDataModule
from retool.rows import load_hub_dataset
from retool.types import Problem

logger = logging.getLogger(__name__)

HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
"""Where the set is published on the Hugging Face Hub."""

# DAPO wraps every question in its own answer-format instructions ("Answer: $Answer" on the last line). Our
# format asks for <answer>\boxed{}</answer>: two contradicting instructions in one prompt would teach neither.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
_COLUMNS = ("prompt", "reward_model", "extra_info", "data_source")


def dapo_question(user_message: str) -> tuple[str, bool]:
    """The question inside DAPO's user message, and whether DAPO's wrapping was found (and removed)."""
    text = user_message
    wrapped = text.startswith(DAPO_PREFIX)
    if wrapped:
        text = text[len(DAPO_PREFIX) :]
    if text.rstrip().endswith(DAPO_SUFFIX.strip()):
        text = text.rstrip()[: -len(DAPO_SUFFIX.strip())]
        wrapped = True
    return text.strip(), wrapped


class DapoMath(ProblemDataModule):
    """DAPO-Math-17k (the ReTool paper's RL data): math problems with integer answers, for RL.

    The published file has the columns ``prompt`` (a chat: one user message that wraps the question in DAPO's
    instructions), ``reward_model.ground_truth`` (the answer), ``data_source``, ``ability`` and
    ``extra_info.index``, and repeats every prompt many times (DAPO sampled from it with replacement). Here each
    distinct question is one problem, its first row's answer kept; DAPO's instructions ("The last line of your
    response should be of the form Answer: ...", "Remember to put your answer on its own line ...") are cut
    from the question, so that the format's instructions are the only ones the model reads. How many rows and
    distinct problems the source held is logged, and kept in :attr:`counts`.

    Args:
        path: A ``.parquet`` file, a folder of them (as ``hf download --repo-type dataset`` writes it), or a
            Hugging Face Hub dataset id (read with ``datasets``; needs the network).
        split: The split to read from a folder or the hub.
        limit: Keep at most this many distinct problems (after dropping repeats), in the file's order.
        **kwargs: The options of every dataset (``batch_size``, ``seed``, ``shuffle``, evaluation sets).
    """

    def __init__(self, path: str = HUB_ID, split: str = "train", limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if limit is not None and limit < 1:
            raise ValueError(f"DapoMath limit must be >= 1 or None, got {limit}")
        self.path = path
        self.split = split
        self.limit = limit
        self.counts: dict[str, int] = {}

    def load_problems(self, split: str) -> list[Problem]:
        if split == "val":
            return []  # DAPO-Math-17k has no held-out split: evaluate on eval_sets (aime24, ...)
        if split != "train":
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        table = self._table()
        missing = [c for c in ("prompt", "reward_model") if c not in table.column_names]
        if missing:
            raise ValueError(
                f"DapoMath path={self.path!r} has no {missing} column(s) (it has {table.column_names}); it must be "
                "in DAPO-Math-17k's layout: prompt (a list of chat messages) and reward_model.ground_truth"
            )
        problems: list[Problem] = []
        seen: set[str] = set()
        unwrapped = 0
        rows = table.select([c for c in _COLUMNS if c in table.column_names]).to_batches(max_chunksize=65536)
        for batch in rows:
            for row in batch.to_pylist():
                message = next((m.get("content") for m in row["prompt"] or [] if m.get("role") == "user"), None)
                answer = (row.get("reward_model") or {}).get("ground_truth")
                if not message or answer is None:
                    continue
                question, wrapped = dapo_question(message)
                if question in seen:
                    continue
                seen.add(question)
                unwrapped += not wrapped
                index = (row.get("extra_info") or {}).get("index")
                problems.append(
                    Problem(
                        id=f"dapo-{index}" if index is not None else f"dapo-{len(problems)}",
                        prompt=question,
                        answer=str(answer),
                        metadata={"data_source": row.get("data_source")},
                    )
                )
                if self.limit is not None and len(problems) >= self.limit:
                    break
            if self.limit is not None and len(problems) >= self.limit:
                break
        self.counts = {"rows": table.num_rows, "problems": len(problems), "without_dapo_wrapping": unwrapped}
        logger.info(
            "DapoMath: %d rows in %s, %d distinct problems%s",
            table.num_rows,
            self.path,
            len(problems),
            " (limit reached)" if self.limit is not None and len(problems) >= self.limit else "",
        )
        if unwrapped:
            logger.warning("DapoMath: %d questions were not in DAPO's instruction wrapping; kept as is", unwrapped)
        return problems

    def _table(self) -> Any:
        """The source as one Arrow table (only the columns used): DAPO's file holds 1.79M rows."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("DapoMath reads Parquet with pyarrow: pip install 'retool[data]'") from None
        source = Path(self.path).expanduser()
        if source.is_file():
            return pq.read_table(source, columns=_existing_columns(pq.read_schema(source).names))
        if source.is_dir():
            files = sorted(source.rglob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"DapoMath path={self.path!r} is a folder without .parquet files")
            parts = [f for f in files if self.split in f.stem] or files
            return pa.concat_tables(pq.read_table(f, columns=_existing_columns(pq.read_schema(f).names)) for f in parts)
        if "/" in str(self.path) and not str(self.path).endswith(".parquet"):
            data = load_hub_dataset(self.path, self.split, "DapoMath")
            return data.data.table
        raise FileNotFoundError(
            f"DapoMath path={self.path!r} ({source.resolve()}) does not exist; give a .parquet file, a folder of "
            "them, or a hub dataset id"
        )


def _existing_columns(names: list[str]) -> list[str]:
    return [c for c in _COLUMNS if c in names]
